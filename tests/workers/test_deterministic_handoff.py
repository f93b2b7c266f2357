"""Deterministic mode across a real prefill -> decode handoff (plain worker classes, gRPC on
loopback, bf16 on a CPU): the decode worker computes the prompt's last chunk on the grid and the
prefill worker's first token alone, as one engine does, and gets that engine's logits bit for
bit."""

from __future__ import annotations

import random

import torch

from decode_worker.worker import DecodeWorker, continuation
from engine.config import EngineConfig
from engine.engine import LLMEngine
from kvstore.config import StoreConfig
from prefill_worker.worker import PrefillWorker
from proto.worker_api import DecodeRequest, PrefillRequest, SamplingParams
from tests.workers.sync_outputs import SyncOutputs
from worker.spec import WorkerSpec

SECRET = "s3"


def test_handoff_gives_one_engines_bits() -> None:
    cfg = EngineConfig(
        model="tiny", dtype="bfloat16", kv_cache_bytes=16 << 20, max_model_len=1024,
        max_num_batched_tokens=64, deterministic=True,
    )  # fmt: skip
    store = StoreConfig(host_capacity_bytes=8 << 20)
    rng = random.Random(7)
    prompt = [rng.randrange(3, 250) for _ in range(150)]
    sampling = SamplingParams(max_tokens=4, ignore_eos=True)
    one = LLMEngine(cfg)
    try:
        one.runner.keep_logits = True
        [res] = one.generate([prompt], sampling)
        want = torch.stack(one.runner.kept_logits.pop(res.req_id))
    finally:
        one.close()
    p = PrefillWorker(WorkerSpec("prefill-det", cfg, store, secret=SECRET))
    d = DecodeWorker(WorkerSpec("decode-det", cfg, store, secret=SECRET))
    out = SyncOutputs("decode-det", d.outputs_address, SECRET)
    try:
        assert out.wait_connected(30)
        engine = d.loop.engine
        steps: list[tuple[int, int]] = []
        run = engine.runner.launch

        def spy(batch):  # runs on the decode worker's loop thread
            steps.extend((item.q_start, item.q_len) for item in batch)
            return run(batch)

        engine.runner.launch = spy  # type: ignore[method-assign]
        engine.runner.keep_logits = True
        first = p.prefill(PrefillRequest("r", tuple(prompt), sampling, "",
                                         decode_kv_address=d.kv_address)).first_token  # fmt: skip
        q = out.register("r")
        d.start(DecodeRequest("r", (*prompt, first), continuation(sampling), "",
                              num_prompt_tokens=len(prompt)))  # fmt: skip
        tokens = [first]
        while True:
            item = q.get(timeout=60)
            tokens.extend(item.token_ids)
            if item.finish_reason:
                break
        got = d.loop.call(lambda eng: torch.stack(eng.runner.kept_logits.pop("r")))
        assert tokens == res.output_token_ids
        assert steps == [(128, 22), (150, 1), (151, 1), (152, 1)]
        assert torch.equal(got, want[1:])
    finally:
        out.close()
        try:
            assert p.check_no_leaks() and d.check_no_leaks()
        finally:
            p.shutdown()
            d.shutdown()
