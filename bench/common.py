"""Shared pieces of the benchmarks: machine description, engines, prompts, stats, output files."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bench.run_files import compact_png, samples_path
from bench.run_files import write as write_result

logger = logging.getLogger(__name__)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TIERS = ("device", "host", "disk")


class BenchmarkError(RuntimeError):
    """The benchmark would time the wrong thing (wrong tier, different output)."""


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, accelerator and software versions of this machine."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["mem_total_gib"] = round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
        )
    except (ValueError, OSError):
        pass
    return info


def new_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's parser with the flags every model benchmark has: ``--model``, ``--dtype``."""
    p = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n")[0])
    p.add_argument("--model", default="tiny", help="built-in shape or checkpoint directory")
    p.add_argument("--dtype", default="auto")
    return p


def add_run_flags(p: argparse.ArgumentParser, quick_help: str) -> None:
    """``--seed``, ``--out``, ``--quick``, ``--no-progress`` and the service flags."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for JSON + PNG (bench/results)")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--no-progress", action="store_true")
    add_service_flags(p)


def add_service_flags(p: argparse.ArgumentParser) -> None:
    """``--server``, ``--start-service``, ``--token``, ``--vocab-size``: run against a service."""
    p.add_argument("--server", default=None, help="HOST:PORT of a running service")
    p.add_argument("--start-service", action="store_true",
                   help="start a local service (1 prefill + 1 decode worker) sized like the "
                        "in-process run, benchmark it through gRPC, stop it")
    p.add_argument("--token", default=None, help="bearer token for --server")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="--server: prompt ids are drawn from [0, N) (default: the vocabulary "
                        "size the service reports)")


def parse_ints(text: str, what: str) -> list[int]:
    """``"1024,4096"`` -> ``[1024, 4096]``; ValueError naming the flag otherwise."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{what} must be positive integers, got {text!r}")
    return values


def random_prompt(seed: int, length: int, vocab_size: int, avoid: Sequence[int] = ()) -> list[int]:
    """``length`` token ids drawn from a generator keyed by ``seed`` (never ids in ``avoid``)."""
    rng = random.Random(seed)
    banned = set(avoid)
    allowed = [t for t in range(min(vocab_size, 1 << 16)) if t not in banned]
    return [allowed[rng.randrange(len(allowed))] for _ in range(length)]


def builtin_vocab(model: str) -> int:
    """Vocabulary size of a built-in shape (for prompts sent to a service)."""
    from engine.loader import BUILTIN_MODELS

    if model not in BUILTIN_MODELS:
        raise ValueError(f"--vocab-size is needed for model {model!r} (not a built-in shape)")
    return BUILTIN_MODELS[model].vocab_size


