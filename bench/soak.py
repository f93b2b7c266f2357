"""A chaos soak: concurrent clients against the service while workers are killed and the disk
tier is full, then an account of every request.

    strata bench soak --seconds 180            # starts 2 prefill + 2 decode workers (loopback)
    strata bench soak --seconds 60 --server 127.0.0.1:50051 --token T   # a running service
    strata bench soak --hosts 4 --seconds 180   # on 4 test hosts, link faults too (root)

``--clients`` threads send greedy requests whose prompts share one of a few long prefixes (so
prefix reuse, pushes and placement all work) with a random suffix; some are cancelled after a
token or two, some are malformed (token ids outside the vocabulary). A third of the way in, the
process of ``prefill-0`` is killed (SIGKILL, by the pid the service reports), and ten seconds
later that of ``decode-0``; Ray restarts them and the router takes them back. The started
service's disk tier is a few MiB, so it is full most of the run. Loopback only; every request
has a deadline (``--request-timeout``).

Afterwards every answered greedy request is checked against the in-process engine on the same
prompt (wrong outputs), the workers' blocks are checked free (leaks), and the report gives:
requests by status, OK share of answered requests, hung requests (deadline passed or never
ended), TTFT p50/p99 before, during (from the first kill until every worker is back) and after
the faults, and the time each killed worker took to come back.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

from bench.common import (
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

KILL_GAP_S = 10.0  # between the prefill and the decode kill


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("bench.soak", __doc__)
    p.add_argument("--seconds", type=float, default=180.0, help="length of the load")
    p.add_argument("--clients", type=int, default=6, help="concurrent client threads")
    p.add_argument("--prefill", type=int, default=2, help="workers of a started service")
    p.add_argument("--decode", type=int, default=2)
    p.add_argument("--prefix-tokens", type=int, default=512, help="shared prefix length")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per request")
    p.add_argument("--cancel-share", type=float, default=0.1)
    p.add_argument("--bad-share", type=float, default=0.05)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--no-kill", action="store_true", help="load only, no faults")
    p.add_argument("--server", default=None, help="HOST:PORT of a running service")
    p.add_argument("--hosts", type=int, default=0, metavar="N",
                   help="run on N separate test hosts (network namespaces; root), with link "
                        "faults beside the kills (bench/soak_hosts.py)")
    p.add_argument("--token", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="30 seconds, 3 clients")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.seconds, args.clients = min(args.seconds, 30.0), min(args.clients, 3)
    try:
        if args.server:
            result = run(args, args.server, None)
        elif args.hosts:
            from bench.soak_hosts import hosts_service

            with hosts_service(args) as (address, faults):
                result = run(args, address, None, faults)
        else:
            with _started_service(args) as svc:
                result = run(args, svc.address, svc)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(args.out, "soak", result, render_table, plot)
    return 0


class _started_service:  # noqa: N801 - a context manager used like a function
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = tempfile.TemporaryDirectory(prefix="strata-soak-")

    def __enter__(self) -> Any:  # noqa: ANN401 - cluster.launcher.Service
        from cluster.config import ServiceConfig
        from cluster.launcher import launch
        from engine.config import EngineConfig
        from kvstore.config import StoreConfig
        from router.config import RouterConfig

        a = self.args
        cfg = ServiceConfig(
            engine=EngineConfig(model=a.model, dtype=a.dtype, kv_cache_bytes=16 << 20,
                                max_model_len=4096, max_num_batched_tokens=512),
            store=StoreConfig(host_capacity_bytes=8 << 20,
                              disk_path=os.path.join(self.tmp.name, "kv"),
                              disk_capacity_bytes=4 << 20),  # full most of the run
            router=RouterConfig(host="127.0.0.1", port=0, max_model_len=4096),
            num_prefill=a.prefill, num_decode=a.decode,
        )
        self.svc = launch(cfg)
        return self.svc

    def __exit__(self, *exc: object) -> None:
        self.svc.shutdown()
        self.tmp.cleanup()


class _Faults:
    """Kills prefill-0 then decode-0 by pid, and records when each worker is back."""

    def __init__(self, client: Any, svc: Any) -> None:  # noqa: ANN401
        self.client = client
        self.svc = svc
        self.kills: dict[str, float] = {}  # worker -> monotonic time of the kill
        self.back: dict[str, float] = {}  # worker -> monotonic time it served again

    def _workers(self) -> dict[str, dict[str, Any]]:
        if self.svc is not None:
            import ray

            ws = ray.get(self.svc.router.workers.remote(), timeout=30)
            return {w["worker_id"]: w for w in ws}
        stats = self.client.stats()
        return {wid: {"pid": int(s.get("pid", 0)), "state": "up" if s.get("alive") else "down",
                      "restarts": int(s.get("restarts", 0))}
                for wid, s in stats.items() if wid != "router"}

    def kill(self, worker_id: str) -> None:
        w = self._workers().get(worker_id)
        if w is None or not w.get("pid"):
            raise ValueError(f"the service reports no pid for {worker_id}")
        os.kill(int(w["pid"]), signal.SIGKILL)
        self.kills[worker_id] = time.monotonic()
        self._before = {wid: x.get("restarts", 0) for wid, x in self._workers().items()}

    def poll(self) -> None:
        if not self.kills or len(self.back) == len(self.kills):
            return
        try:
            ws = self._workers()
        except Exception:  # noqa: BLE001 - asked again on the next poll
            return
        for wid in self.kills:
            w = ws.get(wid, {})
            if wid not in self.back and w.get("state") == "up" and w.get("restarts", 0) > 0:
                self.back[wid] = time.monotonic()


def run(args: argparse.Namespace, address: str, svc: Any,  # noqa: ANN401
        host_faults: Any = None) -> dict[str, Any]:  # noqa: ANN401 - bench.soak_hosts.HostFaults
    from router.client import StrataClient
    from router.errors import RemoteError

    vocab = 256
    prefixes = [random_prompt(args.seed * 97 + i, args.prefix_tokens, vocab) for i in range(4)]
    salt = run_salt()
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    t_start = time.monotonic()
    stop_at = t_start + args.seconds
    bar = progress(int(args.seconds), "soak", args.no_progress)

    def one(client: Any, k: int) -> dict[str, Any]:  # noqa: ANN401
        r = random.Random(args.seed * 1_000_003 + k)
        kind = "ok"
        x = r.random()
        if x < args.bad_share:
            kind = "bad"
        elif x < args.bad_share + args.cancel_share:
            kind = "cancel"
        prompt = prefixes[r.randrange(len(prefixes))] + random_prompt(
            args.seed * 7919 + k, r.randrange(8, 64), vocab)
        rec: dict[str, Any] = {"kind": kind, "t0": time.monotonic() - t_start, "prompt": prompt}
        t0 = time.monotonic()
        tokens: list[int] = []
        try:
            ids = prompt + [vocab + 10_000] if kind == "bad" else prompt
            stream = client.stream(prompt_token_ids=ids, max_tokens=args.max_tokens,
                                   temperature=0.0, ignore_eos=True, cache_salt=salt,
                                   timeout=args.request_timeout)
            for chunk in stream:
                if not tokens and chunk.token_ids:
                    rec["ttft_s"] = time.monotonic() - t0
                tokens.extend(chunk.token_ids)
                if kind == "cancel" and len(tokens) >= 1:
                    stream.close()
                    break
            rec["status"] = "CANCELLED" if kind == "cancel" else "OK"
        except RemoteError as e:
            rec["status"] = e.code or "UNKNOWN"
        rec["tokens"] = tokens
        rec["seconds"] = time.monotonic() - t0
        return rec

    def worker(i: int) -> None:
        k = i
        with StrataClient(address, token=args.token) as client:
            while time.monotonic() < stop_at:
                rec = one(client, k)
                with lock:
                    records.append(rec)
                k += args.clients

    with StrataClient(address, token=args.token) as control:
        vocab = _vocab(control, vocab)
        faults = host_faults or _Faults(control, svc)
        threads = [threading.Thread(target=worker, args=(i,), daemon=True)
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        plan = [] if args.no_kill else [(args.seconds / 3, "prefill-0"),
                                         (args.seconds / 3 + KILL_GAP_S, "decode-0")]
        if host_faults is not None and not args.no_kill:
            plan = host_faults.plan(args.seconds)
        last = 0
        while any(t.is_alive() for t in threads):
            now = time.monotonic() - t_start
            while plan and now >= plan[0][0]:
                faults.kill(plan.pop(0)[1])
            faults.poll()
            if int(now) > last:
                bar.update(int(now) - last)
                last = int(now)
            time.sleep(0.2)
        hung_at_end = sum(1 for t in threads if t.is_alive())
        wait_back = time.monotonic() + 120
        while len(faults.back) < len(faults.kills) and time.monotonic() < wait_back:
            faults.poll()
            time.sleep(0.5)
    bar.close()
    leaks = _check_leaks(address, args.token, svc)
    wrong = _check_outputs(args, records)
    return _summary(args, records, faults, t_start, leaks, wrong, hung_at_end)


def _vocab(client: Any, default: int) -> int:  # noqa: ANN401
    try:
        return int(client.health_info(timeout=30).vocab_size) or default
    except Exception:  # noqa: BLE001 - a service that does not say: the built-in tokenizer's
        return default


def _check_leaks(address: str, token: str | None, svc: Any) -> dict[str, Any]:  # noqa: ANN401
    """Every worker's blocks free, every request gone (polled: aborts land asynchronously)."""
    from router.client import StrataClient

    deadline = time.monotonic() + 60
    with StrataClient(address, token=token) as client:
        while True:
            stats = {w: s for w, s in client.stats().items() if w != "router"}
            busy = {w: {"free": s.get("pool_free_blocks"), "blocks": s.get("pool_blocks"),
                        "running": s.get("num_running"), "waiting": s.get("num_waiting")}
                    for w, s in stats.items() if s.get("alive")
                    and (s.get("pool_free_blocks") != s.get("pool_blocks")
                         or s.get("num_running") or s.get("num_waiting"))}
            if not busy or time.monotonic() > deadline:
                return {"workers_checked": len(stats), "leaking": busy}
            time.sleep(1.0)


