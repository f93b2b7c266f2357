"""A prefill worker killed and restarted by Ray, over the real service (Ray actors, gRPC on
loopback, the tiny model): restarted with an empty disk, the router credits it with none of the
blocks it held before, even when an event batch of its previous start arrives late; restarted on
its old disk, its disk blocks are credited again and served."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray

from engine.sampling import SamplingParams
from proto.worker_api import BlockEvent, EventBatch
from router.client import StrataClient
from tests.e2e.conftest import TOKEN, prompt, start, wait_no_leaks

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

NONE = {"device": 0, "host": 0, "disk": 0}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("restart")
    svc = start(tmp, 2, 1)
    yield svc, str(tmp / "disk")
    svc.shutdown()


def _workers(router) -> dict[str, dict]:
    return {w["worker_id"]: w for w in ray.get(router.workers.remote(), timeout=60)}


def _kill_and_wait(router, worker_id: str, restarts: int) -> None:
    """SIGKILL the worker's process; wait until the router has taken its new start back in."""
    old = _workers(router)[worker_id]
    os.kill(old["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    while True:
        w = _workers(router)[worker_id]
        if w["state"] == "up" and w["restarts"] == restarts and w["pid"] != old["pid"]:
            return
        assert time.monotonic() - t0 < 300, w
        time.sleep(0.5)


def _credited(router, worker_id: str, hashes: list[bytes]) -> dict[str, int]:
    ray.get(router.sync_index.remote(), timeout=60)
    return ray.get(router.index_prefix.remote(worker_id, hashes), timeout=60)


def test_a_restart_is_credited_with_what_its_disk_holds(service, reference_engine) -> None:
    svc, disk = service
    router = svc.router
    ids = prompt(640, 90)  # 40 full blocks
    expected = reference_engine.generate(
        [ids], SamplingParams(max_tokens=4, ignore_eos=True))[0].output_token_ids
    with StrataClient(svc.address, token=TOKEN) as client:
        cold = client.generate(prompt_token_ids=ids, max_tokens=4, temperature=0.0,
                               ignore_eos=True)
        assert list(cold.token_ids) == expected
        holder = cold.usage.prefill_worker
        handle = svc.prefill[int(holder.split("-")[1])]
        ray.get(handle.evict_cached.remote("disk"), timeout=60)  # its blocks only on disk now
        hashes = ray.get(router.block_hashes.remote(ids), timeout=60)
        assert _credited(router, holder, hashes) == {**NONE, "disk": len(hashes)}
        # what its start would report next, in the poller's hands when it dies
        snap = ray.get(handle.snapshot_blocks.remote(), timeout=60)
        late = EventBatch(snap.epoch, snap.seq + 1, (BlockEvent("stored", "disk", tuple(hashes)),))

        # restart with an empty disk: its directory moved away while it runs
        path = os.path.join(disk, holder)
        os.rename(path, path + ".first")
        _kill_and_wait(router, holder, restarts=1)
        assert _credited(router, holder, hashes) == NONE
        applied = ray.get(router.__ray_call__.remote(
            lambda r: r.backend.index.apply_batch(holder, late)), timeout=60)
        assert applied  # ignored: the worker's entries stay complete
        assert _credited(router, holder, hashes) == NONE
        again = client.generate(prompt_token_ids=ids, max_tokens=4, temperature=0.0,
                                ignore_eos=True)
        assert list(again.token_ids) == expected
        local = {t: again.usage.cached_tokens_by_tier.get(t, 0) for t in NONE}
        assert local == NONE  # no prefill worker holds it (a pull from the decode worker may)

        # restart on its first disk: its blocks there are credited and served again
        os.rename(path, path + ".second")
        os.rename(path + ".first", path)
        _kill_and_wait(router, holder, restarts=2)
        assert _credited(router, holder, hashes)["disk"] == len(hashes)
        for w in _workers(router):  # the other worker may hold it now (it served ``again``)
            if w != holder and w.startswith("prefill"):
                ray.get(svc.prefill[int(w.split("-")[1])].evict_cached.remote("host"),
                        timeout=60)
        warm = client.generate(prompt_token_ids=ids, max_tokens=4, temperature=0.0,
                               ignore_eos=True)
        assert list(warm.token_ids) == expected
        if warm.usage.prefill_worker == holder:
            assert warm.usage.cached_tokens_by_tier.get("disk", 0) >= 624
    wait_no_leaks(svc)
