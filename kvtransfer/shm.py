"""The same-host byte path: a sender's shared-memory segment of fixed-size slots.

A sender (``SlotSegment``) creates one segment in ``/dev/shm`` named after its worker and
process, ``strata-kv-<owner>-<pid>-<nonce>``, and writes block bytes into free slots; the gRPC
frame then carries only the slot's offset. A receiver on the same host maps the segment by name
(``SegmentMap``, read-only), copies the blocks out, and acknowledges the frame, which frees the
slot.

Each slot starts with a generation counter (a sequence lock): the writer makes it odd before
writing and even (the value the frame names) after; the reader checks it before and after its
copy. A slot reused under a reader (its sender gave up on the stream and moved on) thus fails the
check and the frame is dropped, never turned into a block with mixed bytes.

On start a sender removes segments of its owner whose process is gone, so a crash leaks nothing
past the next start; a clean shutdown unlinks its own. Only segments whose names match
this pattern are ever opened, and files are created mode 0600 (the receiver runs as the same
user); the gRPC call that names a segment carries the cluster secret.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import mmap
import os
import re
import secrets
import socket
import struct
import threading

import numpy as np

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
PREFIX = "strata-kv-"
_NAME = re.compile(r"^strata-kv-[A-Za-z0-9_.]+-(\d+)-[0-9a-f]+$")
_OWNER = re.compile(r"[^A-Za-z0-9_.]")
SLOT_HEADER = 64  # bytes before a slot's data: the generation counter, cache-line aligned
_GEN = struct.Struct("<Q")


class TornReadError(Exception):
    """The slot changed while it was being read (its writer reused it)."""


def host_id() -> str:
    """Identity of this host: two processes with the same one share ``/dev/shm``.

    The kernel's boot id names the machine, and the device and inode of ``/dev/shm`` name the
    file system behind it on that kernel: containers (or network namespaces) of one machine
    that each mount their own ``/dev/shm`` differ here even under one hostname, and processes
    that see the same ``/dev/shm`` agree. The hostname is kept for the logs."""
    boot = ""
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    shm_fs = "-"
    with contextlib.suppress(OSError):
        st = os.stat(SHM_DIR)
        shm_fs = f"{st.st_dev}:{st.st_ino}"
    return f"{socket.gethostname()}/{boot}/{shm_fs}"


def free_bytes() -> int:
    """Bytes ``/dev/shm`` can still take (0 where it does not exist or is not writable)."""
    if not (os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)):
        return 0
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(owner: str) -> int:
    """Unlink ``owner``'s segments whose process no longer runs; returns how many."""
    prefix = f"{PREFIX}{_OWNER.sub('_', owner)}-"
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        m = _NAME.match(name)
        if not name.startswith(prefix) or m is None or _pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, name))
            removed += 1
    if removed:
        logger.info("removed %d stale shared-memory segments of %s", removed, owner)
    return removed