def run_salt() -> str:
    """A cache salt unique to this benchmark run (for runs against a long-lived service)."""
    return f"bench-{os.getpid()}-{time.time_ns()}"


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """count, mean, p50, p90, p99 (nearest rank) of ``samples``; empty -> count 0."""
    if not samples:
        return {"count": 0}
    xs = sorted(samples)

    def pct(p: float) -> float:
        return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))]

    return {
        "count": len(xs),
        "mean": statistics.fmean(xs),
        "p50": statistics.median(xs),
        "p90": pct(90),
        "p99": pct(99),
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(x: object) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return "-" if x is None else str(x)


def write_json(out_dir: str | None, name: str, payload: dict[str, Any]) -> str:
    """Write ``payload`` as ``<out_dir>/<name>-<timestamp>.json``, a summary, with its
    per-request samples in a compressed file beside it (``bench.run_files``); returns the path."""
    return write_result(out_dir or RESULTS_DIR, name, payload)


def report(
    out_dir: str | None,
    name: str,
    result: dict[str, Any],
    render: Callable[[dict[str, Any]], str],
    draw: Callable[[dict[str, Any], str], None],
) -> None:
    """Print the table, write the summary JSON (+ samples file) and draw the PNG beside it
    (from the whole result, samples included)."""
    print(render(result))
    path = write_json(out_dir, name, result)
    wrote = path + (f", {samples_path(path)}" if os.path.exists(samples_path(path)) else "")
    try:
        draw(result, png_path(path))
        compact_png(png_path(path))
    except ImportError as e:  # a machine without matplotlib still gets the table and the JSON
        print(f"\nwrote {wrote} (no PNG: {e})")
        return
    print(f"\nwrote {wrote} and {png_path(path)}")


def png_path(json_path: str) -> str:
    return os.path.splitext(json_path)[0] + ".png"


def pyplot():  # matplotlib's module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def memory_copy_bandwidth(
    dtype: torch.dtype, device: torch.device, nbytes: int = 256 << 20
) -> float:
    """GB/s of a large tensor copy on ``device`` (bytes read + written, best of 5).

    On CUDA this is the HBM bandwidth; on a CPU it is the memory-bandwidth analogue.
    """
    elem = torch.tensor([], dtype=dtype).element_size()
    src = torch.ones(nbytes // elem, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * elem / best / 1e9


@dataclass(frozen=True)
class EngineSizes:
    pool_tokens: int  # device pool capacity in tokens
    host_tokens: int  # host slab capacity in tokens (0 = off)
    disk_tokens: int  # LMDB capacity in tokens (0 = off)
    max_model_len: int  # context window the engine accepts
    max_batched_tokens: int  # tokens per step (prefill chunk)


def build_engine(  # an LLMEngine
    model: str, dtype: str, sizes: EngineSizes, disk_dir: str | None, *,
    loaded: Any = None, store_kw: dict[str, Any] | None = None, **engine_kw: Any,
) -> Any:
    """An ``LLMEngine`` with a ``TieredStore`` sized in tokens (host slab, LMDB in ``disk_dir``).

    ``loaded``: a ``LoadedModel`` to share (its weights are not loaded again); ``store_kw``:
    further ``StoreConfig`` fields (``disk_write_policy``, ...)."""
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.loader import load_model
    from kvstore.config import StoreConfig
    from kvstore.layout import KVLayout

    cfg = EngineConfig(
        model=model, dtype=dtype, max_model_len=sizes.max_model_len,
        max_num_batched_tokens=sizes.max_batched_tokens, **engine_kw,
    )
    if loaded is None:
        loaded = load_model(cfg.model, cfg.dtype, cfg.device, cfg.seed)
    mc = loaded.config
    block_nbytes = KVLayout(
        mc.num_layers, cfg.block_size, mc.num_kv_heads, mc.head_dim, loaded.dtype
    ).block_nbytes

    def nbytes(tokens: int) -> int:
        return -(-tokens // cfg.block_size) * block_nbytes if tokens > 0 else 0

    cfg = EngineConfig(
        model=model, dtype=dtype, max_model_len=sizes.max_model_len,
        max_num_batched_tokens=sizes.max_batched_tokens, kv_cache_bytes=nbytes(sizes.pool_tokens),
        **engine_kw,
    )
    use_disk = sizes.disk_tokens > 0 and disk_dir is not None
    store = StoreConfig(**{
        "host_capacity_bytes": nbytes(sizes.host_tokens),
        "disk_path": disk_dir if use_disk else None,
        "disk_capacity_bytes": max(nbytes(sizes.disk_tokens), 64 << 20) if use_disk else 0,
        "disk_write_queue_blocks": 4096,
        **(store_kw or {}),
    })
    return LLMEngine(cfg, store, loaded=loaded)


def kv_bytes(engine: Any, num_tokens: int) -> int:  # LLMEngine
    """Bytes of K/V of ``num_tokens`` tokens (whole blocks) in ``engine``'s layout."""
    return -(-num_tokens // engine.block_size) * engine.layout.block_nbytes


def progress(total: int, desc: str, disable: bool = False):  # tqdm bar
    try:
        from tqdm import tqdm
    except ImportError:  # no progress bar where tqdm is missing
        return _NoBar()
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=disable, leave=False)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass
