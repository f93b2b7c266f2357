"""A helper process inside a test host, driven over its stdin/stdout (one JSON object a line).

A test cannot open a gRPC channel into a host's network from its own namespace, and Ray's API
needs a raylet on the caller's node: so it starts an agent in the host (``Agent(host)``) and asks
it. On the client host an agent sends requests over the host's own network (gRPC and HTTP to
the router's advertised address); on the head host it is a Ray driver (the router's and the
workers' actor methods). Requests ``{"id", "op", "args"}`` run on threads of their own, so a
load can run while other calls come and go; replies ``{"id", "ok", "result" | "error"}``.
Times are ``time.monotonic()``, the same clock in every host of the machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from cluster.testbed.host import Host, TestbedError

OPS: dict[str, Callable[..., Any]] = {}


def _op(fn: Callable[..., Any]) -> Callable[..., Any]:
    OPS[fn.__name__] = fn
    return fn


# ---- client side: the service's own doors ------------------------------------------------------
def _one(client: Any, req: dict[str, Any], timeout: float,
         progress: dict[str, int] | None = None,
         stop: threading.Event | None = None) -> dict[str, Any]:
    from router.errors import RemoteError

    rec: dict[str, Any] = {"request_id": req.get("request_id", ""), "t0": time.monotonic(),
                           "tokens": [], "status": "OK"}
    try:
        for chunk in client.stream(prompt_token_ids=req["ids"], max_tokens=req["max_tokens"],
                                   temperature=0.0, ignore_eos=True, timeout=timeout,
                                   request_id=req.get("request_id", ""),
                                   cache_salt=req.get("cache_salt", "")):
            if chunk.token_ids and "t_first" not in rec:
                rec["t_first"] = time.monotonic()
            rec["tokens"].extend(chunk.token_ids)
            rec["text"] = rec.get("text", "") + chunk.text
            if progress is not None:
                progress["tokens"] += len(chunk.token_ids)
            if chunk.usage is not None:
                rec["usage"] = dataclasses.asdict(chunk.usage)
            if stop is not None and stop.is_set():
                rec["status"] = "CANCELLED"  # leaving the loop cancels it on the server
                break
    except RemoteError as e:
        rec["status"], rec["error"] = e.code or "UNKNOWN", str(e)
    rec["t_end"] = time.monotonic()
    return rec


@_op
def generate(address: str, token: str | None, timeout: float = 120.0,
             **req: Any) -> dict[str, Any]:
    from router.client import StrataClient

    with StrataClient(address, token=token) as client:
        return _one(client, req, timeout)


_LOADS: dict[str, tuple[list[threading.Thread], list[dict[str, Any]], dict[str, int],
                        threading.Event]] = {}


@_op
def load_start(name: str, address: str, token: str | None, requests: list[dict[str, Any]],
               concurrency: int, timeout: float) -> int:
    """Send ``requests`` with ``concurrency`` streams open at a time, in the background."""
    from router.client import StrataClient

    todo: queue.Queue[dict[str, Any]] = queue.Queue()
    for r in requests:
        todo.put(r)
    records: list[dict[str, Any]] = []
    progress = {"tokens": 0}
    stop = threading.Event()

    def run() -> None:
        with StrataClient(address, token=token) as client:
            while True:
                try:
                    req = todo.get_nowait()
                except queue.Empty:
                    return
                records.append(_one(client, req, timeout, progress, stop))

    threads = [threading.Thread(target=run, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    _LOADS[name] = (threads, records, progress, stop)
    return len(requests)


@_op
def load_progress(name: str) -> dict[str, Any]:
    threads, records, progress, _ = _LOADS[name]
    return {"done": len(records), "running": sum(t.is_alive() for t in threads),
            "tokens": progress["tokens"]}


@_op
def load_wait(name: str, timeout: float) -> list[dict[str, Any]]:
    """The records of a load once every request ended (what ended within ``timeout``)."""
    threads, records, _, _ = _LOADS.pop(name)
    end = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    return list(records)


@_op
def load_stop(name: str) -> None:
    """Cancel the load's open streams at their next message (its other requests still run)."""
    _LOADS[name][3].set()


@_op
def stats(address: str, token: str | None) -> dict[str, dict[str, float]]:
    from router.client import StrataClient

    with StrataClient(address, token=token) as client:
        return client.stats(timeout=30)


@_op
def http_post(url: str, token: str | None, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token
                                             else {})})
    with urllib.request.urlopen(req, timeout=60) as resp:  # a test host's address
        return {"status": resp.status, "body": json.loads(resp.read())}


# ---- head side: a Ray driver ---------------------------------------------------------------------
def _ray() -> Any:
    import ray

    if not ray.is_initialized():
        ray.init(address="auto", namespace="strata", logging_level="WARNING")
    return ray


