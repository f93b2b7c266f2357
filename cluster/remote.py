"""``strata generate --server`` and ``strata stats``: the gRPC client side of the command line."""

from __future__ import annotations

import argparse
import sys

from cluster.flags import chat_messages, parse_ids, print_result


def run_remote_generate(args: argparse.Namespace) -> int:
    from router.client import StrataClient
    from router.errors import RemoteError

    prompt_ids = parse_ids(args.prompt_ids) if args.prompt_ids is not None else None
    with StrataClient(args.server, token=args.token) as client:
        try:
            res = client.generate(
                prompt=args.prompt,
                prompt_token_ids=prompt_ids,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
                stop_token_ids=parse_ids(args.stop_token_ids, "--stop-token-ids"),
                cache_salt=args.cache_salt,
                timeout=args.timeout,
                ignore_eos=args.ignore_eos,
                messages=chat_messages(args),
            )
        except RemoteError as e:
            print(f"error: {e.code}: {e}", file=sys.stderr)
            return 2
    u = res.usage
    print_result(
        {
            "output_token_ids": list(res.token_ids),
            "text": res.text,
            "finish_reason": res.finish_reason,
            "prompt_tokens": u.prompt_tokens,
            "ttft_ms": res.ttft_ms_client,
            "ttft_ms_server": res.ttft_ms_server,
            "latency_ms": res.e2e_ms,
            "cached_tokens": u.cached_tokens,
            "cached_tokens_by_tier": dict(u.cached_tokens_by_tier),
            "prefill_worker": u.prefill_worker,
            "decode_worker": u.decode_worker,
        },
        args.json,
    )
    return 0


STATS_COLUMNS = (
    ("alive", "alive"),
    ("num_running", "running"),
    ("num_waiting", "waiting"),
    ("pool_free_blocks", "free blk"),
    ("pool_cached_blocks", "cached blk"),
    ("store_host_hits", "host hits"),
    ("store_disk_hits", "disk hits"),
    ("push_blocks", "pushed"),
    ("transfers_ok", "received"),
    ("prefill_tokens_per_s", "prefill tok/s"),
)


def run_stats(args: argparse.Namespace) -> int:
    import json

    from router.client import StrataClient
    from router.errors import RemoteError

    with StrataClient(args.server, token=args.token) as client:
        try:
            stats = client.stats()
        except RemoteError as e:
            print(f"error: {e.code}: {e}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return 0
    workers = sorted(w for w in stats if w != "router")
    head = f"{'worker':<12}" + "".join(f"{label:>14}" for _, label in STATS_COLUMNS)
    print(head)
    for w in workers:
        s = stats[w]
        print(
            f"{w:<12}"
            + "".join(f"{s[k]:>14.0f}" if k in s else f"{'-':>14}" for k, _ in STATS_COLUMNS)
        )
    router = stats.get("router", {})
    if router:
        print("\nrouter")
        for k in sorted(router):
            print(f"  {k:<48} {router[k]:.4g}")
    return 0
