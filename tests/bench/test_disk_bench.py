"""bench.disk end to end on small sizes: each section reads what it says, and says what it read."""

from __future__ import annotations

import glob
import json
import os

from bench import disk
from kvstore.bandwidth import drop_page_cache


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
                "--repeats", "2")
    res = data["sections"]["cross-process"]
    assert res["disk_tokens"] == 192  # the hit found every full block of process 1's prompt
    assert len(res["runs"]) == 2
    for run in res["runs"]:
        dev, mem, base = (run[k]["json"] for k in ("device", "memory", "baseline"))
        assert dev["cached_tokens_by_tier"] == {"disk": 192}  # on the device
        assert mem["cached_tokens_by_tier"] == {"disk": 192}  # the store's copy in memory
        assert base["cached_tokens"] == 0
        assert dev["output_token_ids"] == mem["output_token_ids"]
        assert 0 < dev["load_ms"] <= dev["ttft_ms"] and base["load_ms"] == 0
        if not _in_memory(str(tmp_path)):  # evicted, then read from the device
            assert run["device"]["resident_before"] == 0
            assert run["device"]["device_read_bytes"] >= res["bytes"]
    walls = [r["device"]["wall_s"] - r["memory"]["wall_s"] for r in res["runs"]]
    assert res["hit_cost_s"] == sorted(walls)[0] + (sorted(walls)[1] - sorted(walls)[0]) / 2
    assert res["hit_cost_over_floor"] == res["hit_cost_s"] / res["floor_s"]
    loads = sorted(r["device"]["json"]["load_ms"] for r in res["runs"])
    assert res["hit_load_s"] == (loads[0] + loads[1]) / 2 / 1e3
    assert "wall(device) - wall(memory)" in capsys.readouterr().out


def test_resident_bytes_sees_what_the_page_cache_holds(tmp_path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * (1 << 20))
    f.read_bytes()
    if _in_memory(str(tmp_path)):  # tmpfs: the file is its pages
        assert disk.resident_bytes(str(tmp_path)) == 1 << 20
        return
    assert disk.resident_bytes(str(tmp_path)) == 1 << 20  # just written and read: cached
    assert drop_page_cache(str(tmp_path))
    assert disk.resident_bytes(str(tmp_path)) == 0


def _in_memory(path: str) -> bool:
    """Whether ``path`` lies on tmpfs/ramfs (the longest mount point above it)."""
    best, fstype = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            _, mnt, typ = line.split()[:3]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, fstype = mnt, typ
    return fstype in ("tmpfs", "ramfs")


def test_layouts_read_back_every_block(tmp_path) -> None:
    data = _run(tmp_path, "--sections", "layouts", "--block-bytes", "65536", "--total-mib", "4",
                "--repeats", "1")
    res = data["sections"]["layouts"]
    assert res["num_blocks"] == 64 and res["block_bytes"] == 65536
    assert len(res["methods"]) == 4  # every layout read all blocks back (checksums verified)
    for m in res["methods"].values():
        assert len(m["seconds"]) == 1 and m["gbps"] > 0
        assert m["of_ceiling"] == m["gbps"] / data["device_read_gbps"]
