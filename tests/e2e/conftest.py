"""End-to-end fixtures: the real service (Ray actors, gRPC on loopback) on the tiny model."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest

from cluster.config import ServiceConfig
from cluster.launcher import Service, launch
from engine.config import EngineConfig
from kvstore.config import StoreConfig
from kvtransfer.config import TransferConfig
from router.config import BackendConfig, RouterConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKEN = "e2e-token"
SECRET = "e2e-secret"


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def service_config(
    tmp_path,
    num_prefill: int,
    num_decode: int,
    transfer: TransferConfig | None = None,
    backend: BackendConfig | None = None,
    chunk_tokens: int = 2048,
    **router_kw,
) -> ServiceConfig:
    return ServiceConfig(
        engine=EngineConfig(
            model="tiny",
            kv_cache_bytes=16 << 20,
            max_model_len=4096,
            max_num_batched_tokens=chunk_tokens,
        ),
        store=StoreConfig(
            host_capacity_bytes=16 << 20,
            disk_path=str(tmp_path / "disk"),
            disk_capacity_bytes=256 << 20,
        ),
        router=RouterConfig(port=0, auth_token=TOKEN, max_model_len=4096, **router_kw),
        backend=backend or BackendConfig(transfer_timeout_s=10.0),
        transfer=transfer or TransferConfig(),
        num_prefill=num_prefill,
        num_decode=num_decode,
        secret=SECRET,
    )


def start(tmp_path, num_prefill: int, num_decode: int, **kw) -> Service:
    return launch(service_config(tmp_path, num_prefill, num_decode, **kw))


def worker_pids(svc: Service) -> dict[str, int]:
    import ray

    infos = ray.get([w.info.remote() for w in svc.prefill + svc.decode], timeout=60)
    return {i.worker_id: i.pid for i in infos}


def shm_segments_of(pids: dict[str, int]) -> list[str]:
    """The shared-memory segments of these workers still in /dev/shm."""
    import os

    from kvtransfer import shm

    if not os.path.isdir(shm.SHM_DIR):
        return []
    return [
        n
        for n in os.listdir(shm.SHM_DIR)
        for wid, pid in pids.items()
        if n.startswith(f"{shm.PREFIX}{wid}-{pid}-")
    ]


def assert_no_leaks(svc: Service) -> None:
    import ray

    result = ray.get(svc.router.check_no_leaks.remote(), timeout=60)
    assert result and all(result.values()), result


def wait_no_leaks(svc: Service, within_s: float = 30.0) -> None:
    """``assert_no_leaks`` once it holds, within ``within_s`` (aborts and frees reach the
    workers asynchronously)."""
    import ray

    deadline = time.monotonic() + within_s
    while True:
        try:
            assert_no_leaks(svc)
            return
        except (AssertionError, ray.exceptions.RayTaskError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def strata_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``strata ARGS`` in a subprocess, from the project root."""
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def reference_engine():
    """The single-process oracle: the same model in this process, no cache."""
    from engine.engine import LLMEngine

    eng = LLMEngine(
        EngineConfig(
            model="tiny", kv_cache_bytes=16 << 20, max_model_len=4096, enable_prefix_caching=False
        )
    )
    yield eng
    eng.close()
