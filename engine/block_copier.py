"""Copies between the engine's KV pool and the store's slab rows, on copy lanes, behind fences.

- load (slab -> pool, a ``Lease``): on CUDA, one ``non_blocking`` host-to-device copy per run of
  consecutive slab rows into a device buffer, then one scatter kernel, on the load lane, in
  chunks of ``chunk_bytes`` (the slab is page-locked, so the copies run at link speed and the
  host does not wait); on a CPU, one ``index_copy_`` per run straight from the slab rows into
  the pool, every layer at once. No staging copy on the host either way.
- offload (pool -> slab, a ``Reservation``): on CUDA one gather kernel into a device buffer and
  one device-to-host copy per run, on the offload lane, ordered after the step that wrote the
  blocks; on a CPU one ``index_select`` per run straight into the slab rows, on the lane's
  thread. The next step does not wait for it.

Every copy holds a reference on its pool blocks until its fence completes, so they are never
freed and reused under it; the lease's slots stay pinned and the reservation's slots private
until then. ``poll`` (engine thread) finishes the copies whose fence completed: loaded blocks
join the prefix cache, reserved slots become readable, the references are dropped. Compute
waits for the loads before the step that reads them (``wait_loads``).

Loads are not split by layer: a block is block-major (all layers in one buffer), so layer ``l``
of a run of blocks is a strided set of 64 KiB pieces on the 8B shape, and pieces that small copy
at 11-15 GB/s against ~50 GB/s for whole 2 MiB blocks (TECH-NOTES) -- a layer pipeline would
lose more on the link than it hides.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.block_pool import BlockPool
from engine.fence import CopyEngine, Fence
from kvstore.keys import BlockHash
from kvstore.layout import KVLayout
from kvstore.lending import Lease, Reservation, runs
from kvstore.pool_copy import gather_blocks, scatter_blocks
from kvstore.store import TieredStore

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 256 << 20  # device buffer of one CUDA load or offload chunk


@dataclass(slots=True)
class _Copy:
    fence: Fence
    block_ids: list[int]  # pool blocks referenced until the fence completes (may be empty)
    lease: Lease | None = None  # load: the slab rows read
    hashes: list[BlockHash] = field(default_factory=list)  # load: prefix-cache keys of block_ids
    reservation: Reservation | None = None  # offload: the slab rows written
    keep: list[object] = field(default_factory=list)  # tensors that must outlive the copy


class BlockCopier:
    def __init__(
        self,
        pool_tensor: torch.Tensor,  # [L, NB, 2, bs, H, D]: every layer of the pool
        layout: KVLayout,
        block_pool: BlockPool,
        store: TieredStore,
        device: torch.device,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        self.pool_tensor = pool_tensor
        self.kv_caches = list(pool_tensor.unbind(0))
        self.layout = layout
        self.block_pool = block_pool
        self.store = store
        self.device = device
        self.chunk_blocks = max(1, chunk_bytes // layout.block_nbytes)
        self.copies = CopyEngine(device)
        self._pending: list[_Copy] = []
        self._unwaited_loads: list[Fence] = []
        self.num_loaded = 0  # blocks loaded (copies completed)
        self.num_offloaded = 0  # blocks offloaded (copies completed)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    # ---- issuing -------------------------------------------------------------------------
    def load(self, lease: Lease, block_ids: list[int], hashes: list[BlockHash]) -> None:
        """Copy the lease's rows into ``block_ids`` (which get ``hashes`` once it completed)."""
        assert len(block_ids) == lease.num_blocks == len(hashes)
        self.block_pool.touch(block_ids)
        work = self._to_pool_cuda if self.copies.is_cuda else self._to_pool_cpu
        keep: list[object] = []
        fence = self.copies.submit(
            "load", _keeping(keep, lambda: work(lease.base, lease.rows, block_ids))
        )
        self._pending.append(
            _Copy(fence, list(block_ids), lease=lease, hashes=list(hashes), keep=keep)
        )
        self._unwaited_loads.append(fence)

    def offload(self, res: Reservation, block_ids: list[int], *, hold: bool = True) -> Fence:
        """Copy pool blocks into the reservation's rows; ``commit`` follows its completion.

        ``hold``: reference the blocks until then (False only when the caller makes compute
        wait for the fence before the blocks can change, as a pool eviction does)."""
        assert len(block_ids) == res.num_blocks
        if hold:
            self.block_pool.touch(block_ids)
        work = self._to_rows_cuda if self.copies.is_cuda else self._to_rows_cpu
        keep: list[object] = []
        fence = self.copies.submit(
            "offload", _keeping(keep, lambda: work(block_ids, res.base, res.rows))
        )
        self._pending.append(
            _Copy(fence, list(block_ids) if hold else [], reservation=res, keep=keep)
        )
        return fence

    def wait_loads(self) -> None:
        """Compute after this waits for every load issued so far (CUDA: without blocking)."""
        fences, self._unwaited_loads = self._unwaited_loads, []
        for fence in fences:
            fence.make_compute_wait()

    # ---- completion ----------------------------------------------------------------------
    def poll(self) -> int:
        """Finish the copies whose fence completed; how many."""
        done: list[_Copy] = []
        still: list[_Copy] = []
        for copy in self._pending:
            (done if copy.fence.done() else still).append(copy)
        self._pending = still
        for copy in done:
            self._finish(copy)
        return len(done)

    def finish(self) -> None:
        """Wait for every copy under way and finish it."""
        self._unwaited_loads.clear()
        while self._pending:
            copy = self._pending.pop(0)
            try:
                copy.fence.wait()
            except Exception:  # _finish reads the error from the fence
                pass
            self._finish(copy)

    def _finish(self, copy: _Copy) -> None:
        err = copy.fence.error()
        if err is not None:
            logger.error("KV block copy failed: %r", err)
        if copy.lease is not None:
            if err is None:
                for block_id, h in zip(copy.block_ids, copy.hashes):
                    self.block_pool.cache_block(block_id, h)
                self.num_loaded += len(copy.block_ids)
            self.store.release(copy.lease)
        if copy.reservation is not None:
            if err is None:
                self.store.commit(copy.reservation)
                self.num_offloaded += copy.reservation.num_blocks
            else:
                self.store.cancel(copy.reservation)
        if copy.block_ids:
            self.block_pool.free(copy.block_ids)

    def close(self) -> None:
        self.finish()
        self.copies.close()

    # ---- the copies (run on a lane) ------------------------------------------------------
    def _shaped(self, base: torch.Tensor) -> torch.Tensor:
        # base: [R, block_nbytes] uint8 -> [R, L, 2, bs, H, D] in the model dtype (a view)
        return base.view(self.layout.dtype).view(base.shape[0], *self.layout.block_shape)

    def _to_pool_cpu(self, base: torch.Tensor, rows: list[int], block_ids: list[int]) -> None:
        src = self._shaped(base)
        for i, row, n in runs(rows):
            idx = torch.tensor(block_ids[i : i + n], dtype=torch.int64)
            # pool: [L, NB, ...] <- src[row:row+n]: [n, L, ...] seen as [L, n, ...]
            self.pool_tensor.index_copy_(1, idx, src[row : row + n].transpose(0, 1))

    def _to_rows_cpu(self, block_ids: list[int], base: torch.Tensor, rows: list[int]) -> None:
        dst = self._shaped(base)
        for i, row, n in runs(rows):
            idx = torch.tensor(block_ids[i : i + n], dtype=torch.int64)
            torch.index_select(self.pool_tensor, 1, idx, out=dst[row : row + n].transpose(0, 1))

    def _device_ids(self, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        host = torch.tensor(block_ids, dtype=torch.int64).pin_memory()
        return host, host.to(self.device, non_blocking=True)

    def _to_pool_cuda(
        self, base: torch.Tensor, rows: list[int], block_ids: list[int]
    ) -> list[object]:
        n = len(block_ids)
        chunk = min(n, self.chunk_blocks)
        buf = torch.empty((chunk, self.layout.block_nbytes), dtype=torch.uint8, device=self.device)
        ids_host, ids_dev = self._device_ids(block_ids)
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            for i, row, k in runs(rows[c0:c1]):
                buf[i : i + k].copy_(base[row : row + k], non_blocking=True)
            src = self._shaped(buf[: c1 - c0])
            scatter_blocks(self.kv_caches, ids_dev[c0:c1], src, self.layout)
        return [buf, ids_host, ids_dev]

    def _to_rows_cuda(
        self, block_ids: list[int], base: torch.Tensor, rows: list[int]
    ) -> list[object]:
        n = len(block_ids)
        chunk = min(n, self.chunk_blocks)
        buf = torch.empty((chunk, self.layout.block_nbytes), dtype=torch.uint8, device=self.device)
        ids_host, ids_dev = self._device_ids(block_ids)
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            dst = self._shaped(buf[: c1 - c0])
            gather_blocks(self.kv_caches, ids_dev[c0:c1], dst, self.layout)
            for i, row, k in runs(rows[c0:c1]):
                base[row : row + k].copy_(buf[i : i + k], non_blocking=True)
        return [buf, ids_host, ids_dev]


def _keeping(keep: list[object], fn: Callable[[], list[object] | None]) -> Callable[[], None]:
    """``fn`` whose returned tensors are kept (in ``keep``) until the copy's record is dropped."""

    def run() -> None:
        out = fn()
        if out:
            keep.extend(out)

    return run
