"""Long-document QA: N documents, Q questions each, in rounds; TTFT per round and hits per tier.

    python -m bench.longdoc --docs 8 --doc-tokens 2048 --questions 3 --concurrency 4
        [--pool-tokens T --host-tokens T --disk-tokens T] [--server HOST:PORT]

Question ``q`` of a document is the document followed by a distinct short suffix; round ``q``
asks question ``q`` of every document, ``--concurrency`` requests in flight. Round 0 is cold;
later rounds find the documents in whichever tier they were pushed to. By default the pool holds
only what the concurrent requests need and the host slab half the documents, so eviction and
disk reloads happen.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from bench.common import (
    EngineSizes,
    add_run_flags,
    build_engine,
    builtin_vocab,
    format_table,
    machine_info,
    new_parser,
    progress,
    pyplot,
    random_prompt,
    report,
    run_salt,
    summarize,
)
from bench.driver import (
    RequestRecord,
    TimedRequest,
    client_sender,
    engine_sender,
    hit_rates,
    run_requests,
)
from bench.service import server_target


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("bench.longdoc", __doc__)
    p.add_argument("--docs", type=int, default=None, help="documents (default 8)")
    p.add_argument("--doc-tokens", type=int, default=None, help="tokens each (default 2048)")
    p.add_argument("--questions", type=int, default=None, help="per document = rounds (3)")
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=None, help="in flight (default 4)")
    p.add_argument("--max-tokens", type=int, default=4, help="answer tokens")
    p.add_argument("--pool-tokens", type=int, default=None, help="device pool capacity")
    p.add_argument("--host-tokens", type=int, default=None, help="host slab (default docs/2)")
    p.add_argument("--disk-tokens", type=int, default=None, help="LMDB (default 4x all docs)")
    p.add_argument("--max-batched-tokens", type=int, default=2048)
    add_run_flags(p, "4 docs x 512 tokens, 2 rounds")
    return p


def _defaults(args: argparse.Namespace) -> None:
    for name, full, small in (("docs", 8, 4), ("doc_tokens", 2048, 512), ("questions", 3, 2),
                              ("concurrency", 4, 2)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.quick else full)
    if min(args.docs, args.doc_tokens, args.questions, args.concurrency, args.max_tokens) <= 0:
        raise ValueError(
            "--docs, --doc-tokens, --questions, --concurrency and --max-tokens must be positive")
    request_tokens = args.doc_tokens + args.question_tokens + args.max_tokens
    if args.pool_tokens is None:
        args.pool_tokens = args.concurrency * (request_tokens + 16)
    if args.host_tokens is None:
        args.host_tokens = args.docs * args.doc_tokens // 2
    if args.disk_tokens is None:
        args.disk_tokens = 4 * args.docs * (args.doc_tokens + args.questions * 64)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _defaults(args)
        result = run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(args.out, "longdoc", result, render_table, plot)
    return 0


def _rounds(args: argparse.Namespace, vocab: int) -> list[list[TimedRequest]]:
    docs = [random_prompt(args.seed * 65537 + 1000 + d, args.doc_tokens, vocab)
            for d in range(args.docs)]
    rounds = []
    for q in range(args.questions):
        reqs = [
            TimedRequest(f"doc{d}-q{q}", 0.0,
                         doc + random_prompt(args.seed * 65537 + 10_000 * (q + 1) + d,
                                             args.question_tokens, vocab),
                         args.max_tokens)
            for d, doc in enumerate(docs)
        ]
        # A fresh document order each round (a fixed cyclic scan would defeat any LRU tier).
        random.Random(args.seed * 31 + q).shuffle(reqs)
        rounds.append([replace(r, at_s=i * 1e-6) for i, r in enumerate(reqs)])
    return rounds


def run(args: argparse.Namespace) -> dict[str, Any]:
    bar = progress(args.docs * args.questions, "longdoc", args.no_progress)
    per_round: list[list[RequestRecord]] = []
    engine_info: dict[str, Any] = {}

    def play(send: Any, rounds: list[list[TimedRequest]]) -> None:
        for reqs in rounds:
            records, _ = run_requests(reqs, send, concurrency=args.concurrency,
                                      on_done=lambda _: bar.update())
            per_round.append(records)

    longest = args.doc_tokens + args.question_tokens + args.max_tokens
    sizes = EngineSizes(args.pool_tokens, args.host_tokens, args.disk_tokens, longest,
                        args.max_batched_tokens)
    mode = "in-process"
    if args.server or args.start_service:
        from router.client import StrataClient

        mode = "started service" if args.start_service else "server"
        with server_target(args, sizes) as target, \
                StrataClient(target.address, token=args.token) as client:
            vocab = args.vocab_size or builtin_vocab(args.model)
            play(client_sender(client, run_salt()), _rounds(args, vocab))
    else:
        from engine.loop import EngineLoop

        with tempfile.TemporaryDirectory(prefix="strata-bench-longdoc-") as disk_dir:
            engine = build_engine(args.model, args.dtype, sizes, disk_dir)
            try:
                loop = EngineLoop(engine, name="bench-longdoc")
                try:
                    play(engine_sender(loop), _rounds(args, engine.model_config.vocab_size))
                finally:
                    loop.close()
                engine_info = {"pool_blocks": engine.num_blocks, "store": engine.stats()}
            finally:
                engine.close()
    bar.close()
    rounds_out = []
    for q, records in enumerate(per_round):
        done = [r for r in records if r.error is None]
        rounds_out.append({
            "round": q, "num_requests": len(records), "num_errors": len(records) - len(done),
            "errors": sorted({r.error for r in records if r.error})[:5],
            "ttft_s": summarize([r.ttft_s for r in done if r.ttft_s is not None]),
            "hit_rate": hit_rates(records),
            "cached_tokens_by_tier": {
                t: sum(r.cached_by_tier.get(t, 0) for r in done) for t in ("device", "host", "disk")
            },
            "prompt_tokens": sum(r.prompt_len for r in done),
            "requests": [{"req_id": r.req_id, "ttft_s": r.ttft_s,
                          "cached_by_tier": r.cached_by_tier,
                          "num_cached_tokens": r.num_cached_tokens, "prompt_len": r.prompt_len,
                          "error": r.error} for r in records],
        })
    config = {k: getattr(args, k) for k in (
        "model", "docs", "doc_tokens", "questions", "question_tokens", "concurrency", "max_tokens",
        "pool_tokens", "host_tokens", "disk_tokens", "max_batched_tokens", "seed")}
    config["mode"] = mode
    config["working_set_tokens"] = args.docs * args.doc_tokens
    config.update(engine_info)
    return {"benchmark": "longdoc", "machine": machine_info(), "config": config,
            "rounds": rounds_out}


def render_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    rows = []
    for r in result["rounds"]:
        t, hr = r["ttft_s"], r["hit_rate"]
        rows.append([r["round"], r["num_requests"] - r["num_errors"]]
                    + [t[k] * 1e3 if k in t else None for k in ("mean", "p50", "p90")]
                    + [hr["total"], hr["device"], hr["host"], hr["disk"]])
    head = (f"long-document QA, {cfg['model']} ({cfg['mode']}): {cfg['docs']} docs x "
            f"{cfg['doc_tokens']} tokens, concurrency {cfg['concurrency']}; capacity in tokens: "
            f"pool {cfg['pool_tokens']}, host {cfg['host_tokens']}, disk {cfg['disk_tokens']} "
            f"(working set {cfg['working_set_tokens']})")
    return head + "\n" + format_table(
        ["round", "ok", "mean ms", "p50 ms", "p90 ms", "hit", "device", "host", "disk"], rows)


def plot(result: dict[str, Any], path: str) -> None:
    plt = pyplot()
    rounds = result["rounds"]
    xs = [r["round"] for r in rounds]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for k in ("mean", "p50", "p90"):
        ax1.plot(xs, [r["ttft_s"].get(k, float("nan")) for r in rounds], "o-", label=k)
    ax1.set_yscale("log")
    ax1.set_xlabel("round (0 = cold)")
    ax1.set_ylabel("TTFT (s)")
    ax1.legend()
    ax1.grid(True, alpha=0.3)
    bottom = [0.0] * len(rounds)
    for i, tier in enumerate(("device", "host", "disk")):
        vals = [r["hit_rate"][tier] for r in rounds]
        ax2.bar(xs, vals, bottom=bottom, label=tier, color=f"C{i}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("round")
    ax2.set_ylabel("prompt-token hit rate")
    ax2.legend()
    fig.suptitle(f"long-document QA, {result['config']['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
