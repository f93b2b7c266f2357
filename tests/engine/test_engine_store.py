"""The engine over the tiered store: a prefix served from the device pool, the host slab or the
LMDB disk tier gives exactly the tokens of a cold recompute."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import lmdb
import pytest

from engine.sampling import SamplingParams
from kvstore.config import StoreConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def _store(tmp_path, **kw) -> StoreConfig:  # noqa: ANN001
    return StoreConfig(
        host_capacity_bytes=kw.pop("host", 8 << 20),
        disk_path=str(tmp_path / "lmdb"),
        disk_capacity_bytes=kw.pop("disk", 64 << 20),
        **kw,
    )


def test_every_tier_gives_the_cold_tokens(tmp_path, make_engine):  # noqa: ANN001
    eng = make_engine(_store(tmp_path), model="tiny", kv_cache_bytes=8 << 20)
    prompt = _prompt(700, 1)
    full = (len(prompt) - 1) // 16 * 16
    cold = eng.generate([prompt], GREEDY)[0]
    assert cold.num_cached_tokens == 0
    warm_dev = eng.generate([prompt], GREEDY)[0]
    assert warm_dev.cached_by_tier == {"device": full}
    eng.evict_cached("host")
    warm_host = eng.generate([prompt], GREEDY)[0]
    assert warm_host.cached_by_tier == {"host": full}
    eng.evict_cached("disk")
    assert set(eng.store.lookup(eng.block_hashes(prompt))) == {"disk"}
    warm_disk = eng.generate([prompt], GREEDY)[0]
    assert warm_disk.cached_by_tier == {"disk": full}
    for warm in (warm_dev, warm_host, warm_disk):
        assert warm.output_token_ids == cold.output_token_ids


def test_partial_prefix_mixed_tiers(tmp_path, make_engine):  # noqa: ANN001
    eng = make_engine(_store(tmp_path), model="tiny", kv_cache_bytes=8 << 20)
    shared = _prompt(320, 2)
    a, b = shared + _prompt(50, 3), shared + _prompt(90, 4)
    eng.generate([a], GREEDY)
    eng.evict_cached("disk")
    out = eng.generate([b], GREEDY)[0]
    assert out.cached_by_tier == {"disk": 320}
    ref = make_engine(model="tiny", kv_cache_bytes=8 << 20, enable_prefix_caching=False)
    assert out.output_token_ids == ref.generate([b], GREEDY)[0].output_token_ids


def test_restart_serves_disk_blocks_and_other_models_never_see_them(tmp_path, make_engine):  # noqa: ANN001
    prompt = _prompt(400, 5)
    first = make_engine(_store(tmp_path), model="tiny", kv_cache_bytes=8 << 20)
    cold = first.generate([prompt], GREEDY)[0]
    first.close()
    again = make_engine(_store(tmp_path), model="tiny", kv_cache_bytes=8 << 20)
    warm = again.generate([prompt], GREEDY)[0]
    assert warm.cached_by_tier == {"disk": 384}
    assert warm.output_token_ids == cold.output_token_ids
    again.close()
    other = make_engine(_store(tmp_path), model="tiny", seed=1, kv_cache_bytes=8 << 20)
    assert other.generate([prompt], GREEDY)[0].num_cached_tokens == 0


def test_corrupt_disk_block_is_recomputed(tmp_path, make_engine):  # noqa: ANN001
    prompt = _prompt(400, 6)
    first = make_engine(_store(tmp_path), model="tiny", kv_cache_bytes=8 << 20)
    cold = first.generate([prompt], GREEDY)[0]
    victim = first.block_hashes(prompt)[10]
    first.close()
    env = lmdb.open(str(tmp_path / "lmdb"), max_dbs=8, subdir=True, lock=False)
    with env.begin(write=True) as txn:
        found = False
        for name in (None, b"blocks"):
            db = env.open_db(name, txn=txn) if name else None
            value = txn.get(victim, db=db) if db is not None else txn.get(victim)
            if value is not None:
                bad = bytearray(value)
                bad[len(bad) // 2] ^= 0xFF
                txn.put(victim, bytes(bad), db=db) if db is not None else txn.put(
                    victim, bytes(bad)
                )
                found = True
                break
    env.close()
    assert found, "the stored block was not found in the LMDB file"
    again = make_engine(_store(tmp_path), model="tiny", kv_cache_bytes=8 << 20)
    out = again.generate([prompt], GREEDY)[0]
    assert out.cached_by_tier == {"disk": 160}  # blocks 0..9, the corrupt 11th ends the prefix
    assert out.output_token_ids == cold.output_token_ids
    assert again.store.stats()["disk"]["corrupt_blocks"] >= 1


@pytest.mark.slow
def test_second_cli_process_reuses_the_first_ones_blocks(tmp_path):  # noqa: ANN001
    disk = str(tmp_path / "cli-lmdb")
    ids = ",".join(str(t) for t in _prompt(300, 7))
    cmd = [
        sys.executable,
        "-m",
        "cluster.cli",
        "generate",
        "--prompt-ids",
        ids,
        "--max-tokens",
        "8",
        "--disk-path",
        disk,
        "--device-capacity",
        "8M",
        "--json",
    ]
    outs = [
        json.loads(
            subprocess.run(
                cmd, check=True, capture_output=True, text=True, cwd=ROOT, timeout=300
            ).stdout
        )
        for _ in range(2)
    ]
    assert outs[0]["cached_tokens"] == 0
    assert outs[1]["cached_tokens_by_tier"] == {"disk": 288}
    assert outs[1]["output_token_ids"] == outs[0]["output_token_ids"]


def test_slow_tier_is_recomputed_not_loaded(tmp_path, make_engine):  # noqa: ANN001
    """Load-or-recompute: with a disk measured slower than recomputing, disk hits are skipped."""
    eng = make_engine(_store(tmp_path), model="tiny", kv_cache_bytes=8 << 20)
    prompt = _prompt(500, 8)
    cold = eng.generate([prompt], GREEDY)[0]
    eng.evict_cached("disk")
    blk = eng.layout.block_nbytes
    eng.kv.prefill_tokens_per_s = 16.0  # one block of 16 tokens recomputes in 1 s
    eng.kv.tier_bytes_per_s = {"host": blk * 1000.0, "disk": blk / 10.0}  # disk: 10 s a block
    slow = eng.generate([prompt], GREEDY)[0]
    assert slow.num_cached_tokens == 0 and eng.kv.num_hits_recomputed == 31
    assert slow.output_token_ids == cold.output_token_ids
    eng.evict_cached("disk")
    eng.kv.tier_bytes_per_s["disk"] = blk * 1000.0  # now loading wins
    fast = eng.generate([prompt], GREEDY)[0]
    assert fast.cached_by_tier == {"disk": 496}
    assert fast.output_token_ids == cold.output_token_ids
