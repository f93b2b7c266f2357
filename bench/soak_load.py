"""The soak's load and its checks (``bench/soak.py`` drives them).

``Load``: ``clients`` threads, each sending one request after another through the sync
``StrataClient``: prompts share one of a few long prefixes (so prefix reuse, pushes and
placement all work) and end in a random suffix; most are greedy, ``seeded_share`` sample with a
temperature and a seed; some are cancelled after their first token, some give up before it (a
client deadline of 20-400 ms: their DEADLINE_EXCEEDED is the client's doing), some are
malformed (a token id outside the vocabulary). ``Probe``: one long request with a prompt of its
own, sent by the fault injector to have a request in a known phase at a kill. Every request
becomes a ``record``: what was sent, its status (and the error's details), its tokens and timing.

``check_outputs`` runs every answered request again on the in-process engine (the same
sampling, the same seed) and counts those whose tokens differ; ``check_leaks`` waits until every
worker's blocks are free again.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

from bench.common import random_prompt

SEEDED = {"temperature": 0.8, "top_p": 0.95}  # the sampling of seeded requests


def request_kind(
    r: random.Random, bad_share: float, cancel_share: float, give_up_share: float = 0.0
) -> str:
    x = r.random()
    if x < bad_share:
        return "bad"
    if x < bad_share + cancel_share:
        return "cancel"
    if x < bad_share + cancel_share + give_up_share:
        return "give_up"
    return "ok"


def send(
    client: Any,  # router.client.StrataClient
    rec: dict[str, Any],
    vocab: int,
    timeout: float,
    t_start: float,
    on_token: Any = None,  # called with the tokens so far after each message
) -> dict[str, Any]:
    """Send ``rec`` (kind, prompt, max_tokens, seed) and fill in its outcome."""
    from router.errors import RemoteError

    t0 = time.monotonic()
    rec["t0"] = t0 - t_start
    tokens: list[int] = []
    sampling = {"temperature": 0.0} if rec.get("seed") is None else {**SEEDED, "seed": rec["seed"]}
    try:
        ids = rec["prompt"] + [vocab + 10_000] if rec["kind"] == "bad" else rec["prompt"]
        stream = client.stream(
            prompt_token_ids=ids,
            max_tokens=rec["max_tokens"],
            ignore_eos=True,
            cache_salt=rec["salt"],
            timeout=rec.get("timeout", timeout),
            request_id=rec.get("request_id", ""),
            **sampling,
        )
        for chunk in stream:
            if not tokens and chunk.token_ids:
                rec["ttft_s"] = time.monotonic() - t0
            tokens.extend(chunk.token_ids)
            if on_token is not None:
                on_token(len(tokens))
            if rec["kind"] == "cancel" and tokens:
                stream.close()
                break
        rec["status"] = "CANCELLED" if rec["kind"] == "cancel" else "OK"
    except RemoteError as e:
        rec["status"] = e.code or "UNKNOWN"
        rec["details"] = e.details
    if rec["kind"] == "give_up" and rec["status"] != "DEADLINE_EXCEEDED":
        rec["kind"] = "ok"  # answered (or failed by the service) before the client gave up
    rec["tokens"] = tokens
    rec["t1"] = time.monotonic() - t_start
    return rec


class Load:
    """The client threads of one soak run (see the module docstring)."""

    def __init__(self, args: Any, address: str, vocab: int, run: int, t_start: float) -> None:
        self.args = args
        self.address = address
        self.vocab = vocab
        self.t_start = t_start
        self.salt = f"soak-{run}-{random.random()}"  # every run starts cold
        seed = args.seed * 1_000 + run
        self.seed = seed
        self.prefixes = [
            random_prompt(seed * 97 + i, args.prefix_tokens, vocab) for i in range(4)
        ]
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop_at = 0.0
        self._threads: list[threading.Thread] = []

    def start(self, seconds: float) -> None:
        self._stop_at = time.monotonic() + seconds
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True, name=f"soak-client-{i}")
            for i in range(self.args.clients)
        ]
        for t in self._threads:
            t.start()

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def join(self, timeout: float) -> int:
        """Wait for the clients; returns how many are still running (hung)."""
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        return sum(1 for t in self._threads if t.is_alive())

    def _client(self, i: int) -> None:
        from router.client import StrataClient

        a = self.args
        k = i
        with StrataClient(self.address, token=a.token) as client:
            while time.monotonic() < self._stop_at:
                r = random.Random(self.seed * 1_000_003 + k)
                suffix = random_prompt(self.seed * 7919 + k, r.randrange(8, 64), self.vocab)
                kind = request_kind(r, a.bad_share, a.cancel_share, a.give_up_share)
                rec: dict[str, Any] = {
                    "kind": kind,
                    "prompt": self.prefixes[r.randrange(len(self.prefixes))] + suffix,
                    "max_tokens": a.max_tokens,
                    "salt": self.salt,
                    "seed": r.randrange(1 << 30) if r.random() < a.seeded_share else None,
                }
                if kind == "give_up":
                    rec["timeout"] = r.uniform(0.02, 0.4)
                send(client, rec, self.vocab, a.request_timeout, self.t_start)
                with self._lock:
                    self.records.append(rec)
                k += a.clients


class Probe:
    """One long request (a prompt of its own, prefilled in several chunks, then many tokens)
    on a thread: the fault injector kills while it is in a given phase."""

    def __init__(self, load: Load, num: int) -> None:
        a = load.args
        self.rec: dict[str, Any] = {
            "kind": "ok",
            "probe": True,
            "prompt": random_prompt(load.seed * 31 + 7 * num + 1, a.probe_tokens, load.vocab),
            "max_tokens": a.probe_max_tokens,
            "salt": load.salt,
            "seed": None,
            "request_id": f"soak-probe-{load.seed}-{num}-{random.randrange(1 << 30)}",
        }
        self.load = load
        self.sent_at = 0.0
        self.first_token_at: float | None = None
        self.num_tokens = 0
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="soak-probe")

    def start(self) -> None:
        self.sent_at = time.monotonic()
        self._thread.start()

    def _on_token(self, n: int) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.num_tokens = n

    def _run(self) -> None:
        from router.client import StrataClient

        a = self.load.args
        try:
            with StrataClient(self.load.address, token=a.token) as client:
                send(client, self.rec, self.load.vocab, a.request_timeout, self.load.t_start,
                     self._on_token)  # fmt: skip
        finally:
            with self.load._lock:
                self.load.records.append(self.rec)
            self.done.set()


def check_outputs(args: Any, records: list[dict[str, Any]]) -> int:
    """Every answered request against the in-process engine on the same prompt, sampling and
    seed (batched, after the load); sets ``expected`` on each; returns how many differ."""
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling import SamplingParams

    done = [r for r in records if r["status"] == "OK"]
    if not done:
        return 0
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, kv_cache_bytes=128 << 20,
                                    max_model_len=4096))  # fmt: skip
    wrong = 0
    try:
        for start in range(0, len(done), 32):
            batch = done[start : start + 32]
            params = [
                SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True)
                if r.get("seed") is None
                else SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True, seed=r["seed"],
                                    **SEEDED)  # fmt: skip
                for r in batch
            ]
            results = engine.generate([r["prompt"] for r in batch], params)
            for r, res in zip(batch, results):
                r["expected"] = res.output_token_ids
                r["wrong"] = r["tokens"] != res.output_token_ids
                wrong += r["wrong"]
    finally:
        engine.close()
    return wrong


def check_leaks(address: str, token: str | None) -> dict[str, Any]:
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
                         or s.get("num_running") or s.get("num_waiting"))}  # fmt: skip
            if not busy or time.monotonic() > deadline:
                return {"workers_checked": len(stats), "leaking": busy}
            time.sleep(1.0)
