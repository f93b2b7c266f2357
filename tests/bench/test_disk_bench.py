"""bench.disk end to end on small sizes: each section reads what it says, and says what it read."""

from __future__ import annotations

import glob
import json
import os

from bench import disk


def _run(tmp_path, *argv: str) -> dict:
    out = tmp_path / "out"
    assert disk.main([*argv, "--dir", str(tmp_path / "scratch"), "--out", str(out)]) == 0
    [path] = glob.glob(os.path.join(out, "disk-*.json"))
    with open(path) as f:
        data = json.load(f)
    assert data["device_read_gbps"] > 0
    return data


def test_cross_process_hit_reads_its_prefix_from_disk(tmp_path, capsys) -> None:
    data = _run(tmp_path, "--sections", "cross-process", "--model", "tiny", "--length", "200",
                "--repeats", "1")
    res = data["sections"]["cross-process"]
    assert res["disk_tokens"] == 192  # process 2 found every full block of process 1's prompt
    [run] = res["runs"]
    hit, base = run["hit"]["json"], run["baseline"]["json"]
    assert hit["cached_tokens_by_tier"] == {"disk": 192} and base["cached_tokens"] == 0
    assert 0 < hit["load_ms"] <= hit["ttft_ms"] and base["load_ms"] == 0
    assert res["hit_load_s"] == hit["load_ms"] / 1e3
    assert res["hit_load_over_floor"] == res["hit_load_s"] / res["floor_s"]
    assert "of which its load from disk" in capsys.readouterr().out


def test_layouts_read_back_every_block(tmp_path) -> None:
    data = _run(tmp_path, "--sections", "layouts", "--block-bytes", "65536", "--total-mib", "4",
                "--repeats", "1")
    res = data["sections"]["layouts"]
    assert res["num_blocks"] == 64 and res["block_bytes"] == 65536
    assert len(res["methods"]) == 4  # every layout read all blocks back (checksums verified)
    for m in res["methods"].values():
        assert len(m["seconds"]) == 1 and m["gbps"] > 0
        assert m["of_ceiling"] == m["gbps"] / data["device_read_gbps"]
