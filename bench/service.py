"""``--start-service``: run a benchmark through a service this process starts and stops.

The service is the real one (Ray actors for one prefill and one decode worker, the router's gRPC
API on loopback), sized in tokens like the in-process benchmarks: the device pool, the host slab
and LMDB (in a temporary directory) of each worker.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from bench.common import EngineSizes

logger = logging.getLogger(__name__)


def model_context(model: str) -> int:
    """The context window (tokens) a model was made for: ``max_position_embeddings``."""
    from engine.loader import BUILTIN_MODELS, read_config
    from textproc.gguf_models import find_gguf

    if model in BUILTIN_MODELS:
        return BUILTIN_MODELS[model].max_position_embeddings
    gguf = find_gguf(model)
    if gguf is not None:
        from engine.gguf_loader import convert_gguf

        return read_config(convert_gguf(gguf)).max_position_embeddings
    return read_config(model).max_position_embeddings


def check_lengths(model: str, lengths: list[int]) -> None:
    """ValueError when a prompt of ``lengths`` does not fit the model's context window: past
    it a model's output means nothing, and the benchmark would time what no one serves. (The
    few tokens a benchmark generates after a prompt that fills the window run past it.)"""
    context = model_context(model)
    too_long = [n for n in lengths if n > context]
    if too_long:
        raise ValueError(
            f"--lengths {','.join(map(str, too_long))}: beyond {model}'s context of {context} "
            f"tokens (the longest prompt it takes)"
        )


def model_shape(model: str, dtype: str) -> tuple[int, int]:
    """(vocabulary size, KV bytes per token) of a built-in shape or a checkpoint directory."""
    from engine.loader import BUILTIN_MODELS, read_config, resolve_device, resolve_dtype
    from textproc.gguf_models import find_gguf

    dev = resolve_device("auto")
    if model in BUILTIN_MODELS:
        mc = BUILTIN_MODELS[model]
        dt = resolve_dtype(dtype, mc.torch_dtype, dev, builtin=True)
    elif (gguf := find_gguf(model)) is not None:  # dequantized like the built-in shapes
        from engine.gguf_loader import convert_gguf

        mc = read_config(convert_gguf(gguf))
        dt = resolve_dtype(dtype, "gguf", dev, builtin=True)
    else:
        mc = read_config(model)
        dt = resolve_dtype(dtype, mc.torch_dtype, dev, builtin=False)
    elem = dt.itemsize
    return mc.vocab_size, 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * elem


@dataclass(frozen=True)
class Target:
    """Where a benchmark sends its requests, and (for a service it started) how to push every
    worker's free cached blocks down to a tier (``"host"`` or ``"disk"``)."""

    address: str
    evict: Callable[[str], None] | None = None
    # WorkerInfo of the worker computing prompts (prefill-0, or decode-0 when colocated)
    worker_info: dict[str, Any] | None = None
    prefill_stats: Callable[[], list[dict[str, float]]] | None = None  # each prefill worker's


@contextlib.contextmanager
def local_service(
    model: str, dtype: str, sizes: EngineSizes, num_prefill: int = 1
) -> Iterator[Target]:
    """Start the service on an embedded Ray cluster; yield it as a ``Target``; stop it.
    ``num_prefill=0``: colocated (the decode worker computes prompts too)."""
    from cluster.config import ServiceConfig
    from cluster.launcher import launch
    from engine.config import EngineConfig
    from kvstore.config import StoreConfig
    from router.config import RouterConfig

    block_size = EngineConfig().block_size
    _, per_token = model_shape(model, dtype)

    def nbytes(tokens: int) -> int:
        return -(-tokens // block_size) * block_size * per_token if tokens > 0 else 0

    with tempfile.TemporaryDirectory(prefix="strata-bench-service-") as disk_dir:
        use_disk = sizes.disk_tokens > 0
        cfg = ServiceConfig(
            engine=EngineConfig(model=model, dtype=dtype, max_model_len=sizes.max_model_len,
                                max_num_batched_tokens=sizes.max_batched_tokens,
                                kv_cache_bytes=nbytes(sizes.pool_tokens)),
            store=StoreConfig(
                host_capacity_bytes=nbytes(sizes.host_tokens),
                disk_path=os.path.join(disk_dir, "kv") if use_disk else None,
                disk_capacity_bytes=max(nbytes(sizes.disk_tokens), 64 << 20) if use_disk else 0,
                disk_write_queue_blocks=4096,
            ),
            router=RouterConfig(host="127.0.0.1", port=0, max_model_len=sizes.max_model_len),
            num_prefill=num_prefill, num_decode=1,
        )
        svc = launch(cfg)
        logger.info("benchmark service at %s", svc.address)

        import ray

        def evict(down_to: str) -> None:
            ray.get([w.evict_cached.remote(down_to) for w in svc.prefill + svc.decode],
                    timeout=120)

        try:
            first = (svc.prefill or svc.decode)[0]
            info = dataclasses.asdict(ray.get(first.info.remote(), timeout=120))
            yield Target(svc.address, evict, info, lambda: ray.get(
                [w.stats.remote() for w in svc.prefill], timeout=120))
        finally:
            svc.shutdown()


@contextlib.contextmanager
def server_target(args: argparse.Namespace, sizes: EngineSizes) -> Iterator[Target]:
    """The service at ``--server``, or one started for this run (``--start-service``)."""
    if args.server and args.start_service:
        raise ValueError("give --server or --start-service, not both")
    if not args.start_service:
        yield Target(args.server)
        return
    if args.vocab_size is None:
        args.vocab_size = model_shape(args.model, args.dtype)[0]
    with local_service(args.model, args.dtype, sizes) as target:
        yield target
