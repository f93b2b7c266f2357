"""EngineLoop: published requests (a decode worker's) reach the output sink once per step with
every request of that step, their errors and aborts too; block watchers see each chunk's full
blocks right after the step that computed them; streams carry the same tokens as the engine."""

from __future__ import annotations

import threading

from engine.loop import EngineLoop, RequestAborted
from engine.sampling import SamplingParams
from engine.sequence import StepOutput


class Sink:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[list[StepOutput], dict[str, BaseException]]] = []
        self.ended: dict[str, object] = {}
        self.done = threading.Condition(self.lock)

    def __call__(self, outputs: list[StepOutput], errors: dict[str, BaseException]) -> None:
        with self.lock:
            self.calls.append((outputs, errors))
            for o in outputs:
                if o.finished:
                    self.ended[o.req_id] = o.finish_reason
            self.ended.update(errors)
            self.done.notify_all()

    def wait(self, n: int, timeout: float = 60.0) -> None:
        with self.lock:
            assert self.done.wait_for(lambda: len(self.ended) >= n, timeout), self.ended

    def tokens(self, req_id: str) -> list[int]:
        return [t for outs, _ in self.calls for o in outs if o.req_id == req_id
                for t in o.new_token_ids]


def test_published_requests_share_one_sink_call_per_step(make_engine) -> None:
    tiny = make_engine(model="tiny", kv_cache_bytes=4 << 20, max_model_len=2048)
    sampling = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = [list(range(3 + i, 40 + i)) for i in range(3)]
    expected = tiny.generate(prompts, sampling)
    sink = Sink()
    loop = EngineLoop(tiny, name="test-loop", on_outputs=sink)
    try:
        for i, p in enumerate(prompts):
            loop.submit_published(f"p{i}", p, sampling)
        sink.wait(3)
    finally:
        loop.close()
    for i in range(3):
        assert sink.tokens(f"p{i}") == expected[i].output_token_ids
        assert sink.ended[f"p{i}"] == "length"
    # one call per step, each with every request that produced a token in it
    together = [outs for outs, _ in sink.calls if len({o.req_id for o in outs}) == 3]
    assert len(together) >= 10
    assert all(len({o.req_id for o in outs}) == len(outs) for outs, _ in sink.calls)


def test_published_errors_and_aborts_reach_the_sink(make_engine) -> None:
    tiny = make_engine(model="tiny", kv_cache_bytes=4 << 20, max_model_len=256)
    sink = Sink()
    loop = EngineLoop(tiny, name="test-loop", on_outputs=sink)
    try:
        loop.submit_published("bad", [1, 2, 10**6], SamplingParams(max_tokens=2))
        loop.submit_published("long", list(range(3, 40)), SamplingParams(max_tokens=200))
        loop.abort("long")
        sink.wait(2)
    finally:
        loop.close()
    assert isinstance(sink.ended["bad"], ValueError)
    assert isinstance(sink.ended["long"], RequestAborted) or sink.ended["long"] == "length"


def test_block_watch_reports_each_chunk_after_its_step(make_engine) -> None:
    eng = make_engine(
        model="tiny", kv_cache_bytes=4 << 20, max_model_len=2048, max_num_batched_tokens=64
    )
    prompt = [(i * 5) % 250 for i in range(200)]  # 12 full blocks, 4 steps of 64 tokens
    seen: list[tuple[int, int]] = []
    copies: list[bytes] = []

    def listener(first: int, block_ids: list[int]) -> None:
        seen.append((first, len(block_ids)))
        import torch

        out = torch.empty((len(block_ids), eng.layout.block_nbytes), dtype=torch.uint8)
        eng.kv.read_pool_blocks_into(block_ids, out)
        copies.append(out.numpy().tobytes())

    loop = EngineLoop(eng, name="test-loop")
    try:
        stream = loop.submit("w", prompt, SamplingParams(max_tokens=1), on_blocks=(listener, 12))
        stream.get(timeout=60)
        hashes = eng.block_hashes(prompt)
        n, data = loop.call(lambda e: e.read_blocks(hashes))
    finally:
        loop.close()
    assert seen == [(0, 4), (4, 4), (8, 4)]  # steps 1-3 complete 4 blocks each; step 4 none
    assert n == 12 and b"".join(copies) == data.numpy().tobytes()


def test_stream_of_a_real_engine_has_every_token(make_engine) -> None:
    tiny = make_engine(model="tiny", kv_cache_bytes=4 << 20, max_model_len=2048)
    sampling = SamplingParams(max_tokens=24, ignore_eos=True)
    prompt = list(range(3, 40))
    expected = tiny.generate([prompt], sampling)[0].output_token_ids
    loop = EngineLoop(tiny, name="test-loop")
    try:
        got = [t for out in loop.submit("m", prompt, sampling).iter(timeout=30)
               for t in out.new_token_ids]
    finally:
        loop.close()
    assert got == expected
