"""ttft, longdoc, trace and decode in ``--quick`` mode through the real service
(``--start-service``: Ray actors, gRPC on loopback): the JSON adds up."""

from __future__ import annotations

import glob
import os

import pytest

from bench import decode, longdoc, run_files, trace, ttft

pytestmark = pytest.mark.slow  # each test starts a service (Ray workers, gRPC) and runs a benchmark


def _load(out_dir: str, name: str) -> dict:
    [path] = glob.glob(os.path.join(out_dir, f"{name}-*.json"))
    assert os.path.getsize(path.replace(".json", ".png")) > 1000
    return run_files.load(path)  # the summary with its samples file put back


def _check_hit_rates(hr: dict) -> None:
    assert all(0.0 <= v <= 1.0 for v in hr.values())
    assert hr["device"] + hr["host"] + hr["disk"] == pytest.approx(hr["total"])


def test_ttft_through_service(tmp_path) -> None:
    argv = ["--quick", "--start-service", "--colocated", "--out", str(tmp_path), "--no-progress"]
    assert ttft.main(argv) == 0
    data = _load(str(tmp_path), "ttft")
    cfg = data["config"]
    assert cfg["mode"] == "server" and cfg["started_service"]
    assert cfg["modes"] == ["cold", "device", "host", "disk"]
    lengths = cfg["lengths"]
    assert [r["length"] for r in data["summary"]] == lengths
    assert len(data["samples"]) == 4 * len(lengths)
    for s in data["samples"]:
        if s["mode"] == "cold":
            assert s["num_cached_tokens"] == 0 and s["cached_by_tier"] == {}
        elif s["mode"] == "disk":  # the router's prefetch may have lifted some blocks to host
            assert set(s["cached_by_tier"]) <= {"disk", "host"}
            assert sum(s["cached_by_tier"].values()) == (s["length"] - 1) // 16 * 16
        else:  # every full block before the last token is reused, from the tier named
            assert s["cached_by_tier"] == {s["mode"]: (s["length"] - 1) // 16 * 16}
        assert 0 < s["ttft_server_s"] <= s["ttft_s"]
    outputs = {(s["length"], tuple(s["output_token_ids"])) for s in data["samples"]}
    assert len(outputs) == len(lengths)  # cold and every warm run gave the same token
    for r in data["summary"]:
        for tier in ("device", "host", "disk"):
            assert r[f"{tier}_over_cold"] == pytest.approx(r[f"{tier}_s"] / r["cold_s"])
        for tier in ("host", "disk"):  # floors from the worker's measured load speeds
            assert r[f"{tier}_floor_s"] > 0
    t = data["kv_transfer"]  # every request's prompt KV went from prefill-0 to decode-0
    assert t["blocks"] > 0 and t["bytes"] > 0 and t["gbps"] > 0 and t["failures"] == 0
    for key in ("handoff", "colocated"):  # fresh prompts streamed: the gap 1->2 and after
        h = data[key]
        assert len(h["samples"]) == len(lengths) and h["tokens"] == 10
        for smp in h["samples"]:
            assert smp["cached_tokens"] == 0 and len(smp["gaps_s"]) == 9
            assert smp["exposed_s"] == pytest.approx(smp["gap12_s"] - smp["per_token_s"])
            assert (smp["prefill_worker"] == "") == (key == "colocated")
        assert [r["length"] for r in h["summary"]] == lengths


def test_longdoc_through_service(tmp_path) -> None:
    argv = ["--quick", "--start-service", "--out", str(tmp_path), "--no-progress"]
    assert longdoc.main(argv) == 0
    data = _load(str(tmp_path), "longdoc")
    cfg = data["config"]
    assert cfg["mode"] == "started service"
    assert cfg["host_tokens"] < cfg["working_set_tokens"]
    rounds = data["rounds"]
    assert [r["round"] for r in rounds] == list(range(cfg["questions"]))
    for r in rounds:
        assert r["num_requests"] == cfg["docs"] and r["num_errors"] == 0
        assert r["ttft_s"]["count"] == cfg["docs"]
        _check_hit_rates(r["hit_rate"])
        assert sum(r["cached_tokens_by_tier"].values()) == sum(
            q["num_cached_tokens"] for q in r["requests"])
    assert rounds[0]["hit_rate"]["total"] == 0.0
    assert all(r["hit_rate"]["total"] > 0.5 for r in rounds[1:])
    assert sum(r["cached_tokens_by_tier"]["host"] + r["cached_tokens_by_tier"]["disk"]
               for r in rounds[1:]) > 0


def test_trace_through_service(tmp_path) -> None:
    argv = ["--quick", "--start-service", "--max-requests", "50", "--time-scale", "0.25",
            "--out", str(tmp_path), "--no-progress"]
    assert trace.main(argv) == 0
    data = _load(str(tmp_path), "trace")
    assert data["config"]["mode"] == "started service"
    assert data["num_requests"] == data["num_finished"] == 50 and data["num_errors"] == 0
    assert data["ttft_s"]["count"] == 50
    reqs = data["requests"]
    assert data["tbt_s"]["count"] == sum(len(r["tbt_s"]) for r in reqs)
    assert data["prompt_tokens"] == sum(r["prompt_len"] for r in reqs)
    _check_hit_rates(data["hit_rate"])
    for r in reqs:
        assert sum(r["cached_by_tier"].values()) == r["num_cached_tokens"] <= r["prompt_len"]
    assert 0.0 < data["hit_rate"]["total"] <= data["unbounded_hit_rate"] <= 1.0


def test_decode_through_service(tmp_path) -> None:
    argv = ["--quick", "--start-service", "--with-inprocess", "--batches", "1,4", "--steps",
            "24", "--rounds", "3", "--min-window-steps", "1", "--out", str(tmp_path),
            "--no-progress"]  # fmt: skip
    assert decode.main(argv) == 0
    data = _load(str(tmp_path), "decode")
    assert data["config"]["mode"] == "server" and data["config"]["rounds"] == 3
    assert [r["batch"] for r in data["rows"]] == [1, 4]
    assert [(r["round"], r["batch"]) for r in data["rounds"]] == [
        (k, b) for k in range(3) for b in (1, 4)
    ]
    for r in data["rounds"]:
        assert r["tokens"] == r["batch"] * 25  # every stream got all its tokens
        assert 0 < r["steady_tokens"] < r["tokens"] and r["steady_s"] > 0
        assert r["batch"] // 2 <= r["decoding_together"] <= r["batch"]
        assert r["tokens_per_s"] == pytest.approx(r["steady_tokens"] / r["steady_s"])
        assert r["tbt_s"]["count"] == r["batch"] * 24 and r["ms_per_token"] > 0
        assert r["worker_steps"] >= 24 and r["worker_ms_per_step"] > 0  # the worker's engine
    for row in data["rows"]:  # the round with the median tokens/s
        same = sorted(x["tokens_per_s"] for x in data["rounds"] if x["batch"] == row["batch"])
        assert row["tokens_per_s"] == same[1]
    ratios = data["service_over_inprocess"]
    assert [r["batch"] for r in ratios] == [1, 4]
    # the reference runs with the decode worker's threads, right before the service, each round
    threads = data["config"]["decode_worker_threads"]
    assert threads >= 1 and data["inprocess"]["machine"]["torch_threads"] == threads
    assert [r["torch_threads"] for r in data["inprocess"]["rows"]] == [threads] * 6
    assert data["inprocess_all_cores"]["machine"]["torch_threads"] == os.cpu_count()
    for r, full in zip(ratios, data["inprocess_all_cores"]["rows"]):
        assert len(r["rounds"]) == 3
        # like with like: tokens over wall time on both sides (the in-process mean step)
        for k in r["rounds"]:
            assert k["ratio"] == pytest.approx(k["service_tokens_per_s"]
                                               / k["inprocess_tokens_per_s"])  # fmt: skip
        assert r["ratio"] == sorted(k["ratio"] for k in r["rounds"])[1]  # the median round
        assert r["ratio"] == pytest.approx(r["service_tokens_per_s"] / r["inprocess_tokens_per_s"])
        assert r["ratio_all_cores"] == pytest.approx(
            r["service_tokens_per_s"] / full["mean_tokens_per_s"])
    inproc = {(x["batch"], x["ms_per_step"]) for x in data["inprocess"]["rows"]}
    for r in data["rounds"]:
        assert (r["batch"], r["inprocess"]["ms_per_step"]) in inproc


def test_decode_through_service_refuses_a_short_window(tmp_path, capsys) -> None:
    argv = ["--quick", "--start-service", "--batches", "1", "--steps", "6",
            "--min-window-steps", "16", "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    assert decode.main(argv) == 2  # 6 steps can not hold a window of 16
    assert "decoded together for only" in capsys.readouterr().err
    assert not os.path.exists(tmp_path) or not os.listdir(tmp_path)  # no figure written


def test_soak_through_a_service_it_starts(tmp_path) -> None:
    from bench import soak

    argv = ["--seconds", "30", "--clients", "2", "--kills", "decode:decode,prefill:push",
            "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    assert soak.main(argv) == 0
    data = _load(str(tmp_path), "soak")
    (run,) = data["runs"]
    assert run["num_requests"] == sum(run["by_status"].values()) > 0
    # no request fails for the service's own reasons: the killed workers' requests went on
    # (DEADLINE_EXCEEDED may come from the requests whose client gives up before the first token)
    assert run["failed"] == []
    assert set(run["by_status"]) <= {"OK", "CANCELLED", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED"}
    assert run["ok_share_of_answered"] == 1.0
    assert run["wrong_outputs"] == 0 and run["hung_requests"] == 0
    assert run["leaks"]["workers_checked"] == 4 and not run["leaks"]["leaking"]
    assert [(k["worker"][:-2], k["phase"]) for k in run["kills"]] == [
        ("decode", "decode"),
        ("prefill", "push"),
    ]
    for k in run["kills"]:  # each left placement, and came back once its new process was up
        assert k["out_after_s"] is not None and k["back_after_restart_s"] is not None
    assert sum(v for k, v in run["router_counters"].items() if "migrations_total" in k) > 0
