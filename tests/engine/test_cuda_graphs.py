"""Short steps (decodes, and a warm hit's last chunk) through the padded static buffers of
``engine.cuda_graphs``.

On a CPU the graphs cannot be captured, so the same buffers run eagerly (``capture=False``)
through the Triton kernels under the interpreter: padding rows and lanes, the scratch block,
the buckets and the incrementally written block tables give the tokens of ordinary steps. On
CUDA (``gpu``) captured graphs give the tokens of eager steps.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from engine.cuda_graphs import StepGraphs
from engine.sampling import SamplingParams

pytest.importorskip("triton")

PARAMS = SamplingParams(max_tokens=5, ignore_eos=True)
PROMPTS = [[(i * 11 + j * 3) % 250 for j in range(n)] for i, n in enumerate((20, 47, 33))]


def test_padded_buffers_decode_like_the_eager_runner(make_engine) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter off: the CUDA run is the gpu-marked test below")
    kw = dict(model="tiny", kv_cache_bytes=2 << 20)
    ref = make_engine(attention_backend="torch", **kw)  # the reference: no interpreter
    eng = make_engine(attention_backend="triton", **kw)
    graphs = StepGraphs(
        eng.runner.model, eng.kv.kv_caches, eng.block_size, eng.device, eng.kv.scratch_block,
        max_batch=4, max_model_len=eng.max_model_len, fused=False, capture=False,
    )  # fmt: skip
    eng.runner.graphs = graphs
    want = ref.generate(PROMPTS, PARAMS)
    scratch = [cache[eng.kv.scratch_block].clone() for cache in eng.kv.kv_caches]
    got = eng.generate(PROMPTS, PARAMS)  # 3 sequences -> bucket 4: one padding lane
    assert [g.output_token_ids for g in got] == [w.output_token_ids for w in want]
    assert graphs._graphs and all(b == 4 for _, b, _ in graphs._graphs)
    assert any(not torch.equal(a, c[eng.kv.scratch_block]) for a, c in
               zip(scratch, eng.kv.kv_caches))  # the padding lane wrote the scratch block
    one = eng.generate(PROMPTS[:1], PARAMS)[0]  # batch 1: its own bucket
    assert one.output_token_ids == want[0].output_token_ids
    assert (1, 1, 1024) in graphs._graphs
    # the bucket-4 graph again, its lanes now other sequences: their tables are rewritten
    others = [p[::-1] for p in PROMPTS]
    got = eng.generate(others, PARAMS)
    assert [g.output_token_ids for g in got] == [
        w.output_token_ids for w in ref.generate(others, PARAMS)]


def test_warm_hit_tail_runs_in_a_short_graph(make_engine) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter off: the CUDA run is the gpu-marked test below")
    kw = dict(model="tiny", kv_cache_bytes=2 << 20)
    ref = make_engine(attention_backend="torch", **kw)  # the reference: no interpreter
    eng = make_engine(attention_backend="triton", **kw)
    graphs = StepGraphs(
        eng.runner.model, eng.kv.kv_caches, eng.block_size, eng.device, eng.kv.scratch_block,
        max_batch=4, max_model_len=eng.max_model_len, fused=False, capture=False,
    )  # fmt: skip
    eng.runner.graphs = graphs
    prompt = [(i * 13) % 250 for i in range(75)]  # 64 cached tokens, then an 11-token tail
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    for e in (ref, eng):
        e.generate([prompt], params)
    warm = eng.generate([prompt], params)[0]
    assert warm.num_cached_tokens == 64
    assert warm.output_token_ids == ref.generate([prompt], params)[0].output_token_ids
    assert (16, 1, 1024) in graphs._graphs  # rows of 16: the short-step graph ran the tail


def test_buckets_and_kinds() -> None:
    g = StepGraphs(None, [], 16, torch.device("cpu"), 0, max_batch=48,  # type: ignore[arg-type]
                   max_model_len=5000, capture=False)
    assert g.max_batch == 64 and g.max_context == 5008

    class Item:
        def __init__(self, q_start: int, q_len: int = 1) -> None:
            self.q_start, self.q_len = q_start, q_len

    assert g.buckets([Item(10)] * 3) == (4, 1024)  # type: ignore[list-item]
    assert g.buckets([Item(3000)]) == (1, 4096)  # type: ignore[list-item]
    assert g.buckets([Item(4999)]) == (1, 5008)  # type: ignore[list-item]
    assert not g.supports([Item(5008)])  # type: ignore[list-item]
    assert g.kind([Item(64, 5), Item(9)]) == 16  # type: ignore[list-item]
    assert g.kind([Item(64, 17)]) is None  # type: ignore[list-item]  # a long chunk
    assert g.kind([Item(0, 5)]) is None  # type: ignore[list-item]  # nothing cached: SDPA
    g.batch_invariant = True  # deterministic: a decode never shares a short step's tiles
    assert g.kind([Item(64, 5), Item(9)]) is None  # type: ignore[list-item]
    assert g.kind([Item(64, 5)]) == 16 and g.kind([Item(9)]) == 1  # type: ignore[list-item]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_decode_equals_eager_decode_on_cuda(make_engine) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs kernels on CPU tensors; run without TRITON_INTERPRET")
    kw = dict(model="tiny", kv_cache_bytes=64 << 20, max_num_seqs=16)
    eager = make_engine(cuda_graphs=False, **kw)
    graph = make_engine(cuda_graphs=True, **kw)
    assert graph.runner.graphs is not None and eager.runner.graphs is None
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    for batch in ([PROMPTS[0]], PROMPTS, PROMPTS * 3):  # buckets 1, 4 and 16 (9 sequences)
        want = eager.generate(batch, params)
        got = graph.generate(batch, params)
        assert [g.output_token_ids for g in got] == [w.output_token_ids for w in want]
    assert graph.runner.graphs.num_replays > 0
    n = graph.runner.graphs.num_replays
    long = [(i * 7) % 250 for i in range(1500)]  # warm: a 12-token tail over 1488 cached
    for eng in (eager, graph):
        eng.generate([long], params)
    got = graph.generate([long], params)[0]
    assert got.num_cached_tokens == 1488
    assert got.output_token_ids == eager.generate([long], params)[0].output_token_ids
    assert any(rows == 16 for rows, _, _ in graph.runner.graphs._graphs)
    assert graph.runner.graphs.num_replays > n
