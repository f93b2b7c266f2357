"""Decode throughput at batch 1, 8, 32, 64 (in-process), beside the memory-bandwidth roofline.

    python -m bench.decode --model tiny --batches 1,8,32,64 --prompt-tokens 128 --steps 32

Per batch size: the requests are prefilled first (not timed), then the decode steps are timed:
tokens/s = batch / median step time (the
mean is in the JSON too). Roofline of one step = (the bytes a step reads: every weight once, but
of an untied embedding table only the batch's rows, + K/V bytes at the mean context) / measured
copy bandwidth (bytes read + written of a large tensor copy); ``fraction_of_weights_roofline``
counts the weights alone. On CUDA that is the HBM roofline; on a CPU the column is the
host-memory-bandwidth analogue and is named so. The tiered store is off here: decode does not
touch it.

``--start-service`` / ``--server HOST:PORT``: the same batches through the service. For each batch
size B, B streams are opened at once (prompt ``--prompt-tokens``, ``--steps`` + 1 tokens each)
by the asyncio client (``router.aio_client``: one thread for all B streams, so the client's own
CPU stays small beside the service on a small machine); the client records every token's
arrival. Decode tokens/s = the tokens arriving from the moment the last of the B streams got its
first token to the moment the first of the streams still decoding then got its last, over that
time: the steady state, the batch decoding together (before it some streams are still in
prefill, after it the batch drains; a stream the prefill worker took alone ahead of the others
may be done before it, so ``decoding_together`` says how many streams the window had).
ms/token = the median gap between a stream's tokens. With ``--with-inprocess`` the ratio compares
like with like: service tokens/s over that window against the in-process engine's tokens over the
summed time of its timed steps (its mean, not its median step; both are in the JSON), the engine
running with the decode worker's torch threads (its ``torch_threads`` stat: a node's cores are
shared among its workers, ``cluster.workers.share_cores``); the same in-process run with every
core is beside it (``inprocess_all_cores``, ``ratio_all_cores``). The
router's CPU per 1,000 tokens streamed is its process's CPU time over the batch (``Stats``:
``process_cpu_seconds``) / tokens; the client's beside it.
No roofline there: the client cannot see the worker's step.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from bench.common import (
    EngineSizes,
    add_run_flags,
    build_engine,
    builtin_vocab,
    format_table,
    machine_info,
    memory_copy_bandwidth,
    new_parser,
    parse_ints,
    progress,
    pyplot,
    random_prompt,
    report,
    run_salt,
    summarize,
)
from bench.service import server_target
from proto.errors import StrataError


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("bench.decode", __doc__)
    p.add_argument("--batches", default=None, help="batch sizes (default 1,8,32,64)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 128")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps (default 32)")
    add_run_flags(p, "32-token prompts, 8 steps")
    p.add_argument("--with-inprocess", action="store_true",
                   help="with --server/--start-service: time the in-process engine too, in the "
                        "same run, and report service / in-process tokens/s per batch")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        batches = parse_ints(args.batches or "1,8,32,64", "--batches")
        prompt_tokens = args.prompt_tokens or (32 if args.quick else 128)
        steps = args.steps or (8 if args.quick else 32)
        if args.server or args.start_service:
            max_b = max(batches)
            ctx = prompt_tokens + steps + 1
            sizes = EngineSizes(pool_tokens=max_b * (ctx + 32) + 256, host_tokens=0,
                                disk_tokens=0, max_model_len=ctx + 16,
                                max_batched_tokens=max(2048, prompt_tokens))
            local = run(args, batches, prompt_tokens, steps) if args.with_inprocess else None
            with server_target(args, sizes) as target:
                result = run_server(args, target.address, batches, prompt_tokens, steps)
            if local is not None:
                # the reference: the same engine alone, with the decode worker's threads (a
                # node's cores are shared among its workers), then with every core
                threads = result["config"]["decode_worker_threads"] or torch.get_num_threads()
                same = run(args, batches, prompt_tokens, steps, threads=threads)
                result["inprocess"] = same
                result["inprocess_all_cores"] = local
                result["service_over_inprocess"] = [
                    {"batch": s["batch"], "service_tokens_per_s": s["tokens_per_s"],
                     "inprocess_tokens_per_s": loc["mean_tokens_per_s"],
                     "inprocess_median_step_tokens_per_s": loc["tokens_per_s"],
                     "ratio": s["tokens_per_s"] / loc["mean_tokens_per_s"],
                     "inprocess_all_cores_tokens_per_s": full["mean_tokens_per_s"],
                     "ratio_all_cores": s["tokens_per_s"] / full["mean_tokens_per_s"]}
                    for s, loc, full in zip(result["rows"], same["rows"], local["rows"],
                                            strict=True)]
        elif args.with_inprocess:
            raise ValueError("--with-inprocess goes with --server or --start-service")
        else:
            result = run(args, batches, prompt_tokens, steps)
    except (ValueError, StrataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(args.out, "decode", result, render_table, plot)
    return 0


def run(
    args: argparse.Namespace, batches: list[int], prompt_tokens: int, steps: int,
    loaded: Any = None, threads: int | None = None, **engine_kw: Any,
) -> dict[str, Any]:
    """Decode rows of the in-process engine (``loaded``: a LoadedModel to share; ``threads``:
    torch intra-op threads for the run, default as they are; ``engine_kw``: further
    EngineConfig fields, e.g. ``cuda_graphs``)."""
    if threads is not None:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run(args, batches, prompt_tokens, steps, loaded, None, **engine_kw)
        finally:
            torch.set_num_threads(before)
    from engine.sampling import SamplingParams

    max_b = max(batches)
    ctx = prompt_tokens + steps + 1
    sizes = EngineSizes(pool_tokens=max_b * (ctx + 32) + 256, host_tokens=0, disk_tokens=0,
                        max_model_len=ctx + 16, max_batched_tokens=max(2048, prompt_tokens))
    engine = build_engine(args.model, args.dtype, sizes, None, loaded=loaded, max_num_seqs=max_b,
                          **engine_kw)
    try:
        dtype, device = engine.layout.dtype, engine.device
        bandwidth = memory_copy_bandwidth(dtype, device)
        weight_bytes, row_bytes = step_weight_bytes(engine.loaded.model)
        bytes_per_token = engine.layout.bytes_per_token
        sampling = SamplingParams(max_tokens=steps + 1, ignore_eos=True)
        vocab = engine.model_config.vocab_size
        bar = progress(len(batches) + 1, "decode", args.no_progress)
        _measure(engine, 1, prompt_tokens, sampling, vocab, seed=-1)  # warm-up
        bar.update(1)
        rows = []
        for b in batches:
            times = _measure(engine, b, prompt_tokens, sampling, vocab, args.seed + b)
            step_s = statistics.median(times)  # robust to a noisy neighbour on a shared machine
            mean_ctx = prompt_tokens + (len(times) + 1) / 2
            weights = weight_bytes + b * row_bytes
            step_bytes = weights + b * mean_ctx * bytes_per_token
            roof_step = step_bytes / (bandwidth * 1e9)
            rows.append({
                "batch": b, "steps": len(times), "step_s": times, "tokens_per_s": b / step_s,
                "ms_per_step": step_s * 1e3, "mean_tokens_per_s": b * len(times) / sum(times),
                "bytes_per_step": step_bytes, "weight_bytes_per_step": weights,
                "roofline_tokens_per_s": b / roof_step,
                "fraction_of_roofline": roof_step / step_s,
                "fraction_of_weights_roofline": weights / (bandwidth * 1e9) / step_s,
            })
            bar.update(1)
        bar.close()
        roof_name = "HBM roofline" if device.type == "cuda" else "host-memory-bandwidth analogue"
        return {
            "benchmark": "decode", "machine": machine_info(),
            "config": {"model": args.model, "dtype": str(dtype), "device": str(device),
                       "batches": batches, "prompt_tokens": prompt_tokens, "steps": steps,
                       "weight_bytes": weight_bytes, "kv_bytes_per_token": bytes_per_token,
                       "seed": args.seed,
                       "cuda_graphs": engine.runner.graphs is not None},
            "roofline": {"name": roof_name, "copy_bandwidth_gbps": bandwidth},
            "rows": rows,
        }
    finally:
        engine.close()


def step_weight_bytes(model: Any) -> tuple[int, int]:  # a CausalLM
    """(weight bytes one decode step reads whatever its batch, bytes per sequence on top): every
    parameter once, except an embedding table not tied to the LM head, of which a step reads
    one row per sequence."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    table = model.model.embed_tokens.weight
    row = table.shape[1] * table.element_size()
    if model.config.tie_word_embeddings:  # the LM head reads the whole table anyway
        return total, 0
    return total - table.numel() * table.element_size(), row


