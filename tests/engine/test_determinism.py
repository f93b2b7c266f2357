"""bf16 on a CPU: which runs give bit-identical logits.

- Any mode: a warm run whose last chunk falls on the cold run's chunk grid computes the very
  same operations, so its logits are the cold run's bits.
- ``deterministic: true``: cold, warm from the device pool, the host tier and the disk tier,
  and a decode engine continuing after a prefill engine's handoff give the same bits; so does a
  request whatever it is batched with (its chunks and decodes beside other requests' ones).
"""

from __future__ import annotations

import random

import pytest
import torch

from engine.loader import load_model
from engine.sampling import SamplingParams
from kvstore.config import StoreConfig

KW = dict(model="tiny", dtype="bfloat16", kv_cache_bytes=8 << 20, max_num_batched_tokens=64)
PARAMS = SamplingParams(max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded():
    return load_model("tiny", "bfloat16", "cpu")


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(n)]


def _run(eng, prompts: list[list[int]], params: SamplingParams = PARAMS):
    """Results and, per prompt, the logits of each sampled token ``[n, vocab]``."""
    eng.runner.keep_logits = True
    res = eng.generate(prompts, params)
    return res, [torch.stack(eng.runner.kept_logits.pop(r.req_id)) for r in res]


def test_the_mode_from_yaml_flags_and_its_grid_check(tmp_path) -> None:
    from cluster.cli import build_parser
    from cluster.up import config_from_args
    from engine.config import EngineConfig

    yaml_path = tmp_path / "svc.yaml"
    yaml_path.write_text("engine: {deterministic: true, max_num_batched_tokens: 512}\n")
    parse = build_parser().parse_args
    assert config_from_args(parse(["up", "--config", str(yaml_path)])).engine.deterministic
    assert config_from_args(parse(["up", "--deterministic"])).engine.deterministic
    assert not config_from_args(parse(["up"])).engine.deterministic
    assert parse(["generate", "--prompt", "x", "--deterministic"]).deterministic
    with pytest.raises(ValueError, match="multiple of block_size"):
        EngineConfig(deterministic=True, max_num_batched_tokens=20)


def test_warm_tail_on_the_cold_chunk_grid_is_bit_identical(make_engine, loaded) -> None:
    shared, tail = _prompt(128, 1), _prompt(22, 2)  # 128 = two chunks of 64
    prompt = shared + tail
    cold_res, [cold] = _run(make_engine(loaded=loaded, **KW), [prompt])
    eng = make_engine(loaded=loaded, **KW)
    eng.generate([shared + [1] + tail], PARAMS)  # caches `shared`, computed in the same chunks
    warm_res, [warm] = _run(eng, [prompt])
    assert warm_res[0].cached_by_tier == {"device": 128}
    assert torch.equal(warm, cold) and warm.dtype == torch.float32 and warm.shape[0] == 4
    assert warm_res[0].output_token_ids == cold_res[0].output_token_ids


def test_deterministic_cold_and_warm_from_every_tier(make_engine, loaded, tmp_path) -> None:
    store = StoreConfig(host_capacity_bytes=4 << 20, disk_path=str(tmp_path / "kv"),
                        disk_capacity_bytes=64 << 20)  # fmt: skip
    eng = make_engine(store, loaded=loaded, deterministic=True, **KW)
    prompt = _prompt(150, 3)  # 9 full blocks: a warm run loads 8, the 64-token grid's worth
    cold_res, [cold] = _run(eng, [prompt])
    assert cold_res[0].num_cached_tokens == 0
    for tier in ("device", "host", "disk"):
        if tier != "device":
            eng.evict_cached(tier)
        res, [warm] = _run(eng, [prompt])
        assert res[0].cached_by_tier == {tier: 128}, tier
        assert torch.equal(warm, cold), tier


