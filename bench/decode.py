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
may be done before it, so ``decoding_together`` says how many streams the window had; a window
shorter than ``--min-window-steps`` (16) is an error that asks for more ``--steps``: at batch 64
on 2 cores the prefill of the batch takes about 2 s, so through the service ``--steps`` defaults
to 256).
ms/token = the median gap between a stream's tokens. With ``--with-inprocess`` the ratio compares
like with like: service tokens/s over that window against the in-process engine's tokens over the
summed time of its timed steps (its mean, not its median step; both are in the JSON), the engine
running with the decode worker's torch threads (its ``torch_threads`` stat: a node's cores are
shared among its workers, ``cluster.workers.share_cores``); the same in-process run with every
core is beside it (``inprocess_all_cores``, ``ratio_all_cores``). The machine's speed drifts by
tens of percent within minutes, so the two are timed back to back: ``--rounds`` rounds (default
3) of, per batch, the in-process engine and then the service, each round with its own prompts;
the ratio per round, and the batch's figures are the median round's. Beside them, what the
decode worker's own engine took per step meanwhile (its ``engine_step_seconds`` /
``engine_steps`` stats, prefill steps included): when it equals the time between tokens, the
path adds nothing and the difference from in-process is the engine running slower in the
worker's process. The
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
    p.add_argument("--steps", type=int, default=None,
                   help="timed decode steps (default 32; through the service 256)")
    add_run_flags(p, "32-token prompts, 8 steps")
    p.add_argument("--with-inprocess", action="store_true",
                   help="with --server/--start-service: time the in-process engine too, in the "
                        "same run, and report service / in-process tokens/s per batch")
    p.add_argument("--min-window-steps", type=int, default=None,
                   help="through the service: the fewest steps the batch must decode together "
                        "(a shorter window is an error that asks for more --steps; default 16, "
                        "2 with --quick)")
    p.add_argument("--rounds", type=int, default=3,
                   help="with --with-inprocess: rounds of (in-process, service) per batch, "
                        "back to back; the ratio is the median round's (default 3)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        batches = parse_ints(args.batches or "1,8,32,64", "--batches")
        prompt_tokens = args.prompt_tokens or (32 if args.quick else 128)
        service = bool(args.server or args.start_service)
        # through the service the batch must decode together long after its prefill
        steps = args.steps or (8 if args.quick else 256 if service else 32)
        if args.min_window_steps is None:
            args.min_window_steps = 2 if args.quick else 16
        if service:
            max_b = max(batches)
            ctx = prompt_tokens + steps + 1
            sizes = EngineSizes(pool_tokens=max_b * (ctx + 32) + 256, host_tokens=0,
                                disk_tokens=0, max_model_len=ctx + 16,
                                max_batched_tokens=max(2048, prompt_tokens))
            if args.rounds < 1:
                raise ValueError("--rounds must be at least 1")
            local = run(args, batches, prompt_tokens, steps) if args.with_inprocess else None
            # the reference: the same engine alone, with the decode worker's threads (a node's
            # cores are shared among its workers), timed right before the service in each round
            ref = Reference(args, batches, prompt_tokens, steps) if local is not None else None
            try:
                with server_target(args, sizes) as target:
                    result = run_server(args, target.address, batches, prompt_tokens, steps, ref)
            finally:
                if ref is not None:
                    ref.close()
            if local is not None:
                assert ref is not None
                result["inprocess"] = ref.result()
                result["inprocess_all_cores"] = local
                result["service_over_inprocess"] = compare(result, local)
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
    bar = progress(len(batches) + 1, "decode", args.no_progress)
    ref = Reference(args, batches, prompt_tokens, steps, loaded, **engine_kw)
    try:
        bar.update(1)
        for b in batches:
            ref.measure(b, args.seed + b, threads)
            bar.update(1)
        bar.close()
        return ref.result()
    finally:
        ref.close()


class Reference:
    """The in-process engine, sized for ``batches``, warmed up; ``measure`` times one batch."""

    def __init__(
        self, args: argparse.Namespace, batches: list[int], prompt_tokens: int, steps: int,
        loaded: Any = None, **engine_kw: Any,
    ) -> None:
        from engine.sampling import SamplingParams

        self.args, self.batches, self.prompt_tokens = args, batches, prompt_tokens
        max_b = max(batches)
        ctx = prompt_tokens + steps + 1
        sizes = EngineSizes(pool_tokens=max_b * (ctx + 32) + 256, host_tokens=0, disk_tokens=0,
                            max_model_len=ctx + 16, max_batched_tokens=max(2048, prompt_tokens))
        self.engine = engine = build_engine(args.model, args.dtype, sizes, None, loaded=loaded,
                                            max_num_seqs=max_b, **engine_kw)
        self.bandwidth = memory_copy_bandwidth(engine.layout.dtype, engine.device)
        self.weight_bytes, self.row_bytes = step_weight_bytes(engine.loaded.model)
        self.sampling = SamplingParams(max_tokens=steps + 1, ignore_eos=True)
        self.vocab = engine.model_config.vocab_size
        self.rows: list[dict[str, Any]] = []
        _measure(engine, 1, prompt_tokens, self.sampling, self.vocab, seed=-1)  # warm-up

    def measure(self, b: int, seed: int, threads: int | None = None) -> dict[str, Any]:
        """Time batch ``b`` (with ``threads`` torch threads if given); its row, also kept."""
        before = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            times = _measure(self.engine, b, self.prompt_tokens, self.sampling, self.vocab, seed)
        finally:
            torch.set_num_threads(before)
        step_s = statistics.median(times)  # robust to a noisy neighbour on a shared machine
        mean_ctx = self.prompt_tokens + (len(times) + 1) / 2
        weights = self.weight_bytes + b * self.row_bytes
        step_bytes = weights + b * mean_ctx * self.engine.layout.bytes_per_token
        roof_step = step_bytes / (self.bandwidth * 1e9)
        row = {
            "batch": b, "steps": len(times), "step_s": times, "tokens_per_s": b / step_s,
            "ms_per_step": step_s * 1e3, "mean_tokens_per_s": b * len(times) / sum(times),
            "bytes_per_step": step_bytes, "weight_bytes_per_step": weights,
            "roofline_tokens_per_s": b / roof_step,
            "fraction_of_roofline": roof_step / step_s,
            "fraction_of_weights_roofline": weights / (self.bandwidth * 1e9) / step_s,
            "torch_threads": threads or before,
        }
        self.rows.append(row)
        return row

    def result(self) -> dict[str, Any]:
        engine, args = self.engine, self.args
        roof_name = "HBM roofline" if engine.device.type == "cuda" else (
            "host-memory-bandwidth analogue")
        machine = machine_info()
        if self.rows:
            machine["torch_threads"] = self.rows[-1]["torch_threads"]
        return {
            "benchmark": "decode", "machine": machine,
            "config": {"model": args.model, "dtype": str(engine.layout.dtype),
                       "device": str(engine.device), "batches": self.batches,
                       "prompt_tokens": self.prompt_tokens,
                       "steps": self.sampling.max_tokens - 1,
                       "weight_bytes": self.weight_bytes,
                       "kv_bytes_per_token": engine.layout.bytes_per_token,
                       "seed": args.seed, "cuda_graphs": engine.runner.graphs is not None},
            "roofline": {"name": roof_name, "copy_bandwidth_gbps": self.bandwidth},
            "rows": self.rows,
        }

    def close(self) -> None:
        self.engine.close()


def compare(result: dict[str, Any], local: dict[str, Any]) -> list[dict[str, Any]]:
    """Per batch: each round's service and in-process tokens/s (timed back to back) and their
    ratio; the batch's figures are the median round's (by ratio)."""
    out = []
    for b, full in zip(result["config"]["batches"], local["rows"], strict=True):
        rounds = [{"service_tokens_per_s": s["tokens_per_s"],
                   "inprocess_tokens_per_s": s["inprocess"]["mean_tokens_per_s"],
                   "inprocess_median_step_tokens_per_s": s["inprocess"]["tokens_per_s"],
                   "ratio": s["tokens_per_s"] / s["inprocess"]["mean_tokens_per_s"],
                   "worker_ms_per_step": s.get("worker_ms_per_step"),
                   "inprocess_ms_per_step": s["inprocess"]["ms_per_step"]}
                  for s in result["rounds"] if s["batch"] == b]
        mid = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]
        out.append({"batch": b, **mid, "rounds": rounds,
                    "inprocess_all_cores_tokens_per_s": full["mean_tokens_per_s"],
                    "ratio_all_cores": mid["service_tokens_per_s"] / full["mean_tokens_per_s"]})
    return out


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
               steps: int, ref: Reference | None = None) -> dict[str, Any]:
    return asyncio.run(_run_server(args, address, batches, prompt_tokens, steps, ref))


