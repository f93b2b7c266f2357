"""EngineLoop streams: merged deltas carry every token once, in order, and the same tokens as
the engine run directly."""

from __future__ import annotations

import time

import pytest

from engine.loop import EngineLoop, RequestStream
from engine.sampling import SamplingParams
from engine.sequence import StepOutput


def _out(tokens: tuple[int, ...], n: int, finished: bool = False) -> StepOutput:
    return StepOutput("r", tokens, finished, "length" if finished else None, 4, n, 0, {}, 0.01)


def test_iter_merged_joins_waiting_outputs_and_stops_at_the_end() -> None:
    s = RequestStream("r")
    for i, out in enumerate([_out((1,), 1), _out((2,), 2), _out((3,), 3, finished=True)]):
        s.put(out)
        if i == 0:
            first = next(s.iter_merged())  # only the first was waiting
    assert first.new_token_ids == (1,)
    s2 = RequestStream("r")
    for out in [_out((1,), 1), _out((2, 3), 3), _out((4,), 4, finished=True), _out((9,), 5)]:
        s2.put(out)
    merged = list(s2.iter_merged())
    assert [m.new_token_ids for m in merged] == [(1, 2, 3, 4)]  # ends at the finished one
    assert merged[0].finished and merged[0].num_output_tokens == 4


def test_iter_merged_raises_a_queued_error_after_the_tokens_before_it() -> None:
    s = RequestStream("r")
    s.put(_out((1,), 1))
    s.put(_out((2,), 2))
    s.put(RuntimeError("worker failed"))
    it = s.iter_merged()
    assert next(it).new_token_ids == (1, 2)
    with pytest.raises(RuntimeError, match="worker failed"):
        next(it)


def test_merged_stream_of_a_real_engine_has_every_token(make_engine) -> None:  # noqa: ANN001
    tiny = make_engine(model="tiny", kv_cache_bytes=4 << 20, max_model_len=2048)
    sampling = SamplingParams(max_tokens=24, ignore_eos=True)
    prompt = list(range(3, 40))
    expected = tiny.generate([prompt], sampling)[0].output_token_ids
    loop = EngineLoop(tiny, name="test-loop")
    try:
        stream = loop.submit("m", prompt, sampling)
        time.sleep(0.2)  # let several steps' outputs wait in the queue
        deltas = list(stream.iter_merged(timeout=30))
    finally:
        loop.close()
    assert [t for d in deltas for t in d.new_token_ids] == expected
    assert len(deltas) < len(expected) and deltas[-1].finished
