"""bench.trace, bench.longdoc and bench.decode end to end in-process, small: the JSON adds up."""

from __future__ import annotations

import glob
import os

import pytest

from bench import cli, decode, longdoc, run_files, trace, transfer

TRACE = trace.DEFAULT_TRACE


def _load(out_dir: str, name: str) -> dict:
    [path] = glob.glob(os.path.join(out_dir, f"{name}-*.json"))
    assert os.path.getsize(path.replace(".json", ".png")) > 1000
    return run_files.load(path)  # the summary with its samples file put back


@pytest.mark.parametrize("with_baseline", [False, True])
def test_trace_quick(tmp_path, with_baseline: bool) -> None:
    argv = ["--quick", "--trace", TRACE, "--max-requests", "50", "--time-scale", "0.25",
            "--out", str(tmp_path), "--no-progress"]
    argv += ["--with-baseline"] if with_baseline else []
    assert trace.main(argv) == 0
    data = _load(str(tmp_path), "trace")
    runs = [data, data["baseline"]] if with_baseline else [data]
    for run in runs:
        assert run["num_requests"] == run["num_finished"] == 50 and run["num_errors"] == 0
        reqs = run["requests"]
        assert run["ttft_s"]["count"] == 50
        # every token after the first is one gap; outputs capped at --max-output 4 in quick mode
        assert run["tbt_s"]["count"] == sum(len(r["tbt_s"]) for r in reqs)
        assert run["prompt_tokens"] == sum(r["prompt_len"] for r in reqs)
        hr = run["hit_rate"]
        assert all(0.0 <= v <= 1.0 for v in hr.values())
        assert hr["device"] + hr["host"] + hr["disk"] == pytest.approx(hr["total"])
        for r in reqs:
            assert sum(r["cached_by_tier"].values()) == r["num_cached_tokens"] <= r["prompt_len"]
        # the first 50 requests share a few prefixes: the cache finds them, never more than possible
        assert 0.0 < hr["total"] <= run["unbounded_hit_rate"] <= 1.0
    if with_baseline:
        base = data["baseline"]
        assert not data["config"]["baseline"] and data["config"]["host_tokens"] > 0
        assert base["config"]["baseline"]
        assert base["config"]["host_tokens"] == base["config"]["disk_tokens"] == 0
        assert base["hit_rate"]["host"] == base["hit_rate"]["disk"] == 0.0
        # both replays sent the same requests
        assert [r["prompt_len"] for r in base["requests"]] == [
            r["prompt_len"] for r in data["requests"]]
        # abba (the default): tiered, device-only, device-only, tiered; the gain pools each side
        replays = data["replays"]
        assert [r["side"] for r in replays] == ["tiered", "baseline", "baseline", "tiered"]
        assert replays[0]["ttft_s"] == data["ttft_s"] and replays[1]["ttft_s"] == base["ttft_s"]
        assert all(r["num_finished"] == 50 for r in replays)
        gain = data["offload_gain"]
        assert gain["order"] == "abba"
        assert gain["hit_rate"]["tiered"] >= gain["hit_rate"]["baseline"]
        [(t1, b1), (t2, b2)] = [(replays[0], replays[1]), (replays[3], replays[2])]
        pairs = gain["pairs"]
        assert pairs[0]["ttft_mean_speedup"] == pytest.approx(
            b1["ttft_s"]["mean"] / t1["ttft_s"]["mean"])
        assert pairs[1]["ttft_mean_speedup"] == pytest.approx(
            b2["ttft_s"]["mean"] / t2["ttft_s"]["mean"])
        # pooled: the mean over 100 requests a side is the mean of the two replays' means
        assert gain["ttft_mean_speedup"] == pytest.approx(
            (b1["ttft_s"]["mean"] + b2["ttft_s"]["mean"])
            / (t1["ttft_s"]["mean"] + t2["ttft_s"]["mean"]))
        assert gain["hit_rate"]["tiered"] == pytest.approx(
            (t1["hit_rate"]["total"] + t2["hit_rate"]["total"]) / 2)


def test_trace_cycles_alternate_abba_and_baab(tmp_path) -> None:
    argv = ["--quick", "--max-requests", "8", "--time-scale", "0.25", "--with-baseline",
            "--cycles", "2", "--out", str(tmp_path), "--no-progress"]
    assert trace.main(argv) == 0
    data = _load(str(tmp_path), "trace")
    sides = [r["side"][0] for r in data["replays"]]  # t(iered) / b(aseline)
    assert "".join(sides) == "tbbtbttb"
    gain = data["offload_gain"]
    assert gain["cycles"] == 2 and len(gain["pairs"]) == 4
    r = data["replays"]
    for pair, (i, j) in zip(gain["pairs"], [(0, 1), (3, 2), (5, 4), (6, 7)]):  # (tiered, base)
        assert pair["ttft_p50_speedup"] == pytest.approx(
            r[j]["ttft_s"]["p50"] / r[i]["ttft_s"]["p50"])


