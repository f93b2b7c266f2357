"""``strata bench gpu --quick`` on a CPU: every section runs and its JSON adds up; the
transformers peer runs on the engine's own weights."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from bench import gpu, results


@pytest.mark.slow
def test_gpu_bench_quick_form(tmp_path, capsys) -> None:  # noqa: ANN001
    assert gpu.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    [path] = glob.glob(os.path.join(tmp_path, "gpu-*.json"))
    assert os.path.getsize(path.replace(".json", ".png")) > 1000
    data = results.load(path)  # the summary with its samples file put back
    assert data["errors"] == {} and set(data["sections"]) == {"ttft", "decode", "offload",
                                                               "disagg"}
    assert data["config"]["model"] == "tiny" and data["config"]["quick"]

    ttft = data["sections"]["ttft"]
    assert [r["length"] for r in ttft["summary"]] == [256, 1024]
    for r in ttft["summary"]:
        assert r["peer_s"] > 0 and r["cold_s"] > 0
        assert r["peer_same_token"]  # float32: transformers' first token is Strata's
        for tier in ("device", "host", "disk"):
            assert r[f"{tier}_floor_s"] > 0
            assert r[f"{tier}_over_floor"] == pytest.approx(r[f"{tier}_s"] / r[f"{tier}_floor_s"])
    for s in ttft["samples"]:
        full = (s["length"] - 1) // 16 * 16
        if s["mode"] in ("device", "host"):  # served by the tier named, whole prefix
            assert s["cached_by_tier"] == {s["mode"]: full}
        elif s["mode"] == "disk":  # or part computed, where load-or-recompute splits it
            assert set(s["cached_by_tier"]) <= {"disk"} and s["num_cached_tokens"] <= full

    dec = data["sections"]["decode"]
    assert "graphs" not in dec  # no CUDA here: eager only
    assert [r["batch"] for r in dec["eager"]["rows"]] == [1, 8]
    assert all(r["tokens_per_s"] > 0 and r["roofline_tokens_per_s"] > 0
               for r in dec["eager"]["rows"])

    [off] = data["sections"]["offload"]["rows"]
    assert off["length"] == 1024 and off["offload_s"] > 0 and off["no_store_s"] > 0
    assert off["offloaded_blocks"] == 64  # every full block of the prompt went to the slab

    dis = data["sections"]["disagg"]
    assert dis["length"] == 256
    for mode in ("cold", "device", "host", "disk"):
        assert dis[f"{mode}_ratio"] == pytest.approx(
            dis["disaggregated"][f"{mode}_s"] / dis["colocated"][f"{mode}_s"])
    assert dis["kv_transfer"]["blocks"] > 0 and dis["kv_transfer"]["failures"] == 0
    for key in ("handoff", "colocated_handoff"):
        assert dis[key]["length"] == 256 and dis[key]["per_token_s"] > 0
    assert dis["exposed_over_prefill"] == pytest.approx(
        dis["handoff"]["exposed_s"] / dis["handoff"]["ttft_s"])
    for s in dis["service"]["samples"]:
        if s["mode"] in ("device", "host"):
            assert s["cached_by_tier"] == {s["mode"]: 240}
        elif s["mode"] == "disk":  # a prefetch may lift part to host; the split may compute part
            assert set(s["cached_by_tier"]) <= {"disk", "host"}
            assert sum(s["cached_by_tier"].values()) <= 240
    out = capsys.readouterr().out
    assert "TTFT ms" in out and "handoff prefill -> decode" in out and "gap 1->2" in out


def test_full_sizes_need_cuda(capsys) -> None:  # noqa: ANN001
    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    assert gpu.main(["--no-progress"]) == 2
    assert "--quick" in capsys.readouterr().err
    assert gpu.main(["--quick", "--sections", "ttft,nope"]) == 2


def test_transformers_peer_runs_the_engine_weights(tmp_path) -> None:  # noqa: ANN001
    from bench.hf_peer import hf_model
    from engine.loader import load_model
    from tests.engine.hf_models import write_checkpoint

    original = write_checkpoint("llama", str(tmp_path))  # GQA + llama3 rope scaling
    loaded = load_model(str(tmp_path), "float32", "cpu")
    peer = hf_model(loaded)
    q = loaded.model.model.layers[0].self_attn.q_proj.weight
    assert peer.model.layers[0].self_attn.q_proj.weight.data_ptr() == q.data_ptr()  # shared
    ids = torch.tensor([[(i * 37) % 512 for i in range(90)]])
    with torch.no_grad():
        want = original(ids).logits[0, -1]
        got = peer(ids, logits_to_keep=1).logits[0, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
