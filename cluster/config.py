"""``ServiceConfig``: one frozen dataclass per component, loadable from YAML and overridden by
command-line flags.

YAML shape (every key optional)::

    num_prefill: 1
    num_decode: 1
    secret: null            # shared secret of the KV transfer API
    engine: {model: tiny, dtype: auto, block_size: 16, kv_cache_bytes: 256M}
    store: {host_capacity_bytes: 1G, disk_path: /nvme/strata, disk_capacity_bytes: 64G}
    router: {host: 127.0.0.1, port: 50051, auth_token: null, metrics_port: null}
    backend: {transfer_timeout_s: 30, max_buffered_tokens: 4096}
    transfer: {frame_bytes: 16M, shm_bytes: 256M, num_channels: 1}

``num_prefill: 0`` runs the service colocated: decode workers compute prompts too (no handoff).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from cluster.sizes import parse_size
from engine.config import EngineConfig
from kvstore.config import StoreConfig
from kvtransfer.config import TransferConfig
from router.config import BackendConfig, RouterConfig

_SIZE_FIELDS = {
    "kv_cache_bytes",
    "host_capacity_bytes",
    "disk_capacity_bytes",
    "max_message_bytes",
    "frame_bytes",
    "shm_bytes",
}


@dataclass(frozen=True)
class ServiceConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    num_prefill: int = 1
    num_decode: int = 1
    secret: str | None = None  # shared secret on the KVTransfer API between workers
    namespace: str = "strata"  # Ray namespace of the named actors

    def __post_init__(self) -> None:
        if self.num_prefill < 0 or self.num_decode < 1:
            raise ValueError(
                "the service needs at least one decode worker, and num_prefill >= 0 "
                "(0: decode workers compute prompts too)"
            )

    def store_for(self, worker_id: str) -> StoreConfig:
        """Each worker gets its own LMDB directory under ``store.disk_path``."""
        if not self.store.disk_path:
            return self.store
        return dataclasses.replace(
            self.store, disk_path=os.path.join(self.store.disk_path, worker_id)
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ServiceConfig:
        parts = {
            "engine": EngineConfig,
            "store": StoreConfig,
            "router": RouterConfig,
            "backend": BackendConfig,
            "transfer": TransferConfig,
        }
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            if key in parts:
                if not isinstance(value, dict):
                    raise ValueError(f"config: {key} must be a mapping")
                names = {f.name for f in dataclasses.fields(parts[key])}
                unknown = set(value) - names
                if unknown:
                    raise ValueError(
                        f"config: unknown {key} keys {sorted(unknown)}; known: {sorted(names)}"
                    )
                fixed = {
                    k: parse_size(v) if k in _SIZE_FIELDS and v is not None else v
                    for k, v in value.items()
                }
                kwargs[key] = parts[key](**fixed)
            elif key in ("num_prefill", "num_decode", "secret", "namespace"):
                kwargs[key] = value
            else:
                raise ValueError(f"config: unknown key {key!r}")
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str) -> ServiceConfig:
        import yaml

        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"{path}: cannot read config: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        return cls.from_dict(raw)
