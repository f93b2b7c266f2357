"""Long-context TTFT: cold versus warm from each tier, with each tier's bandwidth floor.

    python -m bench.ttft --model tiny --lengths 1024,4096,16384 [--repeats 3] [--out DIR] [--quick]
    python -m bench.ttft --model llama-3.2-1b --lengths 1024,2048
    python -m bench.ttft --server 127.0.0.1:50051 --lengths 1024,4096
    python -m bench.ttft --start-service --with-inprocess --lengths 1024,4096,16384
    python -m bench.ttft --start-service --colocated --lengths 2048,4096,8192,16384

In-process: one ``LLMEngine`` over a ``TieredStore`` (host slab + LMDB in a temporary directory,
sized so every prompt fits). For every length and repeat a fresh random prompt (nothing leaks
between measurements) is timed (``RequestResult.ttft_s``, one generated token):

- cold: nothing cached;
- device: the same prompt again, its blocks still in the pool;
- host: the pool's free cached blocks evicted first, so the prefix loads from the host slab;
- disk: the host tier emptied too (blocks on disk only). The disk tier reads with ``O_DIRECT``,
  so its data never comes from the page cache; where the filesystem refuses ``O_DIRECT`` the
  whole page cache is dropped before each warm-disk run (root). The JSON's
  ``config.disk_cache`` says which, and the table says so when the reads may have come from
  the page cache.

Every warm run must be served by the tier it claims, and its first token's logits must pass the
gate against the cold run's (``bench.logits_gate``: the cold top-1 among the warm top-k, the
largest logit difference within a tolerance; bit-identical in deterministic mode); the
benchmark aborts otherwise (a warm-disk run may compute part of its prefix: the engine's
load-or-recompute split, ``kvstore.cost``; "disk loaded" says how much it read). Floor of a warm
run = KV bytes of the cached prefix / the measured bandwidth of its tier (device: a large copy
in the pool's dtype; host: the store's probe; disk: the device's own ``O_DIRECT`` sequential
read speed, ``kvstore.bandwidth.device_read_ceiling``, with the tier's probe beside it).
"(disk-host)/floor" is warm-disk minus warm-host over the ``O_DIRECT`` floor of the bytes read
at the device's ceiling speed (measured once, on a 256 MiB scratch file); "re-read" is the floor
of the same bytes measured again right after each warm-disk run (``DiskTier.
direct_read_floor_s``: those blocks' slots read raw with ``O_DIRECT``, best of queue depths
1/4/8): a shared virtual disk's speed moves by tens of percent within minutes, and a read of
tens of MiB does not reach a long read's speed, so "(disk-host)/re-read" compares the load with
the device's speed at that moment on those bytes. Both are in the table and the JSON.
``--server`` sends the same prompts through a running service (client-side TTFT, cold and warm);
``--start-service`` starts one for the run and times every tier through it (``bench.ttft_server``);
``--with-inprocess`` adds the in-process run to either, so the service's overhead is a ratio
measured in the same run. Through a service, fresh prompts are also streamed with a few tokens
each to time the prefill -> decode handoff (``bench.handoff``: the gap between the first and the
second token against the later per-token time); ``--colocated`` streams the same prompts through
a second, colocated service (one worker prefills and decodes) for the side-by-side.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from bench import handoff
from bench.common import (
    BenchmarkError,
    EngineSizes,
    add_run_flags,
    build_engine,
    format_table,
    kv_bytes,
    machine_info,
    memory_copy_bandwidth,
    new_parser,
    parse_ints,
    progress,
    pyplot,
    random_prompt,
    report,
)
from bench.handoff import HANDOFF_TOKENS
from bench.logits_gate import check_warm_logits, logit_gap
from bench.service import server_target
from kvstore.bandwidth import (
    device_read_ceiling,
    drop_os_caches,
)
from proto.errors import StrataError
from proto.vocab import Tier

MODES = ("cold", "device", "host", "disk")
DEFAULT_LENGTHS = "1024,4096,16384"
QUICK_LENGTHS = "256,1024"


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("bench.ttft", __doc__)
    p.add_argument("--lengths", default=None, help=f"prompt lengths (default {DEFAULT_LENGTHS})")
    p.add_argument("--repeats", type=int, default=None, help="runs per length (default 3)")
    p.add_argument("--max-batched-tokens", type=int, default=2048, help="prefill chunk size")
    add_run_flags(p, f"lengths {QUICK_LENGTHS}, 1 repeat")
    p.add_argument("--with-inprocess", action="store_true",
                   help="with --server/--start-service: time the in-process engine too, in the "
                        "same run, and report the service's overhead")
    p.add_argument("--colocated", action="store_true",
                   help="with --start-service: also stream the handoff prompts through a "
                        "colocated service (one worker prefills and decodes, no transfer)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        lengths = parse_ints(args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS),
                             "--lengths")
        repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
        if repeats < 1:
            raise ValueError("--repeats must be at least 1")
        if not args.server:  # a running service checks its own context window
            from bench.service import check_lengths

            check_lengths(args.model, lengths)
        if args.server or args.start_service:
            from bench.ttft_server import run_handoff_only, run_server

            if args.colocated and not args.start_service:
                raise ValueError("--colocated goes with --start-service")
            local = run_inprocess(args, lengths, repeats) if args.with_inprocess else None
            sizes = _sizes(args, lengths, repeats)
            with server_target(args, sizes) as target:
                result = run_server(args, target, lengths, repeats)
            if args.colocated:
                from bench.service import local_service

                with local_service(args.model, args.dtype, sizes, num_prefill=0) as colo:
                    result["colocated"] = run_handoff_only(args, colo, lengths, repeats,
                                                           "colocated")
            if local is not None:
                result["inprocess"] = local
                result["service_over_inprocess"] = _overhead(result, local)
        elif args.with_inprocess:
            raise ValueError("--with-inprocess goes with --server or --start-service")
        else:
            result = run_inprocess(args, lengths, repeats)
    except (ValueError, BenchmarkError, StrataError) as e:  # StrataError: --server failed
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(args.out, "ttft", result, render_table, plot)
    return 0


def _overhead(served: dict[str, Any], local: dict[str, Any]) -> list[dict[str, Any]]:
    """Per length: service TTFT - in-process TTFT (ms) and their ratio, cold and warm."""
    rows = []
    for srv, loc in zip(served["summary"], local["summary"], strict=True):
        row: dict[str, Any] = {"length": srv["length"]}
        for mode in served["config"]["modes"]:
            loc_mode = "device" if mode == "warm" else mode
            row[f"{mode}_extra_ms"] = (srv[f"{mode}_s"] - loc[f"{loc_mode}_s"]) * 1e3
            row[f"{mode}_ratio"] = srv[f"{mode}_s"] / loc[f"{loc_mode}_s"]
        rows.append(row)
    return rows


def _sizes(args: argparse.Namespace, lengths: list[int], repeats: int) -> EngineSizes:
    longest = max(lengths)
    total = sum(lengths) * repeats + 4 * longest  # every prompt (plus warm-up) fits host and disk
    return EngineSizes(
        pool_tokens=2 * (longest + 2) + 64, host_tokens=total, disk_tokens=2 * total,
        # through the service each prompt gets up to HANDOFF_TOKENS tokens (the handoff streams)
        max_model_len=longest + HANDOFF_TOKENS, max_batched_tokens=args.max_batched_tokens,
    )


# ---------------------------------------------------------------------------- in-process
def run_inprocess(
    args: argparse.Namespace, lengths: list[int], repeats: int, *,
    sizes: EngineSizes | None = None, loaded: Any = None, clear: bool = False,
    peer: Any = None, modes: tuple[str, ...] = MODES,
    warmup_length: int | None = None, engine_kw: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Cold and warm TTFT of every length in-process. ``sizes``/``loaded``: the engine's sizes
    and a LoadedModel to share; ``clear``: drop each prompt's blocks from every tier after its
    cycle (tiers sized for one prompt at a time); ``peer(prompt) -> (seconds, first token)``
    times another implementation on the same prompt just before its cold run; ``modes``: cold
    and the warm tiers to time (all four by default); ``warmup_length``: of the untimed first
    cycle (default the shortest length); ``engine_kw``: further EngineConfig fields."""
    from engine.sampling import SamplingParams

    sizes = sizes or _sizes(args, lengths, repeats)
    sampling = SamplingParams(max_tokens=1)
    with tempfile.TemporaryDirectory(prefix="strata-bench-ttft-") as disk_dir:
        engine = build_engine(args.model, args.dtype, sizes, disk_dir, loaded=loaded,
                              store_kw={"persist_on_close": False, "disk_write_queue_blocks":
                                        max(64, (256 << 20) // _block_nbytes(args, loaded))},
                              **(engine_kw or {}))
        try:
            assert engine.store is not None and engine.store.tier(Tier.DISK), "store tiers missing"
            bandwidth, disk_cache = _floors(engine, disk_dir)
            vocab = engine.model_config.vocab_size
            bar = progress((repeats * len(lengths) + 1) * len(modes), "ttft", args.no_progress)
            # Warm-up cycle (first-call costs of every path), not recorded.
            warm_up = random_prompt(-1, warmup_length or min(lengths), vocab)
            if peer is not None:
                peer(warm_up)
            _cycle(engine, warm_up, sampling, bar, clear, modes)
            samples: list[dict[str, Any]] = []
            for rep in range(repeats):
                for length in lengths:
                    seed = args.seed * 1_000_003 + rep * 7919 + length
                    prompt = random_prompt(seed, length, vocab)
                    if peer is not None:
                        peer_s, peer_token = peer(prompt)
                        samples.append({"length": length, "repeat": rep, "mode": "peer",
                                        "ttft_s": peer_s, "output_token_ids": [peer_token]})
                    for mode, res, gap, reread in _cycle(engine, prompt, sampling, bar, clear,
                                                         modes):
                        samples.append({
                            "length": length, "repeat": rep, "mode": mode, "ttft_s": res.ttft_s,
                            "num_cached_tokens": res.num_cached_tokens,
                            "cached_by_tier": res.cached_by_tier, "load_s": res.load_s,
                            "output_token_ids": res.output_token_ids,
                            **({"logits": gap} if gap else {}),
                            **({"disk_reread_floor_s": reread} if reread is not None else {}),
                        })
            bar.close()
            summary = _summarize(engine, lengths, samples, bandwidth)
            config = {
                "mode": "in-process", "model": args.model, "dtype": str(engine.layout.dtype),
                "device": str(engine.device), "lengths": lengths, "repeats": repeats,
                "block_size": engine.block_size, "block_nbytes": engine.layout.block_nbytes,
                "pool_blocks": engine.num_blocks, "max_batched_tokens": args.max_batched_tokens,
                "host_capacity_bytes": engine.store.config.host_capacity_bytes,
                "disk_capacity_bytes": engine.store.config.disk_capacity_bytes,
                "seed": args.seed, "generated_tokens": sampling.max_tokens,
                "disk_cache": disk_cache,
            }
        finally:
            engine.close()
    return {
        "benchmark": "ttft", "machine": machine_info(), "config": config,
        "bandwidth_gbps": bandwidth, "samples": samples, "summary": summary,
    }


def _floors(engine: Any, disk_dir: str) -> tuple[dict[str, float], dict[str, Any]]:
    """GB/s per tier for the floors, and how the disk runs reach the device. The disk floor is
    the device's own ``O_DIRECT`` sequential read speed (``bandwidth["disk"]``); the tier's probe
    (its reads, checksums and copies) is ``disk_tier``. The engine starts from the probes, as a
    worker does (``kvstore.cost`` then follows what it observes)."""
    store = engine.store
    probe_blocks = max(64, (32 << 20) // engine.layout.block_nbytes)  # past the CPU caches
    tiers = dict(store.measure_bandwidth(num_blocks=probe_blocks))
    bandwidth = {"host": tiers["host"], "disk_tier": tiers["disk"]}
    try:
        bandwidth["disk"] = device_read_ceiling(disk_dir)
        floor = "O_DIRECT sequential reads of a scratch file, best of queue depths 1/4/8"
    except OSError as e:
        bandwidth["disk"] = tiers["disk"]
        floor = f"the tier's probe (O_DIRECT refused here: {e})"
    bandwidth["device"] = memory_copy_bandwidth(engine.layout.dtype, engine.device)
    for tier in ("host", "disk"):
        engine.kv.speeds.set_tier(tier, tiers[tier] * 1e9)
    if store.reads_bypass_page_cache:  # the data never enters the page cache: nothing to drop
        dropped, honest = "nothing needed: O_DIRECT reads (the store's files fadvised out)", True
    elif drop_os_caches():
        dropped, honest = "drop_caches (echo 3) before each warm-disk run", True
    else:
        dropped, honest = "POSIX_FADV_DONTNEED on the store's files only (not root)", False
    disk_cache = {"reads": store.disk_read_method(), "dropped_before_disk_runs": dropped,
                  "disk_floor": floor, "honest": honest}
    return bandwidth, disk_cache


def _block_nbytes(args: argparse.Namespace, loaded: Any) -> int:
    from bench.service import model_shape

    if loaded is not None:
        mc = loaded.config
        return 16 * 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * loaded.dtype.itemsize
    return 16 * model_shape(args.model, args.dtype)[1]


def _cycle(engine: Any, prompt: list[int], sampling: Any, bar: Any,
           clear: bool = False, modes: tuple[str, ...] = MODES,
           ) -> list[tuple[str, Any, dict[str, Any], float | None]]:
    """Cold, then warm from device, host and disk; each run checked before it counts (tier,
    logits gate); each with its logits' gap to the cold run's (empty for the cold run) and, for
    a disk run, the raw ``O_DIRECT`` re-read time of the blocks it loaded (else None)."""
    store = engine.store
    hashes = engine.block_hashes(prompt)
    num_hit = (len(prompt) - 1) // engine.block_size  # leading blocks a warm run can reuse
    exact = engine.config.deterministic
    if exact:  # prefix hits count in whole chunks
        grid = engine.config.max_num_batched_tokens // engine.block_size
        num_hit = num_hit // grid * grid
    expect_tokens = num_hit * engine.block_size
    engine.runner.keep_logits = True
    out: list[tuple[str, Any, dict[str, Any], float | None]] = []
    cold = cold_logits = None
    for mode in modes:
        if mode == "host":
            engine.kv.evict_all_free()
            _expect_lookup(store, hashes[:num_hit], Tier.HOST)
        elif mode == "disk":
            engine.kv.evict_all_free()
            store.demote(Tier.DISK)  # the host's blocks written down, its pages dropped
            _expect_lookup(store, hashes[:num_hit], Tier.DISK)
            if not store.reads_bypass_page_cache:  # buffered reads: only an empty page cache
                drop_os_caches()  # is honest
        store.flush()  # no write-behind traffic during the timed run
        res = engine.generate([prompt], sampling)[0]
        logits = engine.runner.kept_logits.pop(res.req_id)[0]
        gap: dict[str, Any] = {}
        if mode == "cold":
            cold, cold_logits = res, logits
            if res.num_cached_tokens:
                raise BenchmarkError(
                    f"cold run of {len(prompt)} tokens found {res.cached_by_tier} cached: "
                    "prompts must be distinct")
        else:
            assert cold is not None
            want = {mode: expect_tokens} if expect_tokens else {}
            if mode == "disk" and set(res.cached_by_tier) <= {"disk"}:
                want = res.cached_by_tier  # the engine may compute part (kvstore.cost's split)
            if res.cached_by_tier != want:
                raise BenchmarkError(
                    f"warm-{mode} run of {len(prompt)} tokens was served by {res.cached_by_tier}, "
                    f"expected {want}")
            why = check_warm_logits(cold_logits, logits, str(engine.layout.dtype), exact)
            if why is not None:
                raise BenchmarkError(f"warm-{mode} run of {len(prompt)} tokens: {why}")
            gap = logit_gap(cold_logits, logits)
        reread = None
        n_disk = res.cached_by_tier.get("disk", 0) // engine.block_size
        if mode == "disk" and n_disk and store.disk is not None:
            # the floor of exactly the bytes this run read, read raw right after it (a split
            # computed the head: the tail was loaded)
            reread = store.disk.direct_read_floor_s(hashes[num_hit - n_disk : num_hit])
        out.append((mode, res, gap, reread))
        bar.update(1)
    engine.runner.keep_logits = False
    if clear:  # leave nothing of this prompt in any tier
        engine.kv.evict_all_free()
        store.remove(hashes)
        store.flush()
    return out


def _expect_lookup(store: Any, hashes: list[Any], tier: str) -> None:
    tiers = store.lookup(hashes)
    if len(tiers) != len(hashes) or any(t != tier for t in tiers):
        found = {t: tiers.count(t) for t in set(tiers)}
        raise BenchmarkError(
            f"before the warm-{tier} run the store holds {found} of {len(hashes)} blocks; "
            f"expected all on {tier}")


def _summarize(
    engine: Any, lengths: list[int], samples: list[dict[str, Any]], bandwidth: dict[str, float]
) -> list[dict[str, Any]]:
    rows = []
    for length in lengths:
        row: dict[str, Any] = {"length": length}
        cached = ((length - 1) // engine.block_size) * engine.block_size
        row["cached_tokens"] = cached
        row["kv_bytes"] = kv_bytes(engine, cached)
        for mode in MODES:
            xs = [s["ttft_s"] for s in samples if s["length"] == length and s["mode"] == mode]
            row[f"{mode}_s"] = statistics.median(xs) if xs else None
        for tier in [m for m in MODES[1:] if row[f"{m}_s"] is not None]:
            floor = row["kv_bytes"] / (bandwidth[tier] * 1e9)
            row[f"{tier}_floor_s"] = floor
            row[f"{tier}_over_floor"] = row[f"{tier}_s"] / floor if floor > 0 else None
            row[f"{tier}_over_cold"] = row[f"{tier}_s"] / row["cold_s"]
        # what the disk runs read (the rest they computed, kvstore.cost's split), and the goal:
        # warm-disk - warm-host against the O_DIRECT floor of those bytes
        loaded = [s["cached_by_tier"].get("disk", 0) for s in samples
                  if s["length"] == length and s["mode"] == "disk"]
        if loaded and row["host_s"] is not None:  # (no disk runs: bench gpu's long prompts)
            row["disk_loaded_tokens"] = statistics.median(loaded)
            read_floor = kv_bytes(engine, int(row["disk_loaded_tokens"])) / (
                bandwidth["disk"] * 1e9)
            row["disk_read_floor_s"] = read_floor
            row["disk_minus_host_over_floor"] = (
                (row["disk_s"] - row["host_s"]) / read_floor if read_floor > 0 else None)
            rereads = [s["disk_reread_floor_s"] for s in samples if s["length"] == length
                       and s["mode"] == "disk" and "disk_reread_floor_s" in s]
            row["disk_load_s"] = statistics.median(  # start of the load to its last arrival
                s["load_s"] for s in samples if s["length"] == length and s["mode"] == "disk")
            if rereads:  # the same bytes read raw right after each run: the device's speed then
                row["disk_reread_floor_s"] = statistics.median(rereads)
                row["disk_minus_host_over_reread_floor"] = (
                    (row["disk_s"] - row["host_s"]) / row["disk_reread_floor_s"])
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- output
def render_table(result: dict[str, Any]) -> str:
    cfg, bw = result["config"], result["bandwidth_gbps"]
    head = f"TTFT, model {cfg['model']} ({cfg['mode']}), medians of {cfg['repeats']} run(s)"
    if cfg["mode"] == "server":
        headers, rows = ["tokens", "cold ms"], []
        for mode in cfg["modes"][1:]:
            headers += [f"{mode} ms", "/cold", "x floor", "served by"]
        for r in result["summary"]:
            row: list[object] = [r["length"], r["cold_s"] * 1e3]
            for mode in cfg["modes"][1:]:
                row += [r[f"{mode}_s"] * 1e3, r[f"{mode}_over_cold"], r.get(f"{mode}_over_floor"),
                        ",".join(f"{t}:{n}" for t, n in r[f"{mode}_tiers"].items())]
            rows.append(row)
        where = "a service it started" if cfg["started_service"] else cfg["server"]
        out = f"{head}, through {where} (client-side TTFT)\n" + format_table(headers, rows)
        if result.get("kv_transfer"):
            t = result["kv_transfer"]
            out += (f"\nprefill -> decode KV pushes: {t['blocks']:.0f} blocks, "
                    f"{t['bytes'] / 2**20:.1f} MiB in {t['seconds']:.3f} s = {t['gbps']:.2f} GB/s")
        for key, name in (("handoff", "this service"), ("colocated", "colocated service")):
            if key in result:
                title, headers, table = handoff.render(
                    f"handoff, {name}: {result[key]['tokens']} tokens a stream (client side, "
                    "medians)", result[key]["summary"])
                out += f"\n\n{title}\n" + format_table(headers, table)
        if "inprocess" in result:
            modes = cfg["modes"]
            over = [[r["length"]]
                    + [x for m in modes for x in (r[f"{m}_extra_ms"], r[f"{m}_ratio"])]
                    for r in result["service_over_inprocess"]]
            out += ("\n\n" + render_table(result["inprocess"])
                    + "\n\nservice over in-process, same run (extra ms, ratio)\n"
                    + format_table(["tokens"] + [h for m in modes for h in (f"{m} +ms", "x")],
                                   over))
        return out
    headers = ["tokens", "cold ms"]
    for tier in MODES[1:]:
        headers += [f"{tier} ms", "floor ms", "x floor", "/cold"]
    headers += ["disk loaded", "load ms", "(disk-host)/floor", "re-read ms",
                "(disk-host)/re-read"]
    rows = []
    for r in result["summary"]:
        row: list[object] = [r["length"], r["cold_s"] * 1e3]
        for tier in MODES[1:]:
            row += [r[f"{tier}_s"] * 1e3, r[f"{tier}_floor_s"] * 1e3, r[f"{tier}_over_floor"],
                    r[f"{tier}_over_cold"]]
        reread = r.get("disk_reread_floor_s")
        load = r.get("disk_load_s")
        row += [r.get("disk_loaded_tokens"), load * 1e3 if load is not None else None,
                r.get("disk_minus_host_over_floor"),
                reread * 1e3 if reread is not None else None,
                r.get("disk_minus_host_over_reread_floor")]
        rows.append(row)
    names = {"disk": "disk (device, O_DIRECT)", "disk_tier": "disk tier probe"}
    bws = ", ".join(f"{names.get(t, t)} {bw[t]:.2f} GB/s" for t in ("device", "host", "disk",
                                                                     "disk_tier") if t in bw)
    out = f"{head}; {cfg['dtype']} on {cfg['device']}\nbandwidth: {bws}\n"
    cache = cfg.get("disk_cache")
    if cache:
        out += f"disk runs: reads {cache['reads']}; before them {cache['dropped_before_disk_runs']}"
        if not cache.get("honest", True):
            out += " -- NOT from the device: buffered reads and no drop_caches (page cache)"
        out += "\n"
    return out + format_table(headers, rows)


def plot(result: dict[str, Any], path: str) -> None:
    plt = pyplot()
    summary = result["summary"]
    xs = [r["length"] for r in summary]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    modes = result["config"].get("modes") or MODES
    for i, mode in enumerate(modes):
        color = f"C{i}"
        ax.plot(xs, [r[f"{mode}_s"] for r in summary], "o-", color=color, label=mode)
        if f"{mode}_floor_s" in summary[0]:
            ax.plot(xs, [max(r[f"{mode}_floor_s"], 1e-7) for r in summary], "--", color=color,
                    label=f"{mode} floor")
        if "inprocess" in result:
            loc = result["inprocess"]["summary"]
            ax.plot(xs, [r[f"{mode}_s"] for r in loc], "x:", color=color, alpha=0.7,
                    label=f"{mode} in-process")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (s)")
    where = "through the service" if result["config"]["mode"] == "server" else "in-process"
    ax.set_title(f"TTFT, {result['config']['model']} ({where})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
