"""``WorkerSpec``: everything a worker is started with, as one frozen value.

The cluster builds one per worker (``cluster.workers.create_worker``) and hands it to the
worker's Ray actor, which passes it on to the plain worker class (``PrefillWorker`` or
``DecodeWorker``, both over ``worker.base.WorkerBase``); tests build one to start a worker in
their own process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import EngineConfig
from kvstore.config import StoreConfig
from kvtransfer.config import TransferConfig


@dataclass(frozen=True)
class WorkerSpec:
    worker_id: str  # "<role>-<index>": its name in the router, logs and metrics
    engine: EngineConfig  # the model and its engine
    store: StoreConfig  # its tiers (each worker has its own disk directory)
    secret: str | None = None  # shared secret of the KV transfer API between workers
    kv_host: str = "127.0.0.1"  # where its gRPC server listens ("0.0.0.0": every interface)
    kv_port: int = 0  # 0: a free port
    advertise_host: str | None = None  # the address others reach it at (None: ``kv_host``)
    transfer: TransferConfig = field(default_factory=TransferConfig)  # the pushes it sends

    @property
    def binds_all(self) -> bool:
        """Its server listens on every interface (a cluster of several machines)."""
        return self.kv_host in ("0.0.0.0", "::")
