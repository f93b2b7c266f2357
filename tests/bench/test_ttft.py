"""bench.ttft end to end in-process (tiny model, small prompts): the JSON says what was timed."""

from __future__ import annotations

import glob
import os
import statistics

import pytest

from bench import run_files, ttft


def test_ttft_quick_inprocess(tmp_path, capsys) -> None:
    rc = ttft.main(["--quick", "--lengths", "64,200", "--repeats", "2", "--out", str(tmp_path),
                    "--no-progress"])
    assert rc == 0
    [path] = glob.glob(os.path.join(tmp_path, "ttft-*.json"))
    assert os.path.getsize(path.replace(".json", ".png")) > 1000
    data = run_files.load(path)  # the summary with its samples file put back
    assert data["machine"]["cpu_cores"] >= 1 and data["machine"]["torch"]
    assert data["config"]["model"] == "tiny" and data["config"]["lengths"] == [64, 200]
    assert set(data["bandwidth_gbps"]) == {"device", "host", "disk", "disk_tier"}
    assert all(bw > 0 for bw in data["bandwidth_gbps"].values())
    cache = data["config"]["disk_cache"]  # how the disk runs reached the device, said
    assert cache["reads"] and cache["dropped_before_disk_runs"] and "honest" in cache
    samples = data["samples"]
    assert len(samples) == 2 * 2 * 4  # lengths x repeats x modes
    for s in samples:
        cached = (s["length"] - 1) // 16 * 16
        if s["mode"] == "cold":
            assert s["num_cached_tokens"] == 0 and s["cached_by_tier"] == {}
        elif s["mode"] == "disk":  # from disk, or computed where the engine's split says so
            assert set(s["cached_by_tier"]) <= {"disk"} and s["num_cached_tokens"] <= cached
        else:  # every other warm run was served by the tier it is named after, all its prefix
            assert s["cached_by_tier"] == {s["mode"]: cached}
        assert s["ttft_s"] > 0 and len(s["output_token_ids"]) == 1
    for length in (64, 200):  # warm output equals cold output, per prompt
        for rep in range(2):
            outs = {tuple(s["output_token_ids"]) for s in samples
                    if s["length"] == length and s["repeat"] == rep}
            assert len(outs) == 1
    for row in data["summary"]:
        assert row["kv_bytes"] == row["cached_tokens"] // 16 * data["config"]["block_nbytes"]
        for tier in ("device", "host", "disk"):
            assert row[f"{tier}_floor_s"] > 0
            assert row[f"{tier}_over_floor"] == row[f"{tier}_s"] / row[f"{tier}_floor_s"]
        assert 0 <= row["disk_loaded_tokens"] <= row["cached_tokens"]
        disk_runs = [s for s in samples if s["length"] == row["length"] and s["mode"] == "disk"]
        assert all(0 <= s["load_s"] <= s["ttft_s"] for s in disk_runs)
        assert row["disk_load_s"] == statistics.median(s["load_s"] for s in disk_runs)
        rereads = [s["disk_reread_floor_s"] for s in samples
                   if s["length"] == row["length"] and "disk_reread_floor_s" in s]
        if rereads:  # the same bytes read raw after each disk run: the median is the floor
            assert all(s["mode"] == "disk" for s in samples if "disk_reread_floor_s" in s)
            assert row["disk_reread_floor_s"] == statistics.median(rereads) > 0
            assert row["disk_minus_host_over_reread_floor"] == pytest.approx(
                (row["disk_s"] - row["host_s"]) / row["disk_reread_floor_s"])
    table = capsys.readouterr().out
    assert "cold ms" in table and "disk ms" in table


def test_ttft_bad_lengths_is_a_clear_error(capsys) -> None:
    assert ttft.main(["--lengths", "10,abc"]) == 2
    assert "--lengths" in capsys.readouterr().err
