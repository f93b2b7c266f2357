"""KV transfer throughput between two processes, beside the machine's raw gRPC ceiling.

    python -m bench transfer [--total-mib 256] [--block-kib 32,512,2048] [--streams 1,2]

For every block size, the same bytes go from this process to a receiver in a child process
(as between two workers: no shared GIL), side by side in one run, settings interleaved:

- ``raw``: the ceiling — the same bytes as ``bytes`` messages of the frame size, built before
  the clock starts, on a gRPC stream with identity serializers; no Strata code on either side;
- ``protobuf``: the same bytes inside a protobuf message (``google.protobuf.BytesValue``), what a
  protobuf-typed block message costs (the receiver reads the field);
- ``grpc``: Strata's push (``kvtransfer``): each frame's blocks copied out of a pool-like slab (as
  the prefill worker copies them out of its KV pool), framed, streamed; the receiver hands each
  frame to its sink without a copy;
- ``shm``: the same push with the blocks written into the sender's shared-memory segment; the
  frames carry only slot offsets, the receiver copies the bytes out and acknowledges.

``--streams N`` runs N pushes at once over N channels (one request each, the bytes split between
them). The receiver's sink completes every write at once, so the figures are the transfer path,
not a store's write speed. GB/s = bytes / median seconds; fractions are of ``raw``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from concurrent.futures import Future
from typing import Any

import grpc
import numpy as np
from google.protobuf.wrappers_pb2 import BytesValue

from bench.common import (
    format_table,
    machine_info,
    parse_ints,
    progress,
    pyplot,
    report,
)
from kvstore.keys import BlockHash, hash_prompt_blocks
from kvtransfer import shm, wire
from kvtransfer.config import TransferConfig
from kvtransfer.receiver import KVReceiver, add_to_server
from kvtransfer.sender import KVSender

FP = b"B" * 16
SECRET = "bench"
RAW = "/bench.Raw/Push"
PROTO = "/bench.Raw/PushProto"
PATHS = ("raw", "protobuf", "grpc", "shm")


class NullSink:
    """Takes every block at once and keeps nothing but a count."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.nbytes = 0

    def has_blocks(self, hashes: Sequence[BlockHash]) -> list[bool]:
        return [False] * len(hashes)

    def write_blocks(
        self, req_id: str, hashes: list[BlockHash], data: memoryview, block_nbytes: int
    ) -> Future[int]:
        with self.lock:
            self.nbytes += len(data)
        fut: Future[int] = Future()
        fut.set_result(len(hashes))
        return fut

    def read_blocks(self, hashes: Sequence[BlockHash]) -> tuple[int, memoryview]:
        return 0, memoryview(b"")

    def transfer_done(self, req_id: str, ok: bool, first_token: int | None = None) -> None:
        pass


