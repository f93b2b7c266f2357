"""A chaos soak: concurrent clients against the service while workers are killed at chosen phases
of their requests and the disk tier is full, then an account of every request.

    strata bench soak --seconds 180                  # 2 prefill + 2 decode workers (loopback)
    strata bench soak --seconds 180 --runs 5         # five runs in a row on one service
    strata bench soak --kills decode:first_token,prefill:push,decode:restart
    strata bench soak --seconds 60 --server 127.0.0.1:50051 --token T   # a running service
    strata bench soak --hosts 4 --seconds 180   # on 4 test hosts, link faults too (root)

``--clients`` threads send requests whose prompts share one of a few long prefixes (so prefix
reuse, pushes and placement all work) with a random suffix: greedy ones, and a share sampled with
a temperature and a seed; some are cancelled after their first token, some give up before it (a
short client deadline), some are malformed. A third
of the way into each run the first kill comes, then one every ``--kill-gap`` seconds (closer
together when they would not fit before the last third of the run); by
default one prefill and one decode worker are killed (SIGKILL, by the pid the service reports)
at phases that rotate from run to run, so five runs cover them all (``bench/soak_faults.py``:
during prefill, during the KV push, right after the first token, mid-decode, and again while the
killed worker restarts). Ray restarts the workers and the router takes them back. The started
service's disk tier is a few MiB, so it is full most of the run. Loopback only; every request
has a deadline (``--request-timeout``).

Afterwards every answered request is run again on the in-process engine (same prompt, sampling
and seed: wrong outputs), the workers' blocks are checked free (leaks), and the report gives per
run: requests by status, the OK share of answered requests, hung requests, the requests in
flight at each kill and whether theirs were right, TTFT p50/p99 before, during and after the
faults, each kill (the worker, the phase asked and whether it was seen, how long until the
worker left placement, and how long after its new process was ready it was back), the router's
counters over the run (migrations by role and phase, tokens recomputed, retries, failures by
cause), and every request that failed for another reason than its own (an UNAVAILABLE, a
deadline) with what the router said: which worker, which phase, how many attempts, why it was
not served elsewhere, and the kills it overlapped.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from bench.common import format_table, machine_info, new_parser, progress, pyplot, report, summarize
from bench.soak_faults import Faults, default_kills, parse_kills
from bench.soak_load import Load, check_leaks, check_outputs

GOAL_OK_SHARE = 0.99
GOAL_OUT_S = 1.0  # kill -> out of placement
GOAL_BACK_S = 30.0  # new process ready -> back in placement
OWN_FAULT = ("OK", "CANCELLED", "INVALID_ARGUMENT")  # statuses that are not the service's doing


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("bench.soak", __doc__)
    p.add_argument("--seconds", type=float, default=180.0, help="length of each run's load")
    p.add_argument("--runs", type=int, default=1, help="runs in a row on one service")
    p.add_argument("--kills", default=None,
                   help="ROLE:PHASE,... killed in each run (default: one prefill and one decode "
                        "worker, phases rotating over the runs)")
    p.add_argument("--kill-gap", type=float, default=30.0,
                   help="seconds between kills (less when they would not fit in the run)")
    p.add_argument("--clients", type=int, default=6, help="concurrent client threads")
    p.add_argument("--prefill", type=int, default=2, help="workers of a started service")
    p.add_argument("--decode", type=int, default=2)
    p.add_argument("--prefix-tokens", type=int, default=512, help="shared prefix length")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per request")
    p.add_argument("--cancel-share", type=float, default=0.1)
    p.add_argument("--bad-share", type=float, default=0.05)
    p.add_argument("--give-up-share", type=float, default=0.05,
                   help="requests whose client gives up within 20-400 ms (a short deadline)")
    p.add_argument("--seeded-share", type=float, default=0.2,
                   help="requests sampled with a temperature and a seed (the rest are greedy)")
    p.add_argument("--probe-tokens", type=int, default=2560,
                   help="prompt of the probe request a kill is timed by")
    p.add_argument("--probe-max-tokens", type=int, default=64)
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
        if args.runs < 1:
            raise ValueError("--runs must be >= 1")
        plan = parse_kills(args.kills) if args.kills else None
        if args.server:
            result = soak(args, args.server, plan)
        elif args.hosts:
            from bench.soak_hosts import hosts_service

            with hosts_service(args) as (address, host_faults):
                result = soak(args, address, plan, host_faults)
        else:
            with _started_service(args) as svc:
                result = soak(args, svc.address, plan)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(args.out, "soak", result, render_table, plot)
    return 0


class _started_service:  # a context manager used like a function
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = tempfile.TemporaryDirectory(prefix="strata-soak-")

    def __enter__(self) -> Any:  # cluster.launcher.Service
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
        )  # fmt: skip
        self.svc = launch(cfg)
        return self.svc

    def __exit__(self, *exc: object) -> None:
        self.svc.shutdown()
        self.tmp.cleanup()


# ---- the runs ------------------------------------------------------------------------------
def soak(
    args: argparse.Namespace,
    address: str,
    plan: list[tuple[str, str]] | None,
    host_faults: Any = None,  # bench.soak_hosts.HostFaults
) -> dict:
    """``args.runs`` runs in a row against the service at ``address``; each run's outputs are
    checked against the in-process engine and its account printed as soon as it ends. On test
    hosts (``host_faults``) link faults come beside the kills, and a ``restart`` kill (which
    finds the new process in this machine's ``/proc``) is left out."""
    if host_faults is not None and plan and any(phase == "restart" for _, phase in plan):
        raise ValueError("the restart phase needs the service on this machine (not --hosts)")
    summaries = []
    for i in range(args.runs):
        kills = [] if args.no_kill else (plan if plan is not None else default_kills(i))
        if host_faults is not None:
            kills = [(role, phase) for role, phase in kills if phase != "restart"]
        x = run(args, address, i, kills, host_faults)
        check_outputs(args, x["records"])  # marks the wrong ones
        summaries.append(summarize_run(args, x))
        if args.runs > 1:
            print(render_table(_result(args, summaries)), flush=True)
    return _result(args, summaries)


def _result(args: argparse.Namespace, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "benchmark": "soak", "machine": machine_info(),
        "config": {k: getattr(args, k) for k in (
            "model", "seconds", "runs", "kills", "kill_gap", "clients", "prefill", "decode",
            "prefix_tokens", "max_tokens", "cancel_share", "bad_share", "give_up_share",
            "seeded_share",
            "probe_tokens", "probe_max_tokens", "request_timeout", "no_kill", "server", "hosts",
            "seed")},
        "runs": summaries,
        "goals": goals(summaries),
    }  # fmt: skip


def run(
    args: argparse.Namespace,
    address: str,
    index: int,
    kills: list[tuple[str, str]],
    host_faults: Any = None,  # bench.soak_hosts.HostFaults
) -> dict[str, Any]:
    from router.client import StrataClient

    with StrataClient(address, token=args.token) as control:
        vocab = _vocab(control, 256)
        t_start = time.monotonic()
        load = Load(args, address, vocab, index, t_start)
        if host_faults is None:
            faults = Faults(control, load, t_start)
        else:  # on test hosts a worker's pid is its host's: the host kills it
            faults = Faults(control, load, t_start, kill=host_faults.kill_worker)
        counters_before = _counters(control)
        load.start(args.seconds)
        bar = progress(int(args.seconds), f"soak run {index + 1}/{args.runs}", args.no_progress)
        gap = min(args.kill_gap, args.seconds / (3 * max(1, len(kills) - 1)))
        due = [(args.seconds / 3 + k * gap, role, phase) for k, (role, phase) in enumerate(kills)]
        calibrate_at = args.seconds / 6 if due else None
        # link faults (a host's cable out, a partition) beside the kills, on test hosts
        links = [] if host_faults is None or args.no_kill else host_faults.plan(args.seconds)
        last = 0
        while load.running:
            now = time.monotonic() - t_start
            if calibrate_at is not None and now >= calibrate_at:
                calibrate_at = None
                faults.calibrate()
            while due and now >= due[0][0] and calibrate_at is None:
                _, role, phase = due.pop(0)
                faults.kill(role, phase)
            while links and now >= links[0][0]:
                host_faults.start(links.pop(0)[1])
            faults.poll()
            if host_faults is not None:
                host_faults.poll()
            if int(now) > last:
                bar.update(int(now) - last)
                last = int(now)
            time.sleep(0.2)
        bar.close()
        hung = load.join(args.request_timeout + 30)
        for probe in faults.probes:
            probe.done.wait(args.request_timeout + 30)
        wait_back = time.monotonic() + 120
        while time.monotonic() < wait_back and (
            any("back_at" not in k for k in faults.kills)
            or (host_faults is not None and not host_faults.all_back())
        ):
            faults.poll()
            if host_faults is not None:
                host_faults.poll()
            time.sleep(0.5)
        counters = _diff(_counters(control), counters_before)
    leaks = check_leaks(address, args.token)
    return {"run": index, "records": list(load.records),
            "kills": faults.summary(), "leaks": leaks, "hung_at_end": hung,
            "link_faults": host_faults.summary(t_start) if host_faults is not None else [],
            "router_counters": counters}  # fmt: skip


def _vocab(client: Any, default: int) -> int:
    try:
        return int(client.health_info(timeout=30).vocab_size) or default
    except Exception:  # a service that does not say: the built-in tokenizer's
        return default


def _counters(client: Any) -> dict[str, float]:
    """The router's counters of what it did about failing workers (``strata_router_*``)."""
    try:
        router = client.stats().get("router", {})
    except Exception:  # an older router has none of them
        return {}
    return {k: v for k, v in router.items() if k.startswith("strata_router_")}


def _diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    out = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return {k: v for k, v in sorted(out.items()) if v}


# ---- the account ---------------------------------------------------------------------------
_TAG = re.compile(r"\[(cause=[^\]]*)\]")
_WORKER = re.compile(r"\b((?:prefill|decode)-\d+)\b")


def explain(rec: dict[str, Any], kills: list[dict[str, Any]]) -> dict[str, Any]:
    """What the service said about a failed request, and the kills its lifetime overlapped."""
    details = rec.get("details") or ""
    tag = _TAG.search(details)
    fields: dict[str, Any] = {}
    if tag:
        fields = dict(kv.split("=", 1) for kv in tag.group(1).split() if "=" in kv)
    else:  # an older router: the worker named in the message
        named = _WORKER.findall(details)
        fields = {"cause": "untagged", "worker": named[0] if named else ""}
    overlaps = [f"{k['worker']}@{k['phase']} (kill at {k['t']:.1f} s)" for k in kills
                if rec["t0"] <= (k["t"] + (k.get("back_after_kill_s") or 60.0))
                and rec.get("t1", rec["t0"]) >= k["t"]]  # fmt: skip
    return {"status": rec["status"], "t0": round(rec["t0"], 2), "t1": round(rec.get("t1", 0), 2),
            "probe": bool(rec.get("probe")), **fields, "during_kills": overlaps,
            "details": details[:300]}  # fmt: skip


def summarize_run(args: argparse.Namespace, x: dict[str, Any]) -> dict[str, Any]:
    records, kills = x["records"], x["kills"]
    by_status: dict[str, int] = {}
    for r in records:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    answered = [r for r in records if r["kind"] == "ok"]
    ok = sum(1 for r in answered if r["status"] == "OK")
    wrong = sum(1 for r in records if r.get("wrong"))
    hung = sum(1 for r in answered if r["status"] == "DEADLINE_EXCEEDED") + x["hung_at_end"]
    first_kill = min((k["t"] for k in kills), default=None)
    backs = [k["t"] + k["back_after_kill_s"] for k in kills if k.get("back_after_kill_s")]
    all_back = max(backs) if len(backs) == len(kills) and backs else None
    phases: dict[str, list[float]] = {"before": [], "during": [], "after": []}
    for r in answered:
        if "ttft_s" in r:
            at = r["t0"]
            key = ("before" if first_kill is None or at < first_kill
                   else "during" if all_back is None or at < all_back else "after")  # fmt: skip
            phases[key].append(r["ttft_s"])
    in_flight = [r for r in answered for k in kills if r["t0"] <= k["t"] <= r.get("t1", 0)]
    failed = [explain(r, kills) for r in answered if r["status"] not in OWN_FAULT]
    return {
        "run": x["run"], "num_requests": len(records), "by_status": by_status,
        "ok_share_of_answered": ok / len(answered) if answered else None,
        "wrong_outputs": wrong, "hung_requests": hung, "leaks": x["leaks"],
        "seeded_ok": sum(1 for r in answered if r["status"] == "OK" and r.get("seed") is not None),
        "in_flight_at_kills": {"requests": len(in_flight),
                               "ok": sum(1 for r in in_flight if r["status"] == "OK"),
                               "wrong": sum(1 for r in in_flight if r.get("wrong"))},
        "ttft_s": {phase: summarize(xs) for phase, xs in phases.items()},
        "kills": kills, "link_faults": x["link_faults"],
        "router_counters": x["router_counters"], "failed": failed,
        "failed_by_cause": _count(failed, ("status", "cause", "role", "phase", "worker")),
        "samples": [[round(r["t0"], 3), round(r.get("ttft_s", -1.0), 4), r["status"]]
                    for r in records],
    }  # fmt: skip


def _count(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        k = " ".join(f"{key}={r.get(key, '')}" for key in keys)
        out[k] = out.get(k, 0) + 1
    return out


def goals(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals, run by run."""
    rows = []
    for s in runs:
        outs = [k["out_after_s"] for k in s["kills"]]
        backs = [k["back_after_restart_s"] for k in s["kills"]]
        rows.append({
            "run": s["run"],
            "ok_share": (s["ok_share_of_answered"] or 0) >= GOAL_OK_SHARE,
            "no_wrong_hung_leaks": not (s["wrong_outputs"] or s["hung_requests"]
                                        or s["leaks"]["leaking"]),
            "out_within_1s": all(o is not None and o <= GOAL_OUT_S for o in outs),
            "back_within_30s": all(b is not None and b <= GOAL_BACK_S for b in backs),
        })  # fmt: skip
    return {"per_run": rows, "all_met": all(all(v for k, v in r.items() if k != "run")
                                            for r in rows)}  # fmt: skip


def render_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    out = [f"chaos soak: {cfg['runs']} run(s) of {cfg['seconds']:.0f} s, {cfg['clients']} clients, "
           f"{cfg['prefill']}+{cfg['decode']} workers"]  # fmt: skip
    for s in result["runs"]:
        out.append("")
        out.append(
            f"run {s['run'] + 1}: {s['num_requests']} requests; by status "
            + ", ".join(f"{k} {v}" for k, v in sorted(s["by_status"].items()))
        )
        out.append(
            f"  OK of answered (not cancelled, not malformed): "
            f"{(s['ok_share_of_answered'] or 0) * 100:.2f}%; wrong {s['wrong_outputs']}; hung "
            f"{s['hung_requests']}; leaking workers {len(s['leaks']['leaking'])} of "
            f"{s['leaks']['workers_checked']}; in flight at the kills "
            f"{s['in_flight_at_kills']['requests']} ({s['in_flight_at_kills']['ok']} OK, "
            f"{s['in_flight_at_kills']['wrong']} wrong)"
        )
        rows = [[k["worker"], k["phase"], "yes" if k["phase_seen"] else "no", f"{k['t']:.1f}",
                 _s(k["out_after_s"]), _s(k["back_after_restart_s"]), _s(k["back_after_kill_s"])]
                for k in s["kills"]]  # fmt: skip
        if rows:
            out.append(format_table(["killed", "phase", "seen", "at s", "out after s",
                                     "back after ready s", "back after kill s"], rows))  # fmt: skip
        links = [[f["fault"], f"{f['t']:.1f}", _s(f["back_after_s"])] for f in s["link_faults"]]
        if links:
            out.append(format_table(["link fault (10 s)", "at s", "all back after s"], links))
        if s["router_counters"]:
            counters = s["router_counters"].items()
            out.append("  router: " + ", ".join(f"{k} {v:g}" for k, v in counters))
        for key, n in s["failed_by_cause"].items():
            out.append(f"  failed: {n} x {key}")
        tt = [[phase, t.get("count", 0), t.get("p50", 0) * 1e3, t.get("p99", 0) * 1e3]
              for phase, t in s["ttft_s"].items()]  # fmt: skip
        out.append(format_table(["phase", "requests", "TTFT p50 ms", "TTFT p99 ms"], tt))
    g = result["goals"]
    missed = [f"run {r['run'] + 1}: " + ", ".join(k for k, v in r.items() if k != "run" and not v)
              for r in g["per_run"] if not all(v for k, v in r.items() if k != "run")]  # fmt: skip
    out.append("")
    out.append("goals (>= 99% OK, 0 wrong/hung/leaks, out <= 1 s, back <= 30 s): "
               + ("all met" if g["all_met"] else "missed: " + "; ".join(missed)))  # fmt: skip
    return "\n".join(out)


def _s(x: float | None) -> str:
    return "--" if x is None else f"{x:.2f}"


def plot(result: dict[str, Any], path: str) -> None:
    plt = pyplot()
    runs = result["runs"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(7, 3 * len(runs)), squeeze=False)
    for ax, s in zip(axes[:, 0], runs):
        ok = [x for x in s["samples"] if x[2] == "OK" and x[1] >= 0]
        bad = [x for x in s["samples"] if x[2] not in (*OWN_FAULT, "DEADLINE_EXCEEDED")]
        ax.scatter([x[0] for x in ok], [x[1] * 1e3 for x in ok], s=4, label="OK")
        ax.scatter([x[0] for x in bad], [max(x[1], 0.001) * 1e3 for x in bad], s=12, marker="x",
                   color="r", label="failed")  # fmt: skip
        for k in s["kills"]:
            ax.axvline(k["t"], color="r", alpha=0.5)
            ax.text(k["t"], 1, f" {k['worker']}@{k['phase']}", fontsize=7, color="r")
            if k.get("back_after_kill_s"):
                ax.axvline(k["t"] + k["back_after_kill_s"], color="g", alpha=0.5)
        ax.set_yscale("log")
        ax.set_ylabel("TTFT (ms)")
        ax.set_title(f"run {s['run'] + 1}", fontsize=9)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("seconds into the run (request start)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
