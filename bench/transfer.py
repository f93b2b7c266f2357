"""KV transfer throughput: push blocks to a ``KVTransfer`` server in another process; GB/s.

    python -m bench transfer [--total-mib 256] [--block-kib 32,2048] [--pack-kib 0,1024]

For every block size and packing limit (0: one gRPC message per block; N: whole blocks share a
message up to N KiB, the sender's default being ``proto.kv_wire.PACK_BYTES``), the same bytes are
pushed ``--repeats`` times, side by side in one run. The receiver runs in a child process (as
between two workers: no shared GIL; ``--same-process`` keeps it here) and its sink keeps only the
size of each block, so the figure is the wire plus (de)serialisation, not a store's write speed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.common import format_table, machine_info, parse_ints, progress, pyplot, report
from decode_worker.kv_receiver import start_kv_server
from kvstore.keys import BlockHash, hash_prompt_blocks
from prefill_worker.kv_sender import KVSender
from proto import kv_wire

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
            self.sizes.update((h, len(p)) for h, p in zip(hashes, payloads, strict=True))
        return len(hashes)

    def read_blocks(self, hashes: Sequence[BlockHash]) -> list[bytes | None]:
        return [None] * len(hashes)

    def transfer_done(self, req_id: str, ok: bool) -> None:
        pass


def _serve(port_q: Any, stop: Any) -> None:  # noqa: ANN401 - multiprocessing queue and event
    server, port = start_kv_server(SizeSink(), FP, secret=SECRET)
    port_q.put(port)
    stop.wait()
    server.stop(0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.transfer", description=__doc__.split("\n")[0])
    p.add_argument("--total-mib", type=int, default=None, help="bytes per push (default 256)")
    p.add_argument("--block-kib", default=None, help="block sizes (default 32,512,2048)")
    p.add_argument("--pack-kib", default=None,
                   help=f"packing limits, 0 = off (default 0,{kv_wire.PACK_BYTES >> 10})")
    p.add_argument("--chunk-kib", type=int, default=kv_wire.DEFAULT_CHUNK_BYTES >> 10)
    p.add_argument("--repeats", type=int, default=None, help="pushes per setting (default 3)")
    p.add_argument("--same-process", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="32 MiB, 2 repeats")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        total = (args.total_mib or (32 if args.quick else 256)) << 20
        blocks_kib = parse_ints(args.block_kib or "32,512,2048", "--block-kib")
        pack_kib = [int(x) for x in (args.pack_kib or f"0,{kv_wire.PACK_BYTES >> 10}").split(",")]
        if any(k < 0 for k in pack_kib):
            raise ValueError("--pack-kib must be >= 0")
        repeats = args.repeats or (2 if args.quick else 3)
        result = run(args, total, blocks_kib, pack_kib, repeats)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(args.out, "transfer", result, render_table, plot)
    return 0


def run(args: argparse.Namespace, total: int, blocks_kib: list[int], pack_kib: list[int],
        repeats: int) -> dict[str, Any]:
    if args.same_process:
        server, port = start_kv_server(SizeSink(), FP, secret=SECRET)
        proc = stop = None
    else:
        ctx = mp.get_context("spawn")
        port_q, stop = ctx.Queue(), ctx.Event()
        proc = ctx.Process(target=_serve, args=(port_q, stop), daemon=True)
        proc.start()
        port = port_q.get(timeout=60)
    addr = f"127.0.0.1:{port}"
    rows: list[dict[str, Any]] = []
    bar = progress(len(blocks_kib) * len(pack_kib) * repeats, "transfer", args.no_progress)
    rep_id = 0
    try:
        for block_kib in blocks_kib:
            block_nbytes = block_kib << 10
            num_blocks = max(1, total // block_nbytes)
            slab = np.random.default_rng(0).integers(0, 255, (num_blocks, block_nbytes),
                                                     dtype=np.uint8)
            payloads = [memoryview(slab[i]) for i in range(num_blocks)]
            senders = [KVSender(secret=SECRET, chunk_bytes=args.chunk_kib << 10,
                                pack_bytes=pack << 10) for pack in pack_kib]
            secs: list[list[float]] = [[] for _ in pack_kib]
            try:
                for _ in range(repeats):  # settings interleaved, so drifts hit all alike
                    for k, sender in enumerate(senders):
                        # fresh hashes every push, so QueryBlocks never lets a block be skipped
                        rep_id += 1
                        tokens = np.arange(16 * num_blocks) + rep_id * 1_000_003
                        hashes = hash_prompt_blocks(tokens, 16, FP)
                        t0 = time.perf_counter()
                        res = sender.push(addr, f"bench-{rep_id}", FP, hashes, payloads,
                                          deadline_s=600)
                        secs[k].append(time.perf_counter() - t0)
                        if res.num_sent != num_blocks:
                            raise RuntimeError(f"push sent {res.num_sent} of {num_blocks} blocks")
                        bar.update(1)
            finally:
                for sender in senders:
                    sender.close()
            nbytes = num_blocks * block_nbytes
            for pack, ss in zip(pack_kib, secs, strict=True):
                rows.append({"block_kib": block_kib, "pack_kib": pack, "num_blocks": num_blocks,
                             "nbytes": nbytes, "seconds": ss,
                             "gbps": nbytes / statistics.median(ss) / 1e9,
                             "best_gbps": nbytes / min(ss) / 1e9})
    finally:
        bar.close()
        if proc is None:
            server.stop(0)
        else:
            assert stop is not None
            stop.set()
            proc.join(10)
    return {"benchmark": "transfer", "machine": machine_info(),
            "config": {"total_bytes": total, "block_kib": blocks_kib, "pack_kib": pack_kib,
                       "chunk_kib": args.chunk_kib, "repeats": repeats,
                       "receiver": "this process" if args.same_process else "child process"},
            "rows": rows}


def render_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    head = (f"KV push over gRPC on loopback, receiver in a {cfg['receiver']}, "
            f"{cfg['total_bytes'] >> 20} MiB a push, medians of {cfg['repeats']}")
    rows = [[r["block_kib"], r["pack_kib"] or "off", r["num_blocks"], r["gbps"], r["best_gbps"]]
            for r in result["rows"]]
    return head + "\n" + format_table(["block KiB", "pack KiB", "blocks", "GB/s", "best GB/s"],
                                      rows)


def plot(result: dict[str, Any], path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, pack in enumerate(result["config"]["pack_kib"]):
        rs = [r for r in result["rows"] if r["pack_kib"] == pack]
        ax.plot([r["block_kib"] for r in rs], [r["gbps"] for r in rs], "o-", color=f"C{i}",
                label=f"pack {pack} KiB" if pack else "one message per block")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block size (KiB)")
    ax.set_ylabel("GB/s (median)")
    ax.set_title("KV push throughput over gRPC")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