def _serve(port_q: Any, stop: Any) -> None:  # multiprocessing queue and event
    def raw(it: Iterator[bytes], ctx: grpc.ServicerContext) -> bytes:
        n = sum(len(m) for m in it)
        return n.to_bytes(8, "little")

    def proto(it: Iterator[BytesValue], ctx: grpc.ServicerContext) -> bytes:
        n = sum(len(m.value) for m in it)
        return n.to_bytes(8, "little")

    server = grpc.server(futures.ThreadPoolExecutor(16), options=wire.channel_options())
    handlers = {
        "Push": grpc.stream_unary_rpc_method_handler(raw),
        "PushProto": grpc.stream_unary_rpc_method_handler(
            proto, request_deserializer=BytesValue.FromString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Raw", handlers),))
    add_to_server(KVReceiver(NullSink(), FP, secret=SECRET), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_q.put(port)
    stop.wait()
    server.stop(0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.transfer", description=__doc__.split("\n")[0])
    p.add_argument("--total-mib", type=int, default=None, help="bytes per push (default 256)")
    p.add_argument("--block-kib", default=None, help="block sizes (default 32,512,2048)")
    p.add_argument("--frame-kib", type=int, default=wire.DEFAULT_FRAME_BYTES >> 10,
                   help="payload of a frame / size of a raw message")
    p.add_argument("--streams", default="1", help="concurrent pushes (channels), e.g. 1,2")
    p.add_argument("--repeats", type=int, default=None, help="pushes per setting (default 3)")
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="32 MiB, 2 repeats")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        total = (args.total_mib or (32 if args.quick else 256)) << 20
        blocks_kib = parse_ints(args.block_kib or "32,512,2048", "--block-kib")
        streams = parse_ints(args.streams, "--streams")
        repeats = args.repeats or (2 if args.quick else 3)
        result = run(args, total, blocks_kib, streams, repeats)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(args.out, "transfer", result, render_table, plot)
    return 0


class _Pusher:
    """One setting's pushes: the same bytes, ``streams`` at a time."""

    def __init__(self, addr: str, block_nbytes: int, frame_bytes: int, streams: int,
                 slab: np.ndarray) -> None:
        self.addr = addr
        self.block_nbytes = block_nbytes
        self.streams = streams
        self.slab = slab  # [num_blocks, block_nbytes]: the "pool" the blocks are copied from
        self.per_frame = wire.blocks_per_frame(block_nbytes, frame_bytes)
        self.frame_bytes = self.per_frame * block_nbytes
        self.channels = [grpc.insecure_channel(addr, options=[*wire.channel_options(),
                                                              ("grpc.channel_id", i)])
                         for i in range(streams)]
        shm_bytes = TransferConfig().shm_bytes if shm.free_bytes() else 0
        self.sender = KVSender(secret=SECRET, owner="bench-transfer", block_nbytes=block_nbytes,
                               frame_bytes=frame_bytes, shm_bytes=shm_bytes, num_channels=streams)
        self._rep = 0

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        self.sender.close()

    def run(self, path: str) -> float:
        n = self.slab.shape[0]
        parts = [range(i * n // self.streams, (i + 1) * n // self.streams)
                 for i in range(self.streams)]
        errors: list[BaseException] = []
        # The ceiling's messages are built before the clock starts, each from its own bytes.
        ready = [list(self._messages(parts[k])) if path == "raw" else [] for k in range(len(parts))]

        def one(k: int) -> None:
            try:
                if path == "raw":
                    self.channels[k].stream_unary(RAW)(iter(ready[k]), timeout=600)
                else:
                    getattr(self, f"_{path}")(k, parts[k])
            except BaseException as e:  # re-raised in the caller
                errors.append(e)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=(k,)) for k in range(self.streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return time.perf_counter() - t0

    def _messages(self, blocks: range) -> Iterator[bytes]:
        """The blocks' bytes as messages of the frame size, each its own ``bytes`` object."""
        data = self.slab[blocks.start : blocks.stop].reshape(-1)
        for start in range(0, data.size, self.frame_bytes):
            yield data[start : start + self.frame_bytes].tobytes()

    def _protobuf(self, k: int, blocks: range) -> None:
        msgs = [BytesValue(value=m) for m in self._messages(blocks)]
        call = self.channels[k].stream_unary(PROTO, request_serializer=BytesValue.SerializeToString)
        call(iter(msgs), timeout=600)

    def _grpc(self, k: int, blocks: range) -> None:
        self._push(k, blocks, use_shm=False)

    def _shm(self, k: int, blocks: range) -> None:
        if self.sender.segment is None:
            raise RuntimeError("no shared-memory segment on this machine")
        self._push(k, blocks, use_shm=True)

    def _push(self, k: int, blocks: range, use_shm: bool) -> None:
        self._rep += 1
        n = len(blocks)
        tokens = np.arange(16 * n) + (self._rep * 131 + k) * 1_000_003
        hashes = hash_prompt_blocks(tokens, 16, FP)  # fresh: nothing is ever held already
        session = self.sender.open_push(self.addr, f"bench-{self._rep}-{k}", FP, hashes, 600,
                                        use_shm=use_shm)
        if use_shm and not (session.wait_answer(60) and session.shm_ok):
            raise RuntimeError("the receiver did not map the shared-memory segment")
        seg = self.sender.segment
        for start in range(0, n, self.per_frame):
            idx = list(range(start, min(n, start + self.per_frame)))
            src = self.slab[blocks.start + idx[0] : blocks.start + idx[-1] + 1].reshape(-1)
            slot = seg.acquire(60) if use_shm and seg is not None else None
            if slot is not None and seg is not None:
                dst = np.frombuffer(seg.begin_write(slot, src.size), dtype=np.uint8)
                np.copyto(dst, src)  # the pool -> slot copy of the prefill worker
                session.add_shm(idx, slot, seg.end_write(slot), src.size)
            else:
                message, payload = session.new_frame(idx)
                np.copyto(np.frombuffer(payload, dtype=np.uint8), src)  # pool -> frame copy
                session.add_frame(idx, message)
        session.finish()
        res = session.wait(600)
        if res.num_sent != n:
            raise RuntimeError(f"push sent {res.num_sent} of {n} blocks")


def run(args: argparse.Namespace, total: int, blocks_kib: list[int], streams: list[int],
        repeats: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    port_q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_serve, args=(port_q, stop), daemon=True)
    proc.start()
    addr = f"127.0.0.1:{port_q.get(timeout=120)}"
    paths = [p for p in PATHS if p != "shm" or shm.free_bytes()]
    rows: list[dict[str, Any]] = []
    bar = progress(len(blocks_kib) * len(streams) * len(paths) * repeats, "transfer",
                   args.no_progress)
    try:
        for block_kib in blocks_kib:
            block_nbytes = block_kib << 10
            num_blocks = max(1, total // block_nbytes)
            slab = np.random.default_rng(0).integers(0, 255, (num_blocks, block_nbytes),
                                                     dtype=np.uint8)
            for nstreams in streams:
                pusher = _Pusher(addr, block_nbytes, args.frame_kib << 10, nstreams, slab)
                secs: dict[str, list[float]] = {p: [] for p in paths}
                try:
                    pusher.run("raw")  # warm-up: connections, threads
                    for _ in range(repeats):  # settings interleaved: drifts hit all alike
                        for path in paths:
                            secs[path].append(pusher.run(path))
                            bar.update(1)
                finally:
                    pusher.close()
                nbytes = num_blocks * block_nbytes
                raw = nbytes / statistics.median(secs["raw"]) / 1e9
                for path in paths:
                    gbps = nbytes / statistics.median(secs[path]) / 1e9
                    rows.append({"block_kib": block_kib, "streams": nstreams, "path": path,
                                 "num_blocks": num_blocks, "nbytes": nbytes,
                                 "seconds": secs[path], "gbps": gbps,
                                 "best_gbps": nbytes / min(secs[path]) / 1e9,
                                 "of_raw": gbps / raw})
    finally:
        bar.close()
        stop.set()
        proc.join(10)
    return {"benchmark": "transfer", "machine": machine_info(),
            "config": {"total_bytes": total, "block_kib": blocks_kib, "streams": streams,
                       "frame_kib": args.frame_kib, "repeats": repeats, "paths": paths,
                       "receiver": "child process"},
            "rows": rows}


def render_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    head = (f"KV transfer to a receiver in a {cfg['receiver']}, {cfg['total_bytes'] >> 20} MiB "
            f"a setting, frames of {cfg['frame_kib']} KiB, medians of {cfg['repeats']}; "
            "GB/s (fraction of raw)")
    table: dict[tuple[int, int], dict[str, str]] = {}
    for r in result["rows"]:
        cell = f"{r['gbps']:.2f} ({r['of_raw']:.2f})"
        table.setdefault((r["block_kib"], r["streams"]), {})[r["path"]] = cell
    rows = [[b, s, *(cells.get(p, "-") for p in cfg["paths"])]
            for (b, s), cells in table.items()]
    return head + "\n" + format_table(["block KiB", "streams", *cfg["paths"]], rows)


def plot(result: dict[str, Any], path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    cfg = result["config"]
    for i, p in enumerate(cfg["paths"]):
        for j, s in enumerate(cfg["streams"]):
            rs = [r for r in result["rows"] if r["path"] == p and r["streams"] == s]
            ax.plot([r["block_kib"] for r in rs], [r["gbps"] for r in rs],
                    "o-" if j == 0 else "s--", color=f"C{i}",
                    label=f"{p}, {s} stream{'s' if s > 1 else ''}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("block size (KiB)")
    ax.set_ylabel("GB/s (median)")
    ax.set_title("KV transfer between two processes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
