"""KV transfer throughput: push N MiB of blocks to a KVTransfer server and print GB/s.

    python -m bench.transfer --total-mib 256 --block-kib 2048 --chunk-kib 4096

The receiver runs in a child process by default (as between two workers, no shared GIL);
``--same-process`` runs it in this one. Its sink keeps only the size of each block, so the
number is the wire plus (de)serialisation, not a store's write speed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from decode_worker.kv_receiver import start_kv_server
from kvstore.keys import BlockHash, hash_prompt_blocks
from prefill_worker.kv_sender import KVSender

FP = b"B" * 16
SECRET = "bench"


class SizeSink:
    """Accepts blocks, keeps their sizes only."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sizes: dict[bytes, int] = {}

    def has_blocks(self, hashes: Sequence[BlockHash]) -> list[bool]:
        with self.lock:
            return [h in self.sizes for h in hashes]

    def write_blocks(self, req_id: str, hashes: list[BlockHash], payloads: list) -> int:
        with self.lock:
            self.sizes.update((h, len(p)) for h, p in zip(hashes, payloads))
        return len(hashes)

    def read_blocks(self, hashes: Sequence[BlockHash]) -> list[bytes | None]:
        return [None] * len(hashes)

    def transfer_done(self, req_id: str, ok: bool) -> None:
        pass


def _serve(port_q: Any, stop: Any) -> None:
    server, port = start_kv_server(SizeSink(), FP, secret=SECRET)
    port_q.put(port)
    stop.wait()
    server.stop(0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--total-mib", type=int, default=256)
    ap.add_argument("--block-kib", type=int, default=2048)
    ap.add_argument("--chunk-kib", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--same-process", action="store_true")
    args = ap.parse_args(argv)

    block_nbytes = args.block_kib << 10
    num_blocks = max(1, (args.total_mib << 20) // block_nbytes)
    slab = np.random.default_rng(0).integers(0, 255, (num_blocks, block_nbytes), dtype=np.uint8)
    payloads = [memoryview(slab[i]) for i in range(num_blocks)]

    if args.same_process:
        server, port = start_kv_server(SizeSink(), FP, secret=SECRET)
    else:
        ctx = mp.get_context("spawn")
        port_q, stop = ctx.Queue(), ctx.Event()
        proc = ctx.Process(target=_serve, args=(port_q, stop), daemon=True)
        proc.start()
        port = port_q.get(timeout=60)
    sender = KVSender(secret=SECRET, chunk_bytes=args.chunk_kib << 10)
    addr = f"127.0.0.1:{port}"
    print(
        f"{num_blocks} blocks x {args.block_kib} KiB, chunks of {args.chunk_kib} KiB, "
        f"receiver {'in this process' if args.same_process else 'in a child process'}"
    )
    try:
        for rep in range(args.repeats):
            # fresh hashes each repeat so QueryBlocks never lets a block be skipped
            tokens = np.arange(16 * num_blocks) + rep * 1_000_003
            hashes = hash_prompt_blocks(tokens, 16, FP)
            t0 = time.perf_counter()
            res = sender.push(addr, f"bench-{rep}", FP, hashes, payloads, deadline_s=600)
            dt = time.perf_counter() - t0
            assert res.num_sent == num_blocks, res
            print(
                f"repeat {rep}: {res.nbytes / 2**20:.0f} MiB in {dt:.3f} s = "
                f"{res.nbytes / dt / 1e9:.2f} GB/s"
            )
    finally:
        sender.close()
        if args.same_process:
            server.stop(0)
        else:
            stop.set()
            proc.join(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