class SlotSegment:
    """A segment of ``num_slots`` slots holding ``slot_bytes`` of data each; a thread-safe slot
    allocator, and the writer's side of each slot's generation counter."""

    def __init__(self, owner: str, slot_bytes: int, num_slots: int) -> None:
        if slot_bytes <= 0 or num_slots <= 0:
            raise ValueError("slot_bytes and num_slots must be positive")
        remove_stale(owner)
        self.name = f"{PREFIX}{_OWNER.sub('_', owner)}-{os.getpid()}-{secrets.token_hex(4)}"
        self.slot_bytes = slot_bytes
        self.num_slots = num_slots
        self.stride = SLOT_HEADER + slot_bytes
        path = os.path.join(SHM_DIR, self.name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            # Reserve the pages now: a full /dev/shm then fails here (ENOSPC), not with SIGBUS
            # on a later write.
            os.posix_fallocate(fd, 0, self.stride * num_slots)
            self._map = mmap.mmap(fd, self.stride * num_slots)
        except OSError:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self._view = memoryview(self._map)
        self._free: collections.deque[int] = collections.deque(range(num_slots))
        self._cond = threading.Condition()
        self._closed = False

    def try_acquire(self) -> int | None:
        """A free slot's index, or None when every slot is in flight."""
        with self._cond:
            return self._free.popleft() if self._free and not self._closed else None

    def acquire(self, timeout: float) -> int | None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._free or self._closed, timeout):
                return None
            return self._free.popleft() if not self._closed else None

    def release(self, slot: int) -> None:
        assert 0 <= slot < self.num_slots, f"slot {slot} outside [0, {self.num_slots})"
        with self._cond:
            self._free.append(slot)
            self._cond.notify()

    @property
    def num_free(self) -> int:
        with self._cond:
            return len(self._free)

    def offset(self, slot: int) -> int:
        """Where the slot starts in the segment (its generation counter, then its data)."""
        return slot * self.stride

    def begin_write(self, slot: int, nbytes: int) -> memoryview:
        """Mark the slot as being written (odd generation); returns the writable view of its
        first ``nbytes`` data bytes. Call ``end_write`` when the bytes are in."""
        assert 0 < nbytes <= self.slot_bytes, f"{nbytes} bytes exceed a slot of {self.slot_bytes}"
        start = self.offset(slot)
        (gen,) = _GEN.unpack_from(self._view, start)
        _GEN.pack_into(self._view, start, gen | 1)
        data = start + SLOT_HEADER
        return self._view[data : data + nbytes]

    def end_write(self, slot: int) -> int:
        """Publish the slot's bytes: the new (even) generation, which the frame names."""
        start = self.offset(slot)
        (gen,) = _GEN.unpack_from(self._view, start)
        gen = (gen | 1) + 1
        _GEN.pack_into(self._view, start, gen)
        return gen

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, self.name))
        self._view.release()
        with contextlib.suppress(BufferError):  # a view still held elsewhere: the GC unmaps it
            self._map.close()


class SegmentMap:
    """The receiver's read-only mappings of senders' segments, opened on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._maps: dict[str, tuple[mmap.mmap, memoryview]] = {}

    def open(self, name: str) -> bool:
        """Map ``name``; False (never an exception) if it is not a segment this host has."""
        if _NAME.match(name) is None:
            return False
        with self._lock:
            if name in self._maps:
                return True
            gone = [n for n in self._maps if not os.path.exists(os.path.join(SHM_DIR, n))]
            try:
                fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY)
            except OSError:
                return False
            try:
                size = os.fstat(fd).st_size
                if size == 0:
                    return False
                m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
            except (OSError, ValueError):
                return False
            finally:
                os.close(fd)
            self._maps[name] = (m, memoryview(m))
        for n in gone:  # senders that went away: their unlinked segments are unmapped
            self.close(n)
        return True

    def read_into(self, name: str, offset: int, gen: int, out: memoryview) -> None:
        """Copy ``len(out)`` data bytes of the slot at ``offset`` into ``out``, checking that it
        holds generation ``gen`` before and after. ValueError: not a valid slot of a mapped
        segment; ``TornReadError``: the slot was rewritten under the copy."""
        with self._lock:
            entry = self._maps.get(name)
        if entry is None:
            raise ValueError(f"segment {name!r} is not mapped")
        view = entry[1]
        nbytes = out.nbytes
        data = offset + SLOT_HEADER
        if nbytes <= 0 or offset < 0 or data + nbytes > len(view) or gen % 2:
            raise ValueError(f"slot at {offset} ({nbytes} bytes, gen {gen}) outside {name!r}")
        if _GEN.unpack_from(view, offset)[0] != gen:
            raise TornReadError(f"slot at {offset} of {name!r} no longer holds generation {gen}")
        # numpy copies without holding the GIL (the memoryview assignment would hold it)
        np.copyto(
            np.frombuffer(out, dtype=np.uint8),
            np.frombuffer(view, dtype=np.uint8, count=nbytes, offset=data),
        )
        if _GEN.unpack_from(view, offset)[0] != gen:
            raise TornReadError(f"slot at {offset} of {name!r} was rewritten while read")

    def close(self, name: str | None = None) -> None:
        with self._lock:
            names = [name] if name is not None else list(self._maps)
            entries = [self._maps.pop(n) for n in names if n in self._maps]
        for m, view in entries:
            view.release()
            with contextlib.suppress(BufferError):
                m.close()