def run_server(args: argparse.Namespace, address: str, batches: list[int], prompt_tokens: int,
               steps: int) -> dict[str, Any]:
    return asyncio.run(_run_server(args, address, batches, prompt_tokens, steps))


async def _run_server(args: argparse.Namespace, address: str, batches: list[int],
                      prompt_tokens: int, steps: int) -> dict[str, Any]:
    from router.aio_client import AsyncStrataClient

    vocab = args.vocab_size or builtin_vocab(args.model)
    salt = run_salt()
    bar = progress(len(batches) + 1, "decode (server)", args.no_progress)
    rows = []
    async with AsyncStrataClient(address, token=args.token) as client:
        await _stream_batch(client, 1, prompt_tokens, steps, vocab, -1, salt)  # warm-up
        bar.update(1)
        for b in batches:
            cpu0, mine0 = await _router_cpu(client), time.process_time()
            arrivals = await _stream_batch(client, b, prompt_tokens, steps, vocab, args.seed + b,
                                           salt)
            cpu1, mine1 = await _router_cpu(client), time.process_time()
            # the steady state: from the last first token (before it, streams are still in
            # prefill) to the first last token of the streams still decoding then (after it,
            # the batch drains); a stream prefilled alone ahead of the rest may be done by then
            t0 = max(a[0] for a in arrivals)
            together = [a for a in arrivals if a[-1] > t0]
            if len(together) < max(1, b // 2):
                raise StrataError(f"batch {b}: only {len(together)} streams decoded together "
                                  f"(the prefill of the batch outlasted {steps} steps); raise "
                                  "--steps")
            t1 = min(a[-1] for a in together)
            steady = sum(1 for a in together for t in a if t0 < t <= t1)
            gaps = [y - x for a in arrivals for x, y in zip(a, a[1:])]
            tokens = sum(len(a) for a in arrivals)
            rows.append({
                "batch": b, "tokens": tokens, "steady_tokens": steady,
                "decoding_together": len(together),
                "steady_s": t1 - t0, "tokens_per_s": steady / (t1 - t0) if t1 > t0 else 0.0,
                "ms_per_token": statistics.median(gaps) * 1e3 if gaps else None,
                "tbt_s": summarize(gaps),
                "router_cpu_ms_per_1k_tokens": (cpu1 - cpu0) / tokens * 1e6
                if cpu0 is not None and cpu1 is not None else None,
                "client_cpu_ms_per_1k_tokens": (mine1 - mine0) / tokens * 1e6,
            })
            bar.update(1)
        stats = await client.stats()
    bar.close()
    threads = [int(s["torch_threads"]) for name, s in stats.items()
               if name.startswith("decode") and "torch_threads" in s]
    return {
        "benchmark": "decode", "machine": machine_info(),
        "config": {"mode": "server", "server": address, "model": args.model,
                   "batches": batches, "prompt_tokens": prompt_tokens, "steps": steps,
                   "seed": args.seed, "client": "asyncio",
                   "decode_worker_threads": min(threads) if threads else None},
        "rows": rows,
    }


async def _router_cpu(client: Any) -> float | None:  # AsyncStrataClient
    """The router process's CPU seconds so far: as its Stats say, or (a router that does not
    say) read from /proc when it runs on this machine; None otherwise."""
    cpu = (await client.stats()).get("router", {}).get("process_cpu_seconds")
    if cpu is not None:
        return float(cpu)
    return _proc_cpu_seconds("ray::RouterActor")


def _proc_cpu_seconds(title: str) -> float | None:
    """User + system CPU seconds of the one process on this machine whose title is ``title``."""
    import os

    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if not f.read(64).startswith(title.encode()):
                    continue
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


async def _stream_batch(client: Any, batch: int, prompt_tokens: int, steps: int, vocab: int,
                        seed: int, salt: str) -> list[list[float]]:
    """Open ``batch`` streams at once; each one's token arrival times (one entry a token)."""
    arrivals: list[list[float]] = [[] for _ in range(batch)]

    async def one(i: int) -> None:
        async for chunk in client.stream(
            prompt_token_ids=random_prompt(seed * 1009 + i, prompt_tokens, vocab),
            max_tokens=steps + 1, temperature=0.0, ignore_eos=True, cache_salt=salt,
            timeout=600.0,
        ):
            now = time.perf_counter()
            arrivals[i].extend([now] * len(chunk.token_ids))

    await asyncio.gather(*(one(i) for i in range(batch)))
    if any(len(a) != steps + 1 for a in arrivals):
        raise StrataError(f"a stream ended early: {[len(a) for a in arrivals]} tokens")
    return arrivals


def _measure(engine: Any, batch: int, prompt_tokens: int, sampling: Any, vocab: int,
             seed: int) -> list[float]:
    """Seconds of each decode step of ``batch`` requests, after their prefill."""
    base = f"dec-{seed}-{time.monotonic_ns()}"
    for i in range(batch):
        engine.add_request(f"{base}-{i}", random_prompt(seed * 1009 + i, prompt_tokens, vocab),
                           sampling)
    started: set[str] = set()
    while len(started) < batch:  # prefill (and any decode steps that ride along), untimed
        for out in engine.step():
            started.add(out.req_id)
    times: list[float] = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        if engine.step():
            times.append(time.perf_counter() - t0)
    return times


def render_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    if cfg.get("mode") == "server":
        rows = [[r["batch"], r.get("decoding_together"), r["tokens_per_s"], r["ms_per_token"],
                 r["tbt_s"].get("p90", 0) * 1e3, r.get("router_cpu_ms_per_1k_tokens"),
                 r.get("client_cpu_ms_per_1k_tokens")] for r in result["rows"]]
        out = (f"decode through the service at {cfg['server']}, {cfg['model']}, prompt "
               f"{cfg['prompt_tokens']} tokens, {cfg['steps'] + 1} tokens a stream "
               "(client side)\n" + format_table(["batch", "together", "tok/s", "ms/token",
                                                 "p90 ms",
                                                 "router CPU ms/1k tok", "client CPU ms/1k tok"],
                                                rows))
        if "inprocess" in result:
            ratio = [[r["batch"], r["service_tokens_per_s"], r["inprocess_tokens_per_s"],
                      r["ratio"], r.get("inprocess_all_cores_tokens_per_s"),
                      r.get("ratio_all_cores")] for r in result["service_over_inprocess"]]
            threads = result["inprocess"]["machine"]["torch_threads"]
            out += ("\n\n" + render_table(result["inprocess"])
                    + f"\n\nservice / in-process decode tokens/s, same run (in-process: "
                    f"{threads} thread(s) like the decode worker, then every core)\n"
                    + format_table(["batch", "service tok/s", "in-process tok/s", "ratio",
                                    "all cores tok/s", "ratio"], ratio))
        return out
    roof = result["roofline"]
    rows = [[r["batch"], r["tokens_per_s"], r["ms_per_step"], r["roofline_tokens_per_s"],
             r["fraction_of_roofline"], r.get("fraction_of_weights_roofline")]
            for r in result["rows"]]
    head = (f"decode, {cfg['model']} {cfg['dtype']} on {cfg['device']}, prompt "
            f"{cfg['prompt_tokens']} tokens; roofline = {roof['name']} "
            f"({roof['copy_bandwidth_gbps']:.1f} GB/s copy)")
    return head + "\n" + format_table(
        ["batch", "tok/s", "ms/step", "roofline tok/s", "of roofline", "of weights roofline"],
        rows)


def plot(result: dict[str, Any], path: str) -> None:
    plt = pyplot()
    rows = result["rows"]
    xs = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["tokens_per_s"] for r in rows], "o-", label="measured")
    if "inprocess" in result:
        ax.plot(xs, [r["tokens_per_s"] for r in result["inprocess"]["rows"]], "x:",
                label="in-process, same run")
    if "roofline" in result:
        ax.plot(xs, [r["roofline_tokens_per_s"] for r in rows], "--",
                label=result["roofline"]["name"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    where = "through the service" if result["config"].get("mode") == "server" else "in-process"
    ax.set_title(f"decode throughput, {result['config']['model']} ({where})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
