"""The main job (``make run``): a long document and follow-up questions through the service,
each answer printed with its TTFT and the tier that served the cached prefix.

With a chat model (the default ``smollm2-135m``) the questions are turns of one conversation
about the document, so each turn's prompt starts with everything said before: the document is
computed once (cold) and every later turn loads it from the KV cache -- from the device pool,
then from the host tier and the disk tier after the workers pushed their cached blocks down.
A model without a chat template (``tiny``) gets plain ``Question: ... Answer:`` prompts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

DOCUMENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "document.md")

# (label, question (None: the previous request again), tier the cached prefix is pushed down
# to before the turn, what the document says). The questions are ones smollm2-135m answers
# correctly from the built-in document in this conversation (greedy). Asked alone, it answered
# 4 of 12 candidate questions correctly (the head librarian, the price of a temporary card and
# what the blue van does, among others, it got wrong).
PLAN: tuple[tuple[str, str | None, str | None, str], ...] = (
    ("question 1 (cold)", "In which year was the customs house built?", None, "1872"),
    ("question 1 again", None, None, "1872"),
    ("follow-up 2", "How many books does the library hold?", None, "about 38,000"),
    ("follow-up 3, prefix in host", "What is the name of the archivist?", "host", "Mairi Quinn"),
    ("follow-up 4, prefix on disk", "How many villages does the van visit?", "disk", "eleven"),
)
NOISE_MODELS = ("tiny", "llama-3.2-1b", "llama-3.1-8b")  # random weights: output is noise
MAX_TOKENS = 48


def read_document(path: str | None) -> str:
    with open(path or DOCUMENT, encoding="utf-8") as f:
        return f.read().strip()


def turn_request(
    doc: str, history: list[tuple[str, str]], question: str, chat: bool
) -> dict[str, Any]:
    """The request of one turn: the document and every earlier question and answer first."""
    if chat:
        messages: list[dict[str, str]] = []
        for i, (q, a) in enumerate(history):
            content = f"{doc}\n\nQuestion: {q}" if i == 0 else q
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
        first = not history
        messages.append(
            {"role": "user", "content": f"{doc}\n\nQuestion: {question}" if first else question}
        )
        return {"messages": messages}
    turns = "".join(f"\nQuestion: {q}\nAnswer: {a}" for q, a in history)
    return {"prompt": f"{doc}{turns}\nQuestion: {question}\nAnswer:"}


def run_demo(args: argparse.Namespace) -> int:
    from cluster.preflight import check_disk_path, check_model

    check_model(args.model)  # before Ray or torch: a mistake is reported at once
    check_disk_path(args.disk_path)
    if args.in_process:
        return _run_in_process(args)
    return _run_service(args)


def prepare_model(model: str) -> None:
    """Convert a GGUF model once, here, before the workers start (they then load the cached
    checkpoint instead of converting it side by side)."""
    from textproc.gguf_models import find_gguf

    path = find_gguf(model)
    if path is None:
        return
    from engine.gguf_loader import convert_gguf
    from textproc.gguf_cache import cache_dir

    cached = os.path.exists(os.path.join(cache_dir(path), "model.safetensors"))
    t0 = time.perf_counter()
    out = convert_gguf(path)
    what = "cached checkpoint" if cached else "converted (first start only)"
    print(f"model {model}: {what} {out} in {time.perf_counter() - t0:.1f} s", flush=True)


def _run_service(args: argparse.Namespace) -> int:
    """Start the service (embedded Ray), run the plan through gRPC, shut down."""
    import ray

    from cluster.config import ServiceConfig
    from cluster.generate import engine_config_from_args, store_config_from_args
    from cluster.launcher import launch
    from router.client import StrataClient
    from router.config import RouterConfig

    try:
        prepare_model(args.model)
        doc = read_document(args.document)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="strata-demo-") as tmp:
        cfg = ServiceConfig(
            engine=engine_config_from_args(args),
            store=store_config_from_args(args, args.disk_path or tmp),
            router=RouterConfig(port=0),
        )
        t0 = time.perf_counter()
        print(f"starting the service: 1 prefill + 1 decode worker, model {args.model} ...")
        if args.model in NOISE_MODELS:
            print(f"note: {args.model} has random weights: its answers are noise (the cache and "
                  "the timings are real)")
        svc = launch(cfg)
        print(f"serving gRPC on {svc.address} (up in {time.perf_counter() - t0:.1f} s)", flush=True)
        try:
            with StrataClient(svc.address) as client:
                chat = client.health_info(timeout=30).has_chat_template

                def evict(tier: str) -> None:
                    ray.get([h.evict_cached.remote(tier) for h in svc.prefill + svc.decode])

                return _run_plan(client, doc, chat, evict)
        finally:
            svc.shutdown()
            print("service stopped", flush=True)


def _run_plan(client: Any, doc: str, chat: bool, evict: Any) -> int:
    history: list[tuple[str, str]] = []
    results = []
    request: dict[str, Any] = {}
    for label, asked, tier, fact in PLAN:
        if tier:
            evict(tier)
        question = asked or history[-1][0]
        if asked is not None:
            request = turn_request(doc, history, question, chat)
        res = client.generate(**request, max_tokens=MAX_TOKENS, temperature=0.0, timeout=600)
        u = res.usage
        tiers = ", ".join(f"{k}={v}" for k, v in u.cached_tokens_by_tier.items()) or "-"
        print(
            f"  {label:<28} prompt {u.prompt_tokens:>5} tok  ttft {res.ttft_ms_client:8.1f} ms  "
            f"cached {u.cached_tokens:>5} ({tiers})"
        )
        print(f"      Q: {question}\n      A: {' '.join(res.text.split())}", flush=True)
        if chat:  # a model without a chat template here is a random-weight shape
            print(f"      (the document says: {fact})", flush=True)
        if asked is not None:
            history.append((question, res.text.strip()))
        results.append(res)
    if results[0].token_ids != results[1].token_ids:
        print("error: the cached run's answer differs from the cold run's", file=sys.stderr)
        return 1
    ratio = results[1].ttft_ms_client / results[0].ttft_ms_client
    print(f"  warm/cold TTFT of question 1: {ratio:.3f} (identical answer tokens)")
    return 0


def _run_in_process(args: argparse.Namespace) -> int:
    from cluster.generate import engine_from_args
    from engine.sampling import SamplingParams
    from textproc.tokenizer import render_chat

    with tempfile.TemporaryDirectory(prefix="strata-demo-") as tmp:
        if args.disk_path is None:
            args.disk_path = tmp
        engine = engine_from_args(args)
        try:
            tok = engine.tokenizer
            assert tok is not None
            request = turn_request(
                read_document(args.document), [], str(PLAN[0][1]), tok.chat_template is not None
            )
            ids = (
                render_chat(tok, request["messages"])
                if "messages" in request
                else tok.encode(request["prompt"])
            )
            sampling = SamplingParams(max_tokens=MAX_TOKENS)
            if args.model in NOISE_MODELS:
                print(f"note: {args.model} has random weights: its answer is noise")
            print(
                f"model {args.model}: prompt of {len(ids)} tokens, {engine.device}, "
                f"pool {engine.num_blocks} blocks of {engine.block_size} tokens"
            )
            rows = []
            for label in ("cold", "cached"):
                out = engine.generate([ids], sampling)[0]
                rows.append(out)
                tiers = ", ".join(f"{k}={v}" for k, v in out.cached_by_tier.items()) or "-"
                print(
                    f"  {label:<7} ttft {out.ttft_s * 1000:8.1f} ms   cached tokens "
                    f"{out.num_cached_tokens:>5} ({tiers})"
                )
            print(f"  A: {' '.join(tok.decode(rows[0].output_token_ids).split())}")
            if rows[0].output_token_ids != rows[1].output_token_ids:
                print("error: cached output differs from cold output", file=sys.stderr)
                return 1
            print(
                f"  cached/cold TTFT ratio: {rows[1].ttft_s / rows[0].ttft_s:.3f} "
                "(same output tokens)"
            )
            return 0
        finally:
            engine.close()
