"""The soak's faults: kill a worker of a role while requests are in a chosen phase.

A kill is ``ROLE:PHASE``:

| phase         | the kill comes                                                                |
| ------------- | ----------------------------------------------------------------------------- |
| ``prefill``   | while the probe's prompt is computed, before its first blocks were pushed      |
| ``push``      | while the probe's blocks stream from its prefill worker to its decode worker   |
| ``first_token`` | as the probe's first token reaches the client                                |
| ``decode``    | when the probe has streamed half of its tokens                                 |
| ``restart``   | at once, and again as soon as the killed worker's new process appears          |

The probe (``soak_load.Probe``) is a long request of its own sent just before the kill (another
one whenever the last went past the phase unseen). The
victim is the worker of the role with requests in that phase, from the router's per-worker
counts in ``Stats`` (``requests_prefill``, ``requests_awaiting_first``, ``requests_decoding``,
and a decode worker's ``pushes_open``); a service without them (an older router) gets its
``in_flight`` instead. If the phase is not seen within ``PHASE_WAIT_S`` the kill comes anyway
(``phase_seen`` is False). Kills are SIGKILL by pid (``kill_local``; on test hosts
``soak_hosts.HostFaults.kill_worker`` kills on the worker's host); the new process of a
restarting worker is found in ``/proc`` by its Ray actor class, so ``restart`` is for a service
on this machine only.

``poll`` follows each killed worker in ``Stats``: when it left placement (``down_at``, the
router's clock) and when it came back (``up_at``), against the kill and the new process's
``started_at``.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from bench.soak_load import Load, Probe

PHASES = ("prefill", "push", "first_token", "decode", "restart")
ROLE_PHASES = {
    "prefill": ("prefill", "push", "first_token", "restart"),
    "decode": ("decode", "first_token", "push", "prefill", "restart"),
}
PHASE_WAIT_S = 30.0
FIRST_TOKEN_WINDOW_S = 0.3
ACTOR_CLASS = {"prefill": "PrefillActor", "decode": "DecodeActor"}


def parse_kills(text: str) -> list[tuple[str, str]]:
    """``"prefill:push,decode:decode"`` -> [("prefill", "push"), ("decode", "decode")]."""
    kills = []
    for part in text.split(","):
        role, _, phase = part.strip().partition(":")
        if role not in ROLE_PHASES or phase not in ROLE_PHASES[role]:
            raise ValueError(
                f"--kills: {part!r} is not ROLE:PHASE (prefill: {', '.join(ROLE_PHASES['prefill'])}"
                f"; decode: {', '.join(ROLE_PHASES['decode'])})"
            )
        kills.append((role, phase))
    return kills


def default_kills(run: int) -> list[tuple[str, str]]:
    """One kill of each role; the phases rotate from one run to the next."""
    p, d = ROLE_PHASES["prefill"], ROLE_PHASES["decode"]
    return [("prefill", p[run % len(p)]), ("decode", d[run % len(d)])]


def kill_pid(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def kill_local(worker: str, pid: int) -> None:  # a pid of this machine
    """The default kill: ``pid`` is a process of this machine (``worker`` names it)."""
    kill_pid(pid)


def actor_pids(role: str) -> set[int]:
    """Processes of this machine running a Ray actor of ``role`` (by their process title)."""
    mark = f"ray::{ACTOR_CLASS[role]}".encode()
    pids = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if f.read(256).startswith(mark):
                    pids.add(int(name))
        except OSError:
            continue
    return pids


class Faults:
    def __init__(
        self,
        client: Any,  # router.client.StrataClient
        load: Load,
        t_start: float,
        kill: Callable[[str, int], None] = kill_local,
    ) -> None:
        self.client = client
        self.load = load
        self.t_start = t_start
        self.kill_fn = kill
        self.kills: list[dict[str, Any]] = []
        self.probes: list[Probe] = []
        self._ttft_s = 0.5  # the probe's TTFT, measured by a first probe (``calibrate``)

    def workers(self) -> dict[str, dict[str, float]]:
        return {w: s for w, s in self.client.stats().items() if w != "router"}

    def calibrate(self) -> None:
        """Send one probe without a fault: its TTFT times the phases of the next ones."""
        probe = Probe(self.load, len(self.probes))
        self.probes.append(probe)
        probe.start()
        probe.done.wait(self.load.args.request_timeout)
        if probe.rec.get("ttft_s"):
            self._ttft_s = probe.rec["ttft_s"]

    # ---- one kill ------------------------------------------------------------------------
    def _probe(self) -> Probe:
        probe = Probe(self.load, len(self.probes))
        self.probes.append(probe)
        probe.start()
        return probe

    def kill(self, role: str, phase: str) -> dict[str, Any]:
        victim, seen, stats, probe = self._victim(role, phase)
        pid = int(stats[victim].get("pid", 0))
        if not pid:
            raise ValueError(f"the service reports no pid for {victim}")
        before = actor_pids(role)
        wall = time.time()
        self.kill_fn(victim, pid)
        rec: dict[str, Any] = {
            "worker": victim, "role": role, "phase": phase, "phase_seen": seen,
            "t": time.monotonic() - self.t_start, "wall": wall, "pid": pid,
            "probe": probe.rec["request_id"],
            "victim_counts": {k: v for k, v in stats[victim].items()
                              if k.startswith("requests_") or k in ("in_flight", "pushes_open")},
        }  # fmt: skip
        if phase == "restart":
            rec.update(self._kill_restarting(victim, role, before | {pid}))
        self.kills.append(rec)
        return rec

    def _victim(self, role: str, phase: str) -> tuple[str, bool, dict[str, Any], Probe]:
        """The worker to kill, whether the phase was seen, the stats that chose it, and the
        probe it was timed by (a new probe whenever the last one went past the phase)."""
        end = time.monotonic() + PHASE_WAIT_S
        stats: dict[str, dict[str, float]] = {}
        probe = self._probe()
        while time.monotonic() < end:
            asked = time.monotonic()  # the stats describe the service from about here on
            stats = self.workers()
            ours = {w: s for w, s in stats.items() if w.startswith(role) and s.get("alive")}
            if ours:
                pick = self._pick(role, phase, probe, ours, asked)
                if pick is not None:
                    return pick, True, stats, probe
            if phase != "restart" and self._past(phase, probe):
                probe = self._probe()
            time.sleep(0.01)
        alive = sorted(w for w, s in stats.items() if w.startswith(role) and s.get("alive"))
        victim = alive[0] if alive else f"{role}-0"
        if victim not in stats:
            stats = self.workers()
        return victim, False, stats, probe

    def _past(self, phase: str, probe: Probe) -> bool:
        """Whether ``probe`` went past ``phase`` (another probe is needed)."""
        if probe.done.is_set():
            return True
        if phase in ("prefill", "push"):
            return probe.first_token_at is not None
        if phase == "first_token":
            return probe.first_token_at is not None and (
                time.monotonic() - probe.first_token_at > FIRST_TOKEN_WINDOW_S
            )
        return False

    def _pick(
        self,
        role: str,
        phase: str,
        probe: Probe,
        ours: dict[str, dict[str, float]],
        asked: float,
    ) -> str | None:
        def most(*keys: str) -> str | None:
            def count(w: str) -> float:
                return sum(ours[w].get(k, 0.0) for k in keys)

            best = max(ours, key=count)
            return best if count(best) > 0 else None

        age = asked - probe.sent_at  # the probe's age when the stats were asked for
        if phase == "restart":
            return most("in_flight") or min(ours)
        if phase in ("prefill", "push"):
            if probe.first_token_at is not None:
                return None  # too late for this probe
            early = age < 0.5 * self._ttft_s
            if (phase == "prefill") != early:
                return None
            if role == "prefill":
                return most("requests_prefill") if _new(ours) else most("in_flight")
            if phase == "push":
                return most("pushes_open")
            return most("requests_awaiting_first") if _new(ours) else most("admissions_waiting")
        if phase == "first_token":
            if probe.first_token_at is None or asked - probe.first_token_at > FIRST_TOKEN_WINDOW_S:
                return None
            if role == "prefill":
                return most("requests_prefill", "in_flight")
            return most("requests_awaiting_first", "requests_decoding", "in_flight")
        if phase == "decode":
            if probe.num_tokens < max(2, self.load.args.probe_max_tokens // 2):
                return None
            return most("requests_decoding") if _new(ours) else most("in_flight")
        raise ValueError(f"unknown phase {phase!r}")

    def _kill_restarting(self, victim: str, role: str, known: set[int]) -> dict[str, Any]:
        """Kill the killed worker's new process as soon as it appears (it is starting)."""
        end = time.monotonic() + 30.0
        while time.monotonic() < end:
            fresh = sorted(actor_pids(role) - known)
            if fresh:
                time.sleep(0.3)  # into its start-up (loading the model)
                self.kill_fn(victim, fresh[0])
                return {"second_kill_t": time.monotonic() - self.t_start, "second_pid": fresh[0]}
            time.sleep(0.02)
        return {"second_kill_t": None, "second_pid": None}

    # ---- recovery --------------------------------------------------------------------------
    def poll(self) -> None:
        """Fill in, for each kill, when its worker left placement and when it came back."""
        pending = [k for k in self.kills if "back_at" not in k]
        if not pending:
            return
        try:
            stats = self.workers()
        except Exception:  # asked again on the next poll
            return
        now = time.time()
        for k in pending:
            s = stats.get(k["worker"], {})
            down_at = s.get("down_at", 0.0)
            if "out_at" not in k:
                if down_at >= k["wall"] - 1.0:
                    k["out_at"] = down_at  # the router's clock (same machine)
                elif not s.get("alive") and "down_at" not in s:
                    k["out_at"] = now  # an older router: seen from here
            killed = {k["pid"], k.get("second_pid")}
            if s.get("alive") and int(s.get("pid", 0)) not in killed and "out_at" in k:
                k["back_at"] = s.get("up_at") or now
                k["started_at"] = s.get("started_at") or None

    def summary(self) -> list[dict[str, Any]]:
        out = []
        for k in self.kills:
            k = dict(k)
            k["out_after_s"] = k["out_at"] - k["wall"] if "out_at" in k else None
            k["back_after_kill_s"] = k["back_at"] - k["wall"] if "back_at" in k else None
            started = k.get("started_at")
            k["back_after_restart_s"] = (
                k["back_at"] - started if "back_at" in k and started else None
            )
            out.append(k)
        return out


def _new(ours: dict[str, dict[str, float]]) -> bool:
    """Whether the router reports the requests' phases per worker (this code's router)."""
    return any("requests_prefill" in s for s in ours.values())
