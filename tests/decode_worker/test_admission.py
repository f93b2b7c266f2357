"""When a decode request enters the engine: after its push ended (or its timeout), with the first
token from the push's end or the router's word; aborts and words that come before the request."""

from __future__ import annotations

import threading
import time

import pytest

from decode_worker.admission import Admissions
from proto.worker_api import DecodeRequest, SamplingParams


class Recorder:
    def __init__(self) -> None:
        self.admitted: dict[str, tuple[DecodeRequest, str, float]] = {}
        self.aborted: list[str] = []
        self.event = threading.Event()

    def admit(self, req: DecodeRequest, outcome: str, waited: float) -> None:
        assert req.req_id not in self.admitted, "admitted twice"
        self.admitted[req.req_id] = (req, outcome, waited)
        self.event.set()

    def abort(self, req_id: str) -> None:
        self.aborted.append(req_id)


@pytest.fixture
def adm():
    rec = Recorder()
    a = Admissions(rec.admit, rec.abort)
    yield a, rec
    a.close()


def _req(
    rid: str, awaits: bool = True, expect: bool = True, timeout: float = 30.0
) -> DecodeRequest:
    return DecodeRequest(rid, (1, 2, 3), SamplingParams(max_tokens=5), "", expect, timeout, awaits)


def test_push_with_first_token_admits_at_once(adm) -> None:
    a, rec = adm
    a.arrive(_req("r"))
    assert "r" not in rec.admitted  # blocks and token still on their way
    a.pushed("r", True, 42)
    req, outcome, _ = rec.admitted["r"]
    assert outcome == "ok" and req.token_ids == (1, 2, 3, 42) and not req.awaits_first_token
    assert req.sampling.max_tokens == 5
    a.told("r", 42)  # the router's word after that changes nothing
    assert len(rec.admitted) == 1 and a.num_waiting == 0


def test_push_before_the_request_and_a_broken_push_with_the_routers_word(adm) -> None:
    a, rec = adm
    a.pushed("early", True, 7)  # the push ended before the request came
    a.arrive(_req("early"))
    assert rec.admitted["early"][0].token_ids == (1, 2, 3, 7)
    a.arrive(_req("broken"))
    a.pushed("broken", False)  # the stream broke: no token from it
    assert "broken" not in rec.admitted
    a.told("broken", 9)
    req, outcome, _ = rec.admitted["broken"]
    assert outcome == "failed" and req.token_ids == (1, 2, 3, 9)


def test_no_first_token_anywhere_means_the_engine_samples_it(adm) -> None:
    a, rec = adm
    a.arrive(_req("lost"))
    a.told("lost", None, push_coming=False)  # the prefill worker died before sampling it
    req, outcome, _ = rec.admitted["lost"]
    assert outcome == "failed" and req.token_ids == (1, 2, 3)
    assert req.sampling.max_tokens == 6  # the first token too


def test_a_request_without_push_or_wait_is_admitted_as_is(adm) -> None:
    a, rec = adm
    a.arrive(_req("plain", awaits=False, expect=False))
    req, outcome, _ = rec.admitted["plain"]
    assert outcome == "none" and req.token_ids == (1, 2, 3)


def test_timeouts_admit_without_the_push_and_then_without_the_token(adm) -> None:
    a, rec = adm
    a.arrive(_req("slow", awaits=False, timeout=0.1))
    assert rec.event.wait(5)
    assert rec.admitted["slow"][1] == "timed_out"
    rec.event.clear()
    t0 = time.monotonic()
    a.arrive(_req("silent", timeout=0.1))  # no push, no word from the router
    assert rec.event.wait(5)
    req, outcome, waited = rec.admitted["silent"]
    assert outcome == "timed_out" and req.sampling.max_tokens == 6
    assert 0.2 <= waited < 5 and time.monotonic() - t0 >= 0.2  # two timeouts


def test_aborts_before_and_while_waiting(adm) -> None:
    a, rec = adm
    assert not a.abort("ghost")  # not here yet: remembered
    a.arrive(_req("ghost"))
    assert rec.aborted == ["ghost"] and "ghost" not in rec.admitted
    a.arrive(_req("waiting"))
    assert a.abort("waiting")
    assert rec.aborted == ["ghost", "waiting"]
    a.pushed("waiting", True, 3)  # too late: never admitted
    assert "waiting" not in rec.admitted and a.num_waiting == 0
