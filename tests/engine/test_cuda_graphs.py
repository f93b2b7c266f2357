"""Decode through the padded static buffers of ``engine.cuda_graphs``.

On a CPU the graphs cannot be captured, so the same buffers run eagerly (``capture=False``)
through the Triton kernels under the interpreter: padding lanes, the scratch block and the
buckets give the tokens of ordinary decode. On CUDA (``gpu``) captured graphs give the tokens
of eager decode.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from engine.cuda_graphs import DecodeGraphs  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402

pytest.importorskip("triton")

PARAMS = SamplingParams(max_tokens=5, ignore_eos=True)
PROMPTS = [[(i * 11 + j * 3) % 250 for j in range(n)] for i, n in enumerate((20, 47, 33))]


def test_padded_buffers_decode_like_the_eager_runner(make_engine) -> None:  # noqa: ANN001
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter off: the CUDA run is the gpu-marked test below")
    kw = dict(model="tiny", kv_cache_bytes=2 << 20, attention_backend="triton")
    ref = make_engine(**kw)
    eng = make_engine(**kw)
    graphs = DecodeGraphs(
        eng.runner.model, eng.kv.kv_caches, eng.block_size, eng.device, eng.kv.scratch_block,
        max_batch=4, max_model_len=eng.max_model_len, capture=False,
    )  # fmt: skip
    eng.runner.graphs = graphs
    want = ref.generate(PROMPTS, PARAMS)
    scratch = [cache[eng.kv.scratch_block].clone() for cache in eng.kv.kv_caches]
    got = eng.generate(PROMPTS, PARAMS)  # 3 sequences -> bucket 4: one padding lane
    assert [g.output_token_ids for g in got] == [w.output_token_ids for w in want]
    assert graphs._graphs and all(b == 4 for b, _ in graphs._graphs)
    assert any(not torch.equal(a, c[eng.kv.scratch_block]) for a, c in
               zip(scratch, eng.kv.kv_caches))  # the padding lane wrote the scratch block
    one = eng.generate(PROMPTS[:1], PARAMS)[0]  # batch 1: its own bucket
    assert one.output_token_ids == want[0].output_token_ids
    assert (1, 1024) in graphs._graphs


def test_buckets() -> None:
    g = DecodeGraphs(None, [], 16, torch.device("cpu"), 0, max_batch=48,  # type: ignore[arg-type]
                     max_model_len=5000, capture=False)
    assert g.max_batch == 64 and g.max_context == 5008

    class Item:
        def __init__(self, q_start: int) -> None:
            self.q_start, self.q_len = q_start, 1

    assert g.buckets([Item(10)] * 3) == (4, 1024)  # type: ignore[list-item]
    assert g.buckets([Item(3000)]) == (1, 4096)  # type: ignore[list-item]
    assert g.buckets([Item(4999)]) == (1, 5008)  # type: ignore[list-item]
    assert not g.supports([Item(5008)])  # type: ignore[list-item]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_decode_equals_eager_decode_on_cuda(make_engine) -> None:  # noqa: ANN001
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