def test_trace_order_flags_need_with_baseline(tmp_path, capsys) -> None:
    common = ["--quick", "--max-requests", "2", "--out", str(tmp_path), "--no-progress"]
    assert trace.main(common + ["--cycles", "2"]) == 2
    assert "go with --with-baseline" in capsys.readouterr().err
    assert trace.main(common + ["--with-baseline", "--cycles", "0"]) == 2
    assert "--cycles must be at least 1" in capsys.readouterr().err
    # --policies with --with-baseline replays device-only once: the flags would be ignored
    assert trace.main(common + ["--with-baseline", "--policies", "evict", "--order", "ab"]) == 2
    assert "without --policies" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_longdoc_quick_reloads_from_lower_tiers(tmp_path) -> None:
    assert longdoc.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    data = _load(str(tmp_path), "longdoc")
    cfg = data["config"]
    assert cfg["host_tokens"] < cfg["working_set_tokens"]  # eviction must happen
    rounds = data["rounds"]
    assert [r["round"] for r in rounds] == list(range(cfg["questions"]))
    for r in rounds:
        assert r["num_requests"] == cfg["docs"] and r["num_errors"] == 0
        assert r["ttft_s"]["count"] == cfg["docs"]
        hr = r["hit_rate"]
        assert all(0.0 <= v <= 1.0 for v in hr.values())
        assert hr["device"] + hr["host"] + hr["disk"] == pytest.approx(hr["total"])
        assert sum(r["cached_tokens_by_tier"].values()) == sum(
            q["num_cached_tokens"] for q in r["requests"])
    assert rounds[0]["hit_rate"]["total"] == 0.0  # cold
    later = rounds[1:]
    # a later question reuses (almost) the whole document, some of it reloaded from below the pool
    assert all(r["hit_rate"]["total"] > 0.5 for r in later)
    assert sum(r["cached_tokens_by_tier"]["host"] + r["cached_tokens_by_tier"]["disk"]
               for r in later) > 0


def test_decode_quick(tmp_path) -> None:
    argv = ["--quick", "--batches", "1,4", "--steps", "4", "--out", str(tmp_path), "--no-progress"]
    assert decode.main(argv) == 0
    data = _load(str(tmp_path), "decode")
    assert [r["batch"] for r in data["rows"]] == [1, 4]
    for r in data["rows"]:
        assert r["steps"] == 4 and len(r["step_s"]) == 4
        assert r["tokens_per_s"] > 0 and r["roofline_tokens_per_s"] > 0
        assert r["bytes_per_step"] > data["config"]["weight_bytes"]
    assert data["roofline"]["copy_bandwidth_gbps"] > 0
    assert data["roofline"]["name"] == (
        "HBM roofline" if data["machine"]["cuda"] else "host-memory-bandwidth analogue")


def test_transfer_quick(tmp_path) -> None:
    argv = ["--quick", "--block-kib", "32,1024", "--streams", "1,2", "--out", str(tmp_path),
            "--no-progress"]
    assert transfer.main(argv) == 0
    data = _load(str(tmp_path), "transfer")
    paths = data["config"]["paths"]
    assert paths[:3] == ["raw", "protobuf", "grpc"]  # + "shm" where /dev/shm is writable
    keys = [(r["block_kib"], r["streams"], r["path"]) for r in data["rows"]]
    assert keys == [(b, s, p) for b in (32, 1024) for s in (1, 2) for p in paths]
    for r in data["rows"]:
        assert r["num_blocks"] * r["block_kib"] * 1024 == r["nbytes"] == 32 << 20
        assert len(r["seconds"]) == 2 and 0 < r["gbps"] <= r["best_gbps"]
        raw = next(x for x in data["rows"] if x["path"] == "raw"
                   and (x["block_kib"], x["streams"]) == (r["block_kib"], r["streams"]))
        assert r["of_raw"] == pytest.approx(r["gbps"] / raw["gbps"])


def test_cli_dispatch(capsys) -> None:
    assert cli.main(["nope"]) == 2
    assert cli.main(["--help"]) == 0
    assert "ttft" in capsys.readouterr().out
    assert cli.main(["trace", "--trace", "/nonexistent/trace.jsonl", "--quick"]) == 2


def test_trace_policies_side_by_side(tmp_path) -> None:
    argv = ["--quick", "--trace", TRACE, "--max-requests", "40", "--time-scale", "0.25",
            "--pool-tokens", "1024", "--host-tokens", "1024", "--policies",
            "write_through,evict", "--out", str(tmp_path), "--no-progress"]
    assert trace.main(argv) == 0
    data = _load(str(tmp_path), "trace")
    assert list(data["policies"]) == ["write_through", "evict"]
    rows = {r["policy"]: r for r in data["policy_table"]}
    for name, run in data["policies"].items():
        assert run["config"]["disk_write_policy"] == name and run["num_errors"] == 0
        assert rows[name]["hit_rate"] == run["hit_rate"]
        assert rows[name]["disk_written_bytes"] == run["config"]["store"][
            "store_disk_written_bytes"]
    # write-through writes every block the host takes; evict only what the host let go
    assert rows["write_through"]["disk_written_bytes"] > rows["evict"]["disk_written_bytes"]
    assert rows["evict"]["host_evictions"] > 0
    assert trace.main(["--policies", "sometimes", "--out", str(tmp_path)]) == 2


def test_offload_quick(tmp_path) -> None:
    from bench import offload

    assert offload.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    data = _load(str(tmp_path), "offload")
    [row] = data["rows"]
    assert row["length"] == 1024 and row["offloaded_blocks"] == 64
    assert row["overhead"] == pytest.approx(row["offload_s"] / row["no_store_s"] - 1)
    assert len(data["samples"]) == 2 * 2  # 2 repeats x both engines
    by_prompt: dict[int, set] = {}
    for s in data["samples"]:  # each prompt cold in both engines, with the same token
        assert s["num_cached_tokens"] == 0
        by_prompt.setdefault(s["prompt"], set()).add(tuple(s["output_token_ids"]))
    assert len(by_prompt) == 2 and all(len(t) == 1 for t in by_prompt.values())
