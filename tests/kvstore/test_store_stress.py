"""Seeded concurrency stress: 6 threads of lookup / put / prefetch / load / pin / evict for ~2 s."""

from __future__ import annotations

import random
import threading
import time

import torch
from kvstore_testutil import NBYTES, block_bytes, make_hashes


def test_concurrent_mixed_operations_keep_invariants(make_store) -> None:
    store = make_store(host_blocks=24, disk_capacity_bytes=512 << 10, disk_write_queue_blocks=32)
    universe = make_hashes(160)
    payload = {h: block_bytes([h])[0] for h in universe}
    errors: list[BaseException] = []
    num_loaded_blocks = [0]
    stop = time.monotonic() + 2.0

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        out = torch.empty((8, NBYTES), dtype=torch.uint8)
        try:
            while time.monotonic() < stop:
                start = rng.randrange(0, len(universe) - 8)
                hashes = universe[start : start + rng.randint(1, 8)]
                op = rng.random()
                if op < 0.3:
                    store.put(hashes, torch.stack([payload[h] for h in hashes]))
                elif op < 0.6:
                    n = store.load(hashes, out)
                    for i in range(n):  # every loaded block holds what was put for its hash
                        assert torch.equal(out[i], payload[hashes[i]]), f"wrong bytes {i}"
                    num_loaded_blocks[0] += n
                elif op < 0.7:
                    store.prefetch(hashes)
                elif op < 0.8:
                    pinned = [h for h, ok in zip(hashes, store.pin(hashes)) if ok]
                    store.lookup(hashes)
                    store.unpin(pinned)
                elif op < 0.9:
                    store.evict_host(rng.randint(1, 4))
                else:
                    store.lookup(hashes)
                    if rng.random() < 0.2:
                        store.remove(hashes[:1])
                host = store.host
                assert host.used_bytes <= host.capacity_bytes
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert num_loaded_blocks[0] > 0
    assert store.wait_prefetch(timeout_s=10) and store.flush(timeout_s=10)
    # no slot double-used: every resident hash has its own slot, none in the free list
    host = store.host
    slots = list(host._slot_of.values())
    assert len(slots) == len(set(slots)) and not set(slots) & set(host._free)
    assert len(slots) + len(host._free) == host.num_slots
    assert store.disk.used_bytes <= store.disk.capacity_bytes
    # release prefetch pins the way a consumer would, then every ref count is zero
    out = torch.empty((len(universe), NBYTES), dtype=torch.uint8)
    n = store.load(universe, out)
    for i in range(n):
        assert torch.equal(out[i], payload[universe[i]])
    assert store.host.num_pinned() == 0 and store.disk.num_pinned() == 0
    assert store.num_pinned() == 0