@_op
def router_call(method: str, args: list[Any], timeout: float = 60.0) -> Any:
    """A method of the router actor with JSON arguments and a JSON result."""
    ray = _ray()
    router = ray.get_actor("strata-router")
    return ray.get(getattr(router, method).remote(*args), timeout=timeout)


@_op
def index_blocks(worker_id: str, token_ids: list[int]) -> dict[str, int]:
    """How many of the prompt's blocks the router's index credits ``worker_id`` with, by tier."""
    ray = _ray()
    router = ray.get_actor("strata-router")
    hashes = ray.get(router.block_hashes.remote(token_ids), timeout=60)
    return ray.get(router.index_prefix.remote(worker_id, hashes), timeout=60)


@_op
def held_blocks(worker_id: str, token_ids: list[int]) -> dict[str, int]:
    """How many of the prompt's blocks ``worker_id`` itself holds (its snapshot): per tier,
    and ``leading``: the blocks of the prefix held in some tier (what the index should say)."""
    ray = _ray()
    hashes = ray.get(ray.get_actor("strata-router").block_hashes.remote(token_ids), timeout=60)
    snap = ray.get(ray.get_actor(f"strata-{worker_id}").snapshot_blocks.remote(), timeout=60)
    held = {tier: set(hs) for tier, hs in snap.blocks.items()}  # a BlockSnapshot
    out = {tier: sum(h in hs for h in hashes) for tier, hs in held.items()}
    anywhere = set().union(*held.values()) if held else set()
    out["leading"] = next((i for i, h in enumerate(hashes) if h not in anywhere), len(hashes))
    return out


@_op
def worker_call(worker_id: str, method: str, args: list[Any],
                timeout: float = 60.0) -> Any:
    ray = _ray()
    handle = ray.get_actor(f"strata-{worker_id}")
    return ray.get(getattr(handle, method).remote(*args), timeout=timeout)


@_op
def router_log(marks: list[str]) -> list[str]:
    """Lines of this node's Ray worker logs (the router's among them) holding one of ``marks``."""
    logs = "/tmp/ray/session_latest/logs"
    out: list[str] = []
    for name in sorted(os.listdir(logs)):
        if name.startswith("worker-") and name.endswith((".err", ".out")):
            with open(os.path.join(logs, name), errors="replace") as f:
                out.extend(ln.rstrip() for ln in f if any(m in ln for m in marks))
    return out


@_op
def node_ips() -> dict[str, str]:
    """Ray node id -> its address, for every node Ray knows alive."""
    return {n["NodeID"]: n["NodeManagerAddress"] for n in _ray().nodes() if n.get("Alive")}


# ---- the program -------------------------------------------------------------------------------
def serve() -> None:
    out = os.fdopen(os.dup(1), "w")  # replies only: whatever else prints goes to stderr
    os.dup2(2, 1)
    lock = threading.Lock()

    def handle(msg: dict[str, Any]) -> None:
        try:
            reply = {"id": msg["id"], "ok": True, "result": OPS[msg["op"]](**msg["args"])}
        except Exception as e:  # every failure goes back to the caller
            reply = {"id": msg["id"], "ok": False, "error": f"{type(e).__name__}: {e}"}
        with lock:
            out.write(json.dumps(reply) + "\n")
            out.flush()

    for line in sys.stdin:
        threading.Thread(target=handle, args=(json.loads(line),), daemon=True).start()
    os._exit(0)  # stdin closed: the caller is done (threads still blocked are not waited for)


class Agent:
    """The caller's end: ``call(op, **args)`` returns the result or raises ``TestbedError``."""

    def __init__(self, host: Host, log_path: str, env: dict[str, str]) -> None:
        self.host = host
        self._log = open(log_path, "ab")  # closed in close()
        self._proc = host.spawn([sys.executable, "-m", "cluster.testbed.agent"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                env=env)
        self._lock = threading.Lock()
        self._next = 0
        self._waiting: dict[int, Future] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            msg = json.loads(line)
            with self._lock:
                fut = self._waiting.pop(msg["id"], None)
            if fut is not None:
                fut.set_result(msg)
        with self._lock:
            left, self._waiting = list(self._waiting.values()), {}
        for fut in left:
            fut.set_result({"ok": False, "error": f"the agent on {self.host.name} ended"})

    def call(self, op: str, call_timeout: float = 120.0, **args: Any) -> Any:
        fut: Future = Future()
        with self._lock:
            self._next += 1
            self._waiting[self._next] = fut
            msg = json.dumps({"id": self._next, "op": op, "args": args}) + "\n"
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write(msg.encode())
                self._proc.stdin.flush()
            except OSError as e:
                raise TestbedError(f"the agent on {self.host.name} is gone: {e}") from e
        reply = fut.result(timeout=call_timeout)
        if not reply["ok"]:
            raise TestbedError(f"{op} on {self.host.name}: {reply['error']}")
        return reply["result"]

    def close(self) -> None:
        if self._proc.stdin is not None:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._log.close()


if __name__ == "__main__":
    serve()