def test_deterministic_handoff_to_a_decode_engine(make_engine, loaded) -> None:
    prefill = make_engine(loaded=loaded, deterministic=True, **KW)
    decode = make_engine(loaded=loaded, deterministic=True, **KW)
    prompt = _prompt(150, 4)
    [colocated], [want] = _run(prefill, [prompt])  # the prompt, then three decode steps
    first, rest = colocated.output_token_ids[0], colocated.output_token_ids[1:]
    # what a prefill worker pushes: the prompt's full blocks; then prompt + its first token
    hashes = prefill.block_hashes(prompt)[: len(prompt) // 16]
    n, data = prefill.read_blocks(hashes)
    assert n == 9 and decode.write_blocks(hashes, data) == 9
    decode.runner.keep_logits = True
    steps: list[tuple[int, int]] = []
    run = decode.runner.launch

    def spy(batch):
        steps.append((batch[0].q_start, batch[0].q_len))
        return run(batch)

    decode.runner.launch = spy  # type: ignore[method-assign]
    decode.add_request("handoff", prompt + [first], SamplingParams(max_tokens=3, ignore_eos=True),
                       prefill_len=len(prompt))  # fmt: skip
    tokens = []
    while decode.has_unfinished():
        tokens += [t for out in decode.step() for t in out.new_token_ids]
    decode.flush_block_reports()
    got = torch.stack(decode.runner.kept_logits.pop("handoff"))
    assert tokens == rest
    assert torch.equal(got, want[1:])
    # the grid's last chunk as the prefill engine computed it, then the first token alone
    assert steps == [(128, 22), (150, 1), (151, 1), (152, 1)]


def test_deterministic_request_whatever_its_batch(make_engine, loaded) -> None:
    kw = dict(KW, enable_prefix_caching=False)
    target = _prompt(150, 5)
    others = [_prompt(n, 6 + n) for n in (40, 90, 200)]
    _, [alone] = _run(make_engine(loaded=loaded, deterministic=True, **kw), [target])
    eng = make_engine(loaded=loaded, deterministic=True, **kw)
    steps: list[list[int]] = []  # query counts of the steps the target ran in
    run = eng.runner.launch

    def spy(batch):
        if any(item.seq.token_ids[:150] == target for item in batch):
            steps.append([item.q_len for item in batch])
        return run(batch)

    eng.runner.launch = spy  # type: ignore[method-assign]
    _, logits = _run(eng, [others[0], target, others[1], others[2]])
    assert torch.equal(logits[1], alone)
    assert any(len(s) > 1 and max(s) > 1 for s in steps)  # it shared steps with others' chunks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_deterministic_on_cuda_graphs_and_eager_every_tier(make_engine, tmp_path) -> None:
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs kernels on CPU tensors; run without TRITON_INTERPRET")
    gpu = load_model("tiny", "bfloat16", "cuda")
    kw = dict(KW, kv_cache_bytes=64 << 20, deterministic=True)
    store = StoreConfig(host_capacity_bytes=16 << 20, disk_path=str(tmp_path / "kv"),
                        disk_capacity_bytes=64 << 20)  # fmt: skip
    graphs = make_engine(store, loaded=gpu, **kw)
    eager = make_engine(loaded=gpu, cuda_graphs=False, **kw)
    assert graphs.runner.graphs is not None and eager.runner.graphs is None
    prompt = _prompt(150, 9)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    _, [want] = _run(eager, [prompt], params)
    _, [cold] = _run(graphs, [prompt], params)
    assert torch.equal(cold, want)  # graph replays give the eager steps' bits
    for tier in ("device", "host", "disk"):
        if tier != "device":
            graphs.evict_cached(tier)
        res, [warm] = _run(graphs, [prompt], params)
        assert res[0].cached_by_tier == {tier: 128} and torch.equal(warm, cold), tier
    others = [_prompt(n, 20 + n) for n in (40, 300, 5)]
    _, logits = _run(graphs, [others[0], prompt, others[1], others[2]], params)
    assert torch.equal(logits[1], cold)  # batched with others (and warm from the device)