async def _run_server(args: argparse.Namespace, address: str, batches: list[int],
                      prompt_tokens: int, steps: int, ref: Reference | None) -> dict[str, Any]:
    from router.aio_client import AsyncStrataClient

    vocab = args.vocab_size or builtin_vocab(args.model)
    salt = run_salt()
    rounds = args.rounds if ref is not None else 1
    bar = progress(len(batches) * rounds + 1, "decode (server)", args.no_progress)
    rows = []
    async with AsyncStrataClient(address, token=args.token) as client:
        await _stream_batch(client, 1, prompt_tokens, steps, vocab, -1, salt)  # warm-up
        bar.update(1)
        threads = _decode_threads(await client.stats())
        for r, b in ((r, b) for r in range(rounds) for b in batches):
            seed = args.seed + b + 7919 * r  # each round its own prompts: no prefix hits
            # the in-process engine right before, with the decode worker's threads
            inproc = ref.measure(b, seed, threads) if ref is not None else None
            cpu0, mine0 = await _router_cpu(client), time.process_time()
            eng0 = await _engine_steps(client)
            arrivals = await _stream_batch(client, b, prompt_tokens, steps, vocab, seed, salt)
            eng1 = await _engine_steps(client)
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
            if steady < args.min_window_steps * len(together):
                raise StrataError(f"batch {b}: the batch decoded together for only "
                                  f"{steady // len(together)} steps (the prefill of the batch "
                                  f"took most of {steps} steps); raise --steps")
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
                # the decode workers' own engine steps meanwhile (prefill included): what the
                # engine took per step inside the service, against the in-process reference
                "worker_steps": eng1[0] - eng0[0],
                "worker_ms_per_step": (eng1[1] - eng0[1]) / (eng1[0] - eng0[0]) * 1e3
                if eng1[0] > eng0[0] else None,
                "round": r,
                **({"inprocess": {k: v for k, v in inproc.items() if k != "step_s"}}
                   if inproc is not None else {}),
            })
            bar.update(1)
    bar.close()
    by_batch = [[row for row in rows if row["batch"] == b] for b in batches]
    return {
        "benchmark": "decode", "machine": machine_info(),
        "config": {"mode": "server", "server": address, "model": args.model,
                   "batches": batches, "prompt_tokens": prompt_tokens, "steps": steps,
                   "seed": args.seed, "client": "asyncio", "rounds": rounds,
                   "decode_worker_threads": threads},
        # per batch, the round with the median tokens/s (every round is in "rounds")
        "rows": [sorted(rs, key=lambda row: row["tokens_per_s"])[len(rs) // 2]
                 for rs in by_batch],
        "rounds": rows,
    }


def _decode_threads(stats: dict[str, dict[str, float]]) -> int | None:
    """The decode workers' torch threads (the fewest), as their stats say."""
    threads = [int(s["torch_threads"]) for name, s in stats.items()
               if name.startswith("decode") and "torch_threads" in s]
    return min(threads) if threads else None


async def _engine_steps(client: Any) -> tuple[float, float]:  # AsyncStrataClient
    """Engine steps and their seconds so far, summed over the decode workers."""
    stats = await client.stats()
    rows = [s for name, s in stats.items() if name.startswith("decode")]
    return (sum(s.get("engine_steps", 0.0) for s in rows),
            sum(s.get("engine_step_seconds", 0.0) for s in rows))


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
                 r["tbt_s"].get("p90", 0) * 1e3, r.get("worker_ms_per_step"),
                 r.get("router_cpu_ms_per_1k_tokens"),
                 r.get("client_cpu_ms_per_1k_tokens")] for r in result["rows"]]
        out = (f"decode through the service at {cfg['server']}, {cfg['model']}, prompt "
               f"{cfg['prompt_tokens']} tokens, {cfg['steps'] + 1} tokens a stream "
               "(client side)\n" + format_table(["batch", "together", "tok/s", "ms/token",
                                                 "p90 ms", "worker ms/step",
                                                 "router CPU ms/1k tok", "client CPU ms/1k tok"],
                                                rows))
        if "inprocess" in result:
            ratio = [[r["batch"], r["service_tokens_per_s"], r["inprocess_tokens_per_s"],
                      r["ratio"], " ".join(f"{x['ratio']:.2f}" for x in r.get("rounds", [])),
                      r.get("worker_ms_per_step"), r.get("inprocess_ms_per_step"),
                      r.get("inprocess_all_cores_tokens_per_s"), r.get("ratio_all_cores")]
                     for r in result["service_over_inprocess"]]
            threads = result["inprocess"]["machine"]["torch_threads"]
            out += ("\n\n" + render_table(result["inprocess"])
                    + f"\n\nservice / in-process decode tokens/s, {cfg.get('rounds', 1)} "
                    f"rounds of the two back to back, the median round's figures (in-process: "
                    f"{threads} thread(s) like the decode worker; then every core, once)\n"
                    + format_table(["batch", "service tok/s", "in-process tok/s", "ratio",
                                    "each round", "worker ms/step", "in-process ms/step",
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
    if "service_over_inprocess" in result:
        ax.plot(xs, [r["inprocess_tokens_per_s"] for r in result["service_over_inprocess"]],
                "x:", label="in-process, same rounds")
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