def _check_outputs(args: argparse.Namespace, records: list[dict[str, Any]]) -> int:
    """Greedy answers against the in-process engine on the same prompts (batched, after)."""
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling import SamplingParams

    done = [r for r in records if r["status"] == "OK"]
    if not done:
        return 0
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, kv_cache_bytes=64 << 20,
                                    max_model_len=4096))
    wrong = 0
    try:
        sampling = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
        for start in range(0, len(done), 32):
            batch = done[start : start + 32]
            results = engine.generate([r["prompt"] for r in batch], sampling)
            for r, res in zip(batch, results):
                r["expected"] = res.output_token_ids
                wrong += r["tokens"] != res.output_token_ids
    finally:
        engine.close()
    return wrong


def _summary(args: argparse.Namespace, records: list[dict[str, Any]], faults: _Faults,
             t_start: float, leaks: dict[str, Any], wrong: int, hung_at_end: int
             ) -> dict[str, Any]:
    by_status: dict[str, int] = {}
    for r in records:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    answered = [r for r in records if r["kind"] == "ok"]
    ok = sum(1 for r in answered if r["status"] == "OK")
    hung = sum(1 for r in records if r["status"] == "DEADLINE_EXCEEDED") + hung_at_end
    first_kill = min(faults.kills.values(), default=None)
    all_back = max(faults.back.values(), default=None)
    phases: dict[str, list[float]] = {"before": [], "during": [], "after": []}
    for r in answered:
        if "ttft_s" not in r:
            continue
        t = t_start + r["t0"]
        if first_kill is None or t < first_kill:
            phases["before"].append(r["ttft_s"])
        elif all_back is None or t < all_back:
            phases["during"].append(r["ttft_s"])
        else:
            phases["after"].append(r["ttft_s"])
    for r in records:
        r.pop("prompt", None)
    return {
        "benchmark": "soak", "machine": machine_info(),
        "config": {k: getattr(args, k) for k in ("model", "seconds", "clients", "prefill",
                                                 "decode", "prefix_tokens", "max_tokens",
                                                 "cancel_share", "bad_share", "request_timeout",
                                                 "no_kill", "server", "hosts", "seed")},
        "num_requests": len(records), "by_status": by_status,
        "ok_share_of_answered": ok / len(answered) if answered else None,
        "wrong_outputs": wrong, "hung_requests": hung, "leaks": leaks,
        "ttft_s": {phase: summarize(xs) for phase, xs in phases.items()},
        "kills": {w: t - t_start for w, t in faults.kills.items()},
        "back_after_s": {w: faults.back[w] - faults.kills[w] for w in faults.back},
        "not_back": sorted(set(faults.kills) - set(faults.back)),
        "requests": records,
    }


