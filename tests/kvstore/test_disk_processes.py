"""Two processes on one disk path: while one holds the store the other runs without its disk
tier (a warning, never a crash or a shared write); once the first exits, the next one serves
its blocks."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from kvstore_testutil import FP, LAYOUT, NBYTES, assert_rows, block_bytes, make_hashes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOLDER = """
import sys
sys.path[:0] = [{root!r}, {here!r}]
from kvstore_testutil import FP, LAYOUT, block_bytes, make_hashes
from kvstore.config import StoreConfig
from kvstore.store import TieredStore
store = TieredStore(LAYOUT, FP, StoreConfig(host_capacity_bytes=0, disk_path={path!r}))
hashes = make_hashes(5, seed=4)
assert store.put(hashes, block_bytes(hashes)) == 5 and store.flush(timeout_s=30)
print("ready", flush=True)
sys.stdin.readline()
store.close()
"""


def test_a_second_process_runs_without_the_disk_then_finds_the_blocks(tmp_path, make_store) -> None:
    path = str(tmp_path / "shared")
    code = HOLDER.format(root=ROOT, here=os.path.dirname(__file__), path=path)
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        second = make_store(host_blocks=8, disk=path, disk_write_policy="write_through")
        assert second.disk is None and "in use by another store" in (second.disk_error or "")
        mine = make_hashes(3, seed=7)
        assert second.put(mine, block_bytes(mine)) == 3  # serves from host meanwhile
        out = torch.zeros((3, NBYTES), dtype=torch.uint8)
        assert second.load(mine, out) == 3
        assert_rows(out, mine)
        second.close()
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=60) == 0
    third = make_store(host_blocks=8, disk=path, fingerprint=FP, layout=LAYOUT)
    theirs = make_hashes(5, seed=4)
    assert third.lookup(theirs) == ["disk"] * 5
    out = torch.zeros((5, NBYTES), dtype=torch.uint8)
    assert third.load(theirs, out) == 5
    assert_rows(out, theirs)
