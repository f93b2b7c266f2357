"""``strata bench gpu --quick`` on a CPU: each section in its own process writes its JSON, the
summary adds them up (the transformers peer on the engine's own weights, the correctness check,
deterministic mode's bits and cost); a section that runs past its limit is killed and recorded,
one that does not fit the budget is skipped."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from bench import gpu, run_files


def _summary(tmp_path) -> dict:
    [path] = glob.glob(os.path.join(tmp_path, "gpu-2*[0-9].json"))
    return run_files.load(path)  # the summary with its samples file put back


@pytest.mark.slow
def test_gpu_bench_quick_form(tmp_path, capsys) -> None:
    sections = "correctness,ttft,decode,determinism,disagg,kernels,offload"
    assert gpu.main(["--quick", "--sections", sections, "--lengths", "256",
                     "--out", str(tmp_path), "--no-progress"]) == 0
    data = _summary(tmp_path)
    assert data["errors"] == {} and data["skipped"] == {}
    assert set(data["sections"]) == set(sections.split(","))
    assert all(os.path.exists(os.path.join(tmp_path, f"gpu-section-{s}.json"))
               for s in sections.split(","))  # each written by its own process
    assert data["config"]["model"] == "tiny" and data["config"]["quick"]

    check = data["sections"]["correctness"]
    assert check["passed"] and check["dtype"] == "torch.bfloat16"
    for mode, served in (("default", 288), ("deterministic", 256)):  # 256: whole 256-chunks
        for tier in ("device", "host", "disk"):
            got = check[mode][tier]["served_by"]
            if tier == "disk":  # or part computed, where load-or-recompute splits it
                assert set(got) <= {"disk"} and sum(got.values()) <= served
            else:
                assert got == {tier: served}
            assert check[mode][tier]["same_text"] and check[mode]["bit_identical"]
    assert check["transformers"]["same_top1"] and check["transformers"]["same_tokens"]

    [row] = data["sections"]["ttft"]["summary"]
    assert row["length"] == 256 and row["peer_s"] > 0 and row["cold_s"] > 0
    assert row["peer_same_token"]  # float32: transformers' first token is Strata's
    assert row["warm_tokens_flipped"] == 0 and row["warm_logits_max_rel"] <= 1e-3
    for tier in ("device", "host", "disk"):
        assert row[f"{tier}_over_floor"] == pytest.approx(row[f"{tier}_s"] / row[f"{tier}_floor_s"])

    dec = data["sections"]["decode"]
    assert "graphs" not in dec  # no CUDA here: eager only
    for r in dec["eager"]["rows"]:  # the roofline counts the bytes a step reads
        assert r["tokens_per_s"] > 0 and r["weight_bytes_per_step"] < r["bytes_per_step"]
        assert 0 < r["fraction_of_weights_roofline"] < r["fraction_of_roofline"]

    det = data["sections"]["determinism"]
    assert det["bit_identical"] and det["deterministic"]["cached_tokens"] == 384  # 3 chunks
    assert det["default"]["cached_tokens"] == 496 and det["cost"]["cold"] > 0

    dis = data["sections"]["disagg"]
    assert dis["length"] == 256 and dis["tokens_same"]
    assert dis["kv_transfer"]["blocks"] > 0 and dis["kv_transfer"]["failures"] == 0
    for key in ("handoff", "colocated_handoff"):
        assert dis[key]["length"] == 256 and dis[key]["per_token_s"] > 0
    assert dis["exposed_over_prefill"] == pytest.approx(
        dis["handoff"]["exposed_s"] / dis["handoff"]["ttft_s"])
    assert "skipped" in data["sections"]["kernels"]  # needs CUDA
    [off] = data["sections"]["offload"]["rows"]
    assert off["length"] == 1024 and off["offloaded_blocks"] == 64
    out = capsys.readouterr().out
    assert "correctness: tiny" in out and "PASSED" in out and "deterministic mode at" in out


def test_a_section_past_its_limit_is_killed_and_the_budget_skips(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(gpu, "QUICK_LIMIT_S", 1)
    argv = ["--quick", "--sections", "ttft,offload", "--budget-s", "21", "--out", str(tmp_path),
            "--no-progress"]
    assert gpu.main(argv) == 1
    data = _summary(tmp_path)
    assert data["errors"] == {"ttft": "timed out after 1 s"}
    assert set(data["skipped"]) == {"offload"} and data["sections"] == {}


def test_full_sizes_need_cuda(capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    assert gpu.main(["--no-progress"]) == 2
    assert "--quick" in capsys.readouterr().err
    assert gpu.main(["--quick", "--sections", "ttft,nope"]) == 2


def test_transformers_peer_runs_the_engine_weights(tmp_path) -> None:
    from bench.hf_peer import hf_model
    from engine.loader import load_model
    from tests.engine.hf_models import write_checkpoint

    original = write_checkpoint("llama", str(tmp_path))  # GQA + llama3 rope scaling
    loaded = load_model(str(tmp_path), "float32", "cpu")
    peer = hf_model(loaded)
    q = loaded.model.model.layers[0].self_attn.q_proj.weight  # a view of the merged q/k/v
    assert peer.model.layers[0].self_attn.q_proj.weight.data_ptr() == q.data_ptr()  # shared
    ids = torch.tensor([[(i * 37) % 512 for i in range(90)]])
    with torch.no_grad():
        want = original(ids).logits[0, -1]
        got = peer(ids, logits_to_keep=1).logits[0, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