def render_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"chaos soak: {cfg['seconds']:.0f} s, {cfg['clients']} clients, "
        f"{result['num_requests']} requests; by status "
        + ", ".join(f"{k} {v}" for k, v in sorted(result["by_status"].items())),
        f"OK of answered (not cancelled, not malformed): "
        f"{(result['ok_share_of_answered'] or 0) * 100:.1f}%; wrong outputs "
        f"{result['wrong_outputs']}; hung {result['hung_requests']}; leaking workers "
        f"{len(result['leaks']['leaking'])} of {result['leaks']['workers_checked']}",
        "killed: " + (", ".join(f"{w} at {t:.0f} s, back after "
                                + (f"{result['back_after_s'][w]:.1f} s"
                                   if w in result["back_after_s"] else "-- (not back)")
                                for w, t in result["kills"].items()) or "none"),
    ]
    rows = [[phase, s.get("count", 0), s.get("p50", 0) * 1e3, s.get("p99", 0) * 1e3]
            for phase, s in result["ttft_s"].items()]
    return "\n".join(lines) + "\n" + format_table(["phase", "requests", "TTFT p50 ms",
                                                   "TTFT p99 ms"], rows)


def plot(result: dict[str, Any], path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    reqs = [r for r in result["requests"] if "ttft_s" in r]
    ok = [r for r in reqs if r["status"] == "OK"]
    bad = [r for r in reqs if r["status"] != "OK"]
    ax.scatter([r["t0"] for r in ok], [r["ttft_s"] * 1e3 for r in ok], s=6, label="OK")
    ax.scatter([r["t0"] for r in bad], [r["ttft_s"] * 1e3 for r in bad], s=10, marker="x",
               label="other status")
    for w, t in result["kills"].items():
        ax.axvline(t, color="r", alpha=0.5)
        ax.text(t, ax.get_ylim()[1] * 0.9, f" kill {w}", fontsize=7, color="r")
        if w in result["back_after_s"]:
            ax.axvline(t + result["back_after_s"][w], color="g", alpha=0.5)
    ax.set_yscale("log")
    ax.set_xlabel("seconds into the soak (request start)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("chaos soak: TTFT through worker kills")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
