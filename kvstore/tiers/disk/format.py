"""On-disk format of the disk tier (version 2): where the bytes live and how an entry is encoded.

A store directory (``disk_path``) holds:

    strata.lock                 an exclusive flock: one store per directory at a time
    index/data.mdb              LMDB, the store of record: block_hash -> entry; format version
    segments/<slot>/<k>.seg     payloads, one slot of ``<slot>`` bytes per block

Slots are ``block_nbytes`` rounded up to ``ALIGN`` (4 KiB), so every payload starts on a page
boundary and is read with ``O_DIRECT`` straight into a host slab row: large reads, several in
flight, no page cache. Slot ``s`` of a slot size lives in segment file ``s // slots_per_segment``
at ``(s % slots_per_segment) * slot``; blocks written together get consecutive slots, so a
prompt's blocks come back as a few large sequential reads. Why not one LMDB value per block (the
version 1 format): LMDB maps the file, so every value was read through 4 KiB page faults (0.05-0.07
GB/s on the 2-core machine after a cache drop, against 1.2-1.9 GB/s for these reads), the page
cache kept the data (a probe measured the cache, not the disk), and opening a store read one page
of every value (see ``docs/disk-tier.md`` for the measurements).

Entry (40 bytes, little endian): model fingerprint 16s | slot size u32 | payload length u32 |
slot u32 | crc32 of the payload u32 | access counter u64 (the LRU order across restarts).

Checksum: ``zlib.crc32`` (1.9 GB/s on the 2-core machine, 3.4x faster than blake2b-128; it
detects any burst of up to 32 flipped bits, which is what a torn or decayed page gives). A slot
reused after a crash that lost the deletion of its old entry fails the old entry's checksum: a
miss, never wrong data.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from kvstore.layout import IO_ALIGN

FORMAT_VERSION = 2
ALIGN = IO_ALIGN  # O_DIRECT alignment of offsets, lengths and buffers
SEGMENT_NBYTES = 256 << 20  # a segment file's size (smaller when the tier is smaller)
INDEX_DIR = "index"
SEGMENTS_DIR = "segments"
LOCK_NAME = "strata.lock"
LEGACY_DATA = "data.mdb"  # a version 1 store: block values in LMDB at the top of the directory

DB_INDEX = b"index"  # block_hash -> entry
DB_META = b"meta"  # b"format_version" -> u32; b"fingerprint" -> the last model opened
DB_NAMES = (DB_INDEX, DB_META)
KEY_VERSION = b"format_version"
KEY_FINGERPRINT = b"fingerprint"

_ENTRY = struct.Struct("<16sIIIIQ")
ENTRY_NBYTES = _ENTRY.size  # 40
_U32 = struct.Struct("<I")


@dataclass(slots=True)
class Entry:
    fingerprint: bytes  # model fingerprint the block was computed with
    slot_nbytes: int  # slot size of the segment files holding it
    payload_nbytes: int  # bytes of the block
    slot: int  # slot number within its slot size
    crc: int  # crc32 of the payload
    access: int  # access counter when last used (higher = more recent)


def encode_entry(e: Entry) -> bytes:
    return _ENTRY.pack(e.fingerprint, e.slot_nbytes, e.payload_nbytes, e.slot, e.crc, e.access)


def decode_entry(value: bytes | memoryview) -> Entry | None:
    """The entry, or None when the bytes cannot be one."""
    if len(value) != ENTRY_NBYTES:
        return None
    fp, slot_nbytes, payload_nbytes, slot, crc, access = _ENTRY.unpack(value)
    if slot_nbytes % ALIGN or not 0 < payload_nbytes <= slot_nbytes:
        return None
    return Entry(bytes(fp), slot_nbytes, payload_nbytes, slot, crc, access)


def encode_u32(n: int) -> bytes:
    return _U32.pack(n)


def decode_u32(value: bytes | memoryview | None) -> int | None:
    return None if value is None or len(value) != 4 else int(_U32.unpack(value)[0])


def checksum(payload: memoryview | bytes) -> int:
    return zlib.crc32(payload)


def slot_nbytes_for(block_nbytes: int) -> int:
    """The slot size that holds a block: its size rounded up to ``ALIGN``."""
    return -(-block_nbytes // ALIGN) * ALIGN


def slots_per_segment(slot_nbytes: int, capacity_bytes: int) -> int:
    """Slots of one segment file: ``SEGMENT_NBYTES`` worth, or the whole tier when smaller."""
    return max(1, min(SEGMENT_NBYTES, capacity_bytes) // slot_nbytes)


def index_map_size(capacity_bytes: int) -> int:
    """LMDB ``map_size`` of the index: room for an entry per 4 KiB of capacity, many times over
    (copy-on-write pages, free pages not yet reusable). A sparse file: only what is used."""
    return max(64 << 20, capacity_bytes // 8)
