"""Segment files: the payloads of one slot size, read and written with ``O_DIRECT``.

Slot ``s`` lives in file ``segments/<slot_nbytes>/<s // slots_per_segment>.seg`` at offset
``(s % slots_per_segment) * slot_nbytes``. A file is created on its first write and preallocated
(``posix_fallocate``) in extents of ``EXTENT_NBYTES`` as its slots are first used, so a large
tier costs nothing until it fills, and a run of slots is one contiguous range of the device.

``read(first_slot, bufs)`` / ``write(first_slot, bufs)`` move a run of consecutive slots of one
file with one ``preadv`` / ``pwritev`` (each buffer one slot, or the run in one buffer). With
``O_DIRECT`` every buffer's address and length must be multiples of ``ALIGN``
(``aligned_empty`` gives such memory); the page cache is bypassed both ways, so what a read
costs is what the device costs. Where the filesystem refuses ``O_DIRECT`` (tmpfs, some network
filesystems) the files are opened without it and reads tell the kernel to drop the pages again.

Thread-safe: any number of threads read and write distinct slots at once.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from kvstore.layout import aligned_empty
from kvstore.tiers.disk.format import ALIGN, SEGMENTS_DIR

logger = logging.getLogger(__name__)

EXTENT_NBYTES = 64 << 20  # preallocation step of a segment file
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024  # buffers per call
Buffer = np.ndarray  # uint8, contiguous


def class_dir(disk_path: str | Path, slot_nbytes: int) -> Path:
    return Path(disk_path) / SEGMENTS_DIR / str(slot_nbytes)


class SegmentFiles:
    def __init__(
        self, disk_path: str, slot_nbytes: int, slots_per_segment: int, *, direct: bool = True
    ) -> None:
        assert slot_nbytes % ALIGN == 0 and slots_per_segment > 0
        self.dir = class_dir(disk_path, slot_nbytes)
        self.slot_nbytes = slot_nbytes
        self.slots_per_segment = slots_per_segment
        self.segment_nbytes = slot_nbytes * slots_per_segment
        self.dir.mkdir(parents=True, exist_ok=True)
        self.direct = direct and _supports_direct(self.dir)
        if direct and not self.direct:
            logger.warning(
                "disk store %s: the filesystem refuses O_DIRECT; segment files use the page cache "
                "(reads then drop their pages again)",
                disk_path,
            )
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}  # segment -> fd (O_RDWR, O_DIRECT when supported)
        self._allocated: dict[int, int] = {}  # segment -> bytes preallocated
        self._closed = False

    def segment_of(self, slot: int) -> int:
        return slot // self.slots_per_segment

    def offset_of(self, slot: int) -> int:
        return (slot % self.slots_per_segment) * self.slot_nbytes

    # ---- I/O ---------------------------------------------------------------------------------
    def read(self, first_slot: int, bufs: Sequence[Buffer]) -> int:
        """Read consecutive slots (one segment) into ``bufs``; the bytes read (short at EOF)."""
        seg = self.segment_of(first_slot)
        fd = self._fd(seg, create=False)
        if fd is None:
            return 0
        offset = self.offset_of(first_slot)
        n = 0
        for i in range(0, len(bufs), IOV_MAX):
            part = bufs[i : i + IOV_MAX]
            got = os.preadv(fd, [b.data for b in part], offset + n)
            n += got
            if got < sum(b.nbytes for b in part):
                break  # end of file
        if not self.direct:
            os.posix_fadvise(fd, offset, n, os.POSIX_FADV_DONTNEED)
        return n

    def runs(self, slots: Sequence[int]) -> list[tuple[int, int, int]]:
        """``(fd, offset, nbytes)`` per run of consecutive slots of one segment, in order (the
        slots of segments not on disk are left out)."""
        out: list[tuple[int, int, int]] = []
        for slot in slots:
            fd = self._fd(self.segment_of(slot), create=False)
            if fd is None:
                continue
            off = self.offset_of(slot)
            if out and out[-1][0] == fd and out[-1][1] + out[-1][2] == off:  # continues it
                out[-1] = (fd, out[-1][1], out[-1][2] + self.slot_nbytes)
            else:
                out.append((fd, off, self.slot_nbytes))
        return out

    def write(self, first_slot: int, bufs: Sequence[Buffer]) -> None:
        """Write consecutive slots (one segment) from ``bufs``; raises ``OSError``."""
        seg = self.segment_of(first_slot)
        offset = self.offset_of(first_slot)
        nbytes = sum(b.nbytes for b in bufs)
        assert offset + nbytes <= self.segment_nbytes, "a write crosses a segment's end"
        fd = self._fd(seg, create=True)
        assert fd is not None
        self._preallocate(seg, fd, offset + nbytes)
        done = 0
        for i in range(0, len(bufs), IOV_MAX):
            done += os.pwritev(fd, [b.data for b in bufs[i : i + IOV_MAX]], offset + done)
        if done != nbytes:
            raise OSError(errno.EIO, f"short write to segment {seg}: {done} of {nbytes} bytes")
        if not self.direct:
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)

    def sync(self) -> None:
        """Make every write so far durable (``fdatasync`` of each open file)."""
        with self._lock:
            fds = list(self._fds.values())
        for fd in fds:
            os.fdatasync(fd)

    # ---- files -------------------------------------------------------------------------------
    def _fd(self, seg: int, create: bool) -> int | None:
        with self._lock:
            fd = self._fds.get(seg)
            if fd is not None or self._closed:
                return fd
            path = self.dir / f"{seg}.seg"
            flags = os.O_RDWR | (os.O_DIRECT if self.direct else 0)
            if create:
                flags |= os.O_CREAT
            try:
                fd = os.open(path, flags, 0o644)
            except FileNotFoundError:
                return None
            self._fds[seg] = fd
            self._allocated[seg] = os.fstat(fd).st_size
            return fd

    def _preallocate(self, seg: int, fd: int, end: int) -> None:
        with self._lock:
            if end <= self._allocated.get(seg, 0):
                return
            want = min(self.segment_nbytes, -(-end // EXTENT_NBYTES) * EXTENT_NBYTES)
            try:
                os.posix_fallocate(fd, 0, want)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.ftruncate(fd, want)  # no preallocation here: a sparse file
            self._allocated[seg] = want

    def close(self) -> None:
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


def remove_class(disk_path: str | Path, slot_nbytes: int) -> None:
    """Delete the segment files of a slot size nothing refers to any more."""
    shutil.rmtree(class_dir(disk_path, slot_nbytes), ignore_errors=True)


def remove_all(disk_path: str | Path) -> None:
    """Delete every segment file (their index was lost: nothing can find them)."""
    shutil.rmtree(Path(disk_path) / SEGMENTS_DIR, ignore_errors=True)


def classes_on_disk(disk_path: str | Path) -> list[int]:
    """Slot sizes that have a segment directory."""
    root = Path(disk_path) / SEGMENTS_DIR
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def _supports_direct(directory: Path) -> bool:
    probe = directory / ".direct-probe"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        buf = aligned_empty(1, ALIGN).numpy().reshape(-1)
        os.pwrite(fd, buf.data, 0)
        return os.preadv(fd, [buf.data], 0) == ALIGN
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def direct_read_s(
    runs: list[tuple[int, int, int]],
    request_nbytes: int = 4 << 20,
    depths: tuple[int, ...] = (1, 4, 8),
) -> float:
    """Seconds to read the ranges ``runs`` (``(fd, offset, nbytes)``, the fds opened with
    ``O_DIRECT``, offsets and lengths aligned) in requests of at most ``request_nbytes``, in
    order, at the best of ``depths`` requests in flight."""
    reqs = [(fd, off + i, min(request_nbytes, n - i))
            for fd, off, n in runs for i in range(0, n, request_nbytes)]
    if not reqs:
        return 0.0
    best = float("inf")
    for depth in depths:
        def read(k: int, depth: int = depth) -> None:
            buf = aligned_empty(1, request_nbytes).numpy().reshape(-1)
            for fd, off, n in reqs[k::depth]:
                os.preadv(fd, [buf[:n].data], off)

        with ThreadPoolExecutor(depth) as pool:
            start = time.perf_counter()
            list(pool.map(read, range(depth)))
            best = min(best, time.perf_counter() - start)
    return best
