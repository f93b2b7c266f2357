"""Network faults on a ``HostCluster`` and their account: time to detect, time to recover, and
what became of every request sent meanwhile.

A fault is a pair of actions (``begin``, ``end``) on the bridge or a host: a cable pulled and put
back (``LinkDown``), a partition between two hosts that heals (``Partition``), a host whose
every process is killed and that runs ``ray start`` again (``Reboot``). ``run_fault`` sends a
load from the client host, begins the fault once the load is under way, ends it after
``duration_s`` and waits for the load to end (every request has a deadline), watching the
router's view of the workers meanwhile (``StateWatch``, through the head's Ray driver).

Detected: the first moment after the fault began at which the router no longer places on one of
the fault's workers (its state is not ``up``), or a request on it was retried or failed.
Recovered: the first moment after the fault ended at which every worker is ``up`` again.
Retried: requests the router's log says it moved to another worker (``retrying <id>``) or whose
missing KV the decode worker computed after losing its prefill worker.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from cluster.testbed.cluster import CLIENT, HEAD, HostCluster
from cluster.testbed.host import TestbedError

RETRY_MARKS = ("retrying ", "computes what is missing")


class StateWatch:
    """Polls the router's ``workers()`` on a thread: (time, {worker: state}) samples."""

    def __init__(self, tb: HostCluster, every: float = 0.25) -> None:
        self.tb = tb
        self.every = every
        self.samples: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        agent = self.tb.agent(HEAD)
        while not self._stop.is_set():
            try:
                ws = agent.call("router_call", method="workers", args=[], call_timeout=30)
                self.samples.append((time.monotonic(),
                                     {w["worker_id"]: w["state"] for w in ws}))
            except TestbedError:
                pass
            self._stop.wait(self.every)

    def first(self, after: float, pred: Any) -> float | None:
        """Time of the first sample after ``after`` where ``pred(states)`` holds."""
        return next((t for t, s in self.samples if t >= after and pred(s)), None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


@dataclass
class FaultReport:
    name: str
    began: float
    ended: float
    detect_s: float | None  # fault begun -> the router acted (None: it never did)
    recover_s: float | None  # fault ended -> every worker up again (None: not within the wait)
    sent: int = 0
    ok: int = 0
    retried: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # status -> count
    wrong: int = 0  # OK answers that differ from the in-process engine
    hung: int = 0  # passed their deadline or never ended
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok_share(self) -> float:
        return self.ok / self.sent if self.sent else 1.0

    def line(self) -> str:
        def s(x: float | None) -> str:
            return f"{x:.1f} s" if x is not None else "never"

        failed = ", ".join(f"{k} {v}" for k, v in sorted(self.failed.items())) or "none"
        return (f"{self.name}: detected after {s(self.detect_s)}, recovered {s(self.recover_s)}"
                f" after it ended; {self.sent} requests: {self.ok} OK ({self.retried} retried),"
                f" failed: {failed}; wrong {self.wrong}, hung {self.hung}")


def retried_ids(tb: HostCluster, request_ids: list[str]) -> set[str]:
    """The requests the router's log says it moved or recovered (see ``RETRY_MARKS``)."""
    lines: list[str] = tb.agent(HEAD).call("router_log", marks=list(RETRY_MARKS))
    return {r for r in request_ids if any(f" {r} " in f" {ln} " or f"{r};" in ln
                                          for ln in lines)}


def account(report: FaultReport, records: list[dict[str, Any]], expected: dict[str, list[int]],
            retried: set[str], deadline_s: float) -> FaultReport:
    report.records = records
    report.sent = len(records)
    for r in records:
        late = r.get("t_end") is None or r["t_end"] - r["t0"] > deadline_s + 5
        if late or r["status"] == "DEADLINE_EXCEEDED":
            report.hung += 1
        if r["status"] == "OK":
            report.ok += 1
            report.wrong += r["tokens"] != expected[r["request_id"]]
        else:
            report.failed[r["status"]] = report.failed.get(r["status"], 0) + 1
        report.retried += r["request_id"] in retried
    return report


def run_fault(tb: HostCluster, name: str, address: str, token: str | None,
              requests: list[dict[str, Any]], expected: dict[str, list[int]],
              begin: Any, end: Any, duration_s: float, workers: list[str],
              deadline_s: float = 60.0, concurrency: int = 4, begin_after_tokens: int = 1,
              recover_within_s: float = 90.0) -> FaultReport:
    """Load -> ``begin()`` once ``begin_after_tokens`` tokens streamed (0: at once) ->
    ``end()`` after ``duration_s`` -> the load's end and every worker back; ``workers``: those
    the fault hits."""
    client = tb.agent(CLIENT)
    watch = StateWatch(tb)
    try:
        client.call("load_start", name=name, address=address, token=token, requests=requests,
                    concurrency=concurrency, timeout=deadline_s)
        tb.wait_until("a streaming request",
                      lambda: client.call("load_progress", name=name)["tokens"]
                      >= begin_after_tokens, timeout=deadline_s, every=0.1)
        began = time.monotonic()
        begin()
        time.sleep(duration_s)
        ended = time.monotonic()
        end()
        records = client.call("load_wait", name=name, timeout=deadline_s * 3,
                              call_timeout=deadline_s * 3 + 30)
        all_up = watch.first(ended, lambda s: all(v == "up" for v in s.values()))
        if all_up is None:
            try:
                tb.wait_until("every worker up", lambda: watch.first(
                    ended, lambda s: all(v == "up" for v in s.values())) is not None,
                    timeout=recover_within_s)
            except TestbedError:
                pass
            all_up = watch.first(ended, lambda s: all(v == "up" for v in s.values()))
    finally:
        watch.stop()
    acted = watch.first(began, lambda s: any(s.get(w) != "up" for w in workers))
    ids = [r["request_id"] for r in records]
    retried = retried_ids(tb, ids)
    failures = [r["t_end"] for r in records
                if r.get("t_end") and r["t_end"] >= began
                and (r["status"] != "OK" or r["request_id"] in retried)]
    candidates = [t for t in (acted, min(failures, default=None)) if t is not None]
    report = FaultReport(name, began, ended,
                         detect_s=min(candidates) - began if candidates else None,
                         recover_s=(all_up - ended) if all_up is not None else None)
    return account(report, records, expected, retried, deadline_s)
