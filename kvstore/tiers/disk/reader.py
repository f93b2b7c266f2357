"""Reads of the disk tier: large ``O_DIRECT`` reads, several in flight, verified off the caller.

``DiskReader.submit(items, on_chunk)`` cuts the blocks to read (in the caller's order) into
chunks -- runs of consecutive slots of one segment file, at most ``chunk_bytes`` (one block at
least) -- and hands them to ``num_threads`` reader threads, in order, so the leading blocks of a
lease come back first. A thread reads its chunk with one ``preadv``: straight into the
destination rows when they are aligned and a block fills its slot, else into the thread's own
aligned bounce buffer and then into the rows. It then checks each block's crc32 and calls
``on_chunk(items, oks, cancelled)`` on the reader thread (``zlib.crc32`` and the copies release
the GIL, and the engine thread never verifies or copies a disk block). A chunk cancelled before
it started is reported (as failed, cancelled) by ``DiskRead.cancel``.

Measured on the 2-core machine (virtual disk; 176-512 MiB read after ``drop_caches``, medians of
three; ``bench/disk.py --layouts`` runs the comparison): LMDB values with ``readahead=False``
(the version 1 format) 0.05-0.07 GB/s; with readahead 0.5 GB/s; with readahead, ``WILLNEED``
and 4 threads 0.9-1.4 GB/s; these reads with 8 threads and 1 MiB chunks 1.3-1.9 GB/s against a
ceiling (``O_DIRECT``, 4 MiB, 4 in flight, no checksum) of 1.1-1.7 GB/s.

``ReadThrottle`` caps the read speed (``StoreConfig.disk_read_limit_bytes_per_s``): a slow disk
on purpose, for tests and benchmarks of load-versus-recompute.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass

import numpy as np

from kvstore.layout import aligned_empty
from kvstore.tiers.disk.format import ALIGN, checksum
from kvstore.tiers.disk.segments import SegmentFiles

logger = logging.getLogger(__name__)

DEFAULT_READ_THREADS = 8
DEFAULT_CHUNK_BYTES = 1 << 20


@dataclass(slots=True)
class ReadItem:
    pos: int  # position of the block in the caller's list
    slot: int  # its slot in the segment files
    crc: int  # expected crc32 of its payload
    row: np.ndarray  # uint8 [block_nbytes]: where its bytes go


ChunkDone = Callable[[list[ReadItem], list[bool], bool], None]  # (items, ok per item, cancelled)


class ReadThrottle:
    """At most ``bytes_per_s`` over all reader threads: a read of n bytes starts no earlier
    than n / bytes_per_s after the previous one was allowed to (a cancelled read stops
    waiting at once)."""

    def __init__(self, bytes_per_s: float) -> None:
        self.bytes_per_s = bytes_per_s
        self._lock = threading.Lock()
        self._next = 0.0

    def reserve(self, nbytes: int) -> float:
        """The time (``time.monotonic``) this read may start."""
        with self._lock:
            self._next = max(time.monotonic(), self._next) + nbytes / self.bytes_per_s
            return self._next


class DiskRead:
    """One ``submit``: its chunks, cancellable until they start."""

    def __init__(self, nbytes: int, on_finished: Callable[[DiskRead], None] | None) -> None:
        self.nbytes = nbytes
        self.started = time.perf_counter()
        self.finished: float | None = None
        self._futures: list[Future[None]] = []
        self.cancelled = threading.Event()
        self._left = 0
        self._lock = threading.Lock()
        self._on_finished = on_finished

    def cancel(self) -> None:
        """Cancel the chunks not started or throttled (they report their blocks as failed)."""
        self.cancelled.set()
        for f in self._futures:
            f.cancel()

    def wait(self, timeout_s: float | None = None) -> bool:
        _, pending = wait_futures(self._futures, timeout_s)
        return not pending

    def done(self) -> bool:
        return all(f.done() for f in self._futures)

    def _chunk_done(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self.finished = time.perf_counter()
            if self._on_finished is not None:
                self._on_finished(self)


class DiskReader:
    def __init__(
        self,
        segments: SegmentFiles,
        block_nbytes: int,
        *,
        num_threads: int = DEFAULT_READ_THREADS,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        limit_bytes_per_s: float = 0.0,
    ) -> None:
        if num_threads <= 0 or chunk_bytes <= 0 or limit_bytes_per_s < 0:
            raise ValueError("read threads and chunk bytes must be positive, the limit >= 0")
        self.segments = segments
        self.block_nbytes = block_nbytes
        self.slot_nbytes = segments.slot_nbytes
        self.chunk_blocks = max(1, chunk_bytes // self.slot_nbytes)
        self.throttle = ReadThrottle(limit_bytes_per_s) if limit_bytes_per_s > 0 else None
        self._pool = ThreadPoolExecutor(num_threads, "strata-disk-read")
        self._local = threading.local()
        self._stats_lock = threading.Lock()
        self.bytes_read = 0  # payload bytes of completed reads
        self.read_bytes_per_s: float | None = None  # moving average over submits of >= 1 MiB

    def submit(self, items: list[ReadItem], on_chunk: ChunkDone) -> DiskRead:
        read = DiskRead(len(items) * self.block_nbytes, self._finished)
        chunks = self._chunks(items)
        read._left = len(chunks)
        for chunk in chunks:
            future = self._pool.submit(self._run, chunk, on_chunk, read)
            future.add_done_callback(_report_cancelled(chunk, on_chunk, read))
            read._futures.append(future)
        return read

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ---- on a reader thread --------------------------------------------------------------------
    def _chunks(self, items: list[ReadItem]) -> list[list[ReadItem]]:
        segs = self.segments
        chunks: list[list[ReadItem]] = []
        for item in items:
            last = chunks[-1][-1] if chunks else None
            if (
                last is not None
                and item.slot == last.slot + 1
                and segs.segment_of(item.slot) == segs.segment_of(last.slot)
                and len(chunks[-1]) < self.chunk_blocks
            ):
                chunks[-1].append(item)
            else:
                chunks.append([item])
        return chunks

    def _run(self, chunk: list[ReadItem], on_chunk: ChunkDone, read: DiskRead) -> None:
        cancelled = False
        oks = [False] * len(chunk)
        try:
            if self.throttle is not None:
                wait = self.throttle.reserve(len(chunk) * self.block_nbytes) - time.monotonic()
                cancelled = wait > 0 and read.cancelled.wait(wait)
            cancelled = cancelled or read.cancelled.is_set()
            if not cancelled:
                oks = self._read(chunk)
        except Exception:  # an I/O error is a miss, never a crash
            logger.exception("disk read of %d block(s) failed", len(chunk))
        try:
            on_chunk(chunk, oks, cancelled)
        finally:
            read._chunk_done()

    def _read(self, chunk: list[ReadItem]) -> list[bool]:
        n, nb, slot_nb = len(chunk), self.block_nbytes, self.slot_nbytes
        rows = [item.row for item in chunk]
        direct = nb == slot_nb and (
            not self.segments.direct or all(r.ctypes.data % ALIGN == 0 for r in rows)
        )
        if direct:
            got = self.segments.read(chunk[0].slot, rows)
        else:
            bounce = self._bounce()[: n * slot_nb]
            got = self.segments.read(chunk[0].slot, [bounce])
            for i, row in enumerate(rows):
                row[:] = bounce[i * slot_nb : i * slot_nb + nb]
        oks = [got >= i * slot_nb + nb and checksum(r.data) == it.crc for i, (r, it) in
               enumerate(zip(rows, chunk))]
        with self._stats_lock:
            self.bytes_read += sum(oks) * nb
        return oks

    def _bounce(self) -> np.ndarray:
        buf = getattr(self._local, "bounce", None)
        if buf is None:
            buf = aligned_empty(1, self.chunk_blocks * self.slot_nbytes).numpy().reshape(-1)
            self._local.bounce = buf
        return buf

    def _finished(self, read: DiskRead) -> None:
        if read.nbytes < (1 << 20) or read.finished is None:
            return
        rate = read.nbytes / max(read.finished - read.started, 1e-9)
        with self._stats_lock:
            old = self.read_bytes_per_s
            self.read_bytes_per_s = rate if old is None else 0.2 * rate + 0.8 * old


def _report_cancelled(
    chunk: list[ReadItem], on_chunk: ChunkDone, read: DiskRead
) -> Callable[[Future[None]], None]:
    def done(future: Future[None]) -> None:
        if future.cancelled():
            try:
                on_chunk(chunk, [False] * len(chunk), True)
            finally:
                read._chunk_done()

    return done
