"""A benchmark run's files: one small summary JSON to commit, the per-request samples beside it.

A run's result (the dict a benchmark builds) is split in two when it is written:

- ``NAME-YYYYMMDD-HHMMSS.json``, the summary: machine, versions, configuration, tables,
  percentiles; every per-sample list taken out, with its count and the percentiles of its
  timings (``sample_lists``) left in its place, and the name of the samples file
  (``sample_file``). Tens of KB at most; this is what ``bench/results/<machine>/`` keeps.
- ``NAME-YYYYMMDD-HHMMSS.samples.json.gz``: the lists taken out (one entry per list, with its
  path in the result), compact and gzip-compressed; git ignores it.

A per-sample list is a list under one of ``SAMPLE_KEYS`` at any depth (``samples``,
``requests``, ``step_s``); a number under the same key (a count) stays in the summary.
``load_result`` puts the samples back when their file is there, so a plot or a check sees the
result the benchmark built. Also a command:

    python -m bench results resave FILE.json ...   # an old full JSON -> summary + samples file
    python -m bench results plot FILE.json [PNG]   # draw the PNG again from the files
    python -m bench results compact FILE.png ...   # store plots as palette PNGs
"""

from __future__ import annotations

import argparse
import copy
import gzip
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from typing import Any

SAMPLE_KEYS = frozenset({"samples", "requests", "step_s"})
SAMPLES_SUFFIX = ".samples.json.gz"
SAMPLES_FORMAT = 1
VERSIONED = ("strata", "torch", "triton", "ray", "grpcio", "protobuf", "lmdb", "numpy",
             "transformers")

Path = list[str | int]


def split_samples(result: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, lists): a copy of ``result`` without its per-sample lists, and those lists as
    ``{"path": [...], "items": [...]}`` in the order they were found."""
    summary = copy.deepcopy(result)
    lists: list[dict[str, Any]] = []
    _take(summary, [], lists)
    return summary, lists


def _take(node: object, path: Path, lists: list[dict[str, Any]]) -> None:
    if isinstance(node, dict):
        for key in list(node):
            value = node[key]
            if key in SAMPLE_KEYS and isinstance(value, list):
                lists.append({"path": [*path, key], "items": node.pop(key)})
            else:
                _take(value, [*path, key], lists)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _take(value, [*path, i], lists)


def merge_samples(summary: dict[str, Any], lists: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The result ``split_samples`` was given: ``summary`` with ``lists`` put back."""
    result = copy.deepcopy(summary)
    for entry in lists:
        *parents, key = entry["path"]
        node: Any = result
        for p in parents:
            node = node[p]
        node[key] = entry["items"]
    result.pop("sample_file", None)
    result.pop("sample_lists", None)
    return result


def list_stats(items: Sequence[Any]) -> dict[str, Any]:
    """Count, and p50/p90/p99/max of the list's timings: the numbers themselves, or every field
    ending in ``_s`` of its records (``None`` values left out)."""
    stats: dict[str, Any] = {"count": len(items)}
    if items and all(isinstance(x, (int, float)) for x in items):
        stats["value"] = _percentiles([float(x) for x in items])
        return stats
    fields: dict[str, list[float]] = {}
    for rec in items:
        if not isinstance(rec, dict):
            continue
        for k, v in rec.items():
            if k.endswith("_s") and isinstance(v, (int, float)) and not isinstance(v, bool):
                fields.setdefault(k, []).append(float(v))
    for k in sorted(fields):
        stats[k] = _percentiles(fields[k])
    return stats


def _percentiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)

    def rank(p: float) -> float:  # nearest rank, as bench.common.summarize
        return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))]

    return {"p50": statistics.median(xs), "p90": rank(90), "p99": rank(99), "max": xs[-1]}


def samples_path(json_path: str) -> str:
    """``x/NAME-TS.json`` -> ``x/NAME-TS.samples.json.gz``."""
    return os.path.splitext(json_path)[0] + SAMPLES_SUFFIX


def save(json_path: str, result: dict[str, Any]) -> str | None:
    """Write ``result`` as a summary at ``json_path`` and its samples beside it (no samples
    file when it has none); returns the samples file's path or None."""
    summary, lists = split_samples(result)
    spath: str | None = None
    if lists:
        spath = samples_path(json_path)
        summary["sample_file"] = os.path.basename(spath)
        summary["sample_lists"] = dict(sorted(
            ("/".join(str(p) for p in e["path"]), list_stats(e["items"])) for e in lists))
        tmp = spath + ".tmp"
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=6) as f:
            json.dump({"format": SAMPLES_FORMAT, "lists": lists}, f, separators=(",", ":"))
        os.replace(tmp, spath)
    tmp = json_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    os.replace(tmp, json_path)
    return spath


def write(out_dir: str, name: str, result: dict[str, Any]) -> str:
    """Write a new run ``<out_dir>/<name>-<timestamp>.json`` (+ samples); returns its path.
    The summary gets the package versions and the code's commit when it has none."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    if "versions" not in result:
        result = {**result, "versions": versions()}
    save(path, result)
    return path


def load(json_path: str) -> dict[str, Any]:
    """The run at ``json_path``: its summary, with the samples put back when their file is
    beside it (``has_samples`` says which)."""
    with open(json_path, encoding="utf-8") as f:
        summary = json.load(f)
    name = summary.get("sample_file")
    if not name:  # written before summaries, or a run without samples: it is whole
        return summary
    spath = os.path.join(os.path.dirname(json_path), name)
    if not os.path.exists(spath):
        return summary
    with gzip.open(spath, "rt", encoding="utf-8") as f:
        payload = json.load(f)
    if payload.get("format") != SAMPLES_FORMAT:
        raise ValueError(f"{spath}: unknown samples format {payload.get('format')!r}")
    return merge_samples(summary, payload["lists"])


def has_samples(result: dict[str, Any]) -> bool:
    """False for a summary whose samples file was not found."""
    return "sample_lists" not in result


def versions() -> dict[str, str]:
    """Installed versions of the packages a figure depends on, and the code's git commit."""
    out: dict[str, str] = {}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True)
        out["commit"] = head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def compact_png(png: str) -> None:
    """Store a plot as a 256-colour palette PNG (a third of the bytes, the same picture for a
    chart); left as it is without Pillow."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(png) as im:
        if im.mode == "P":
            return
        small = im.convert("RGB").quantize(
            colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    tmp = png + ".tmp.png"
    small.save(tmp, optimize=True)
    os.replace(tmp, png)


def draw(result: dict[str, Any], png: str) -> None:
    """Draw ``result``'s PNG with its benchmark's own ``plot`` (then ``compact_png``)."""
    from bench.cli import COMMANDS

    name = result.get("benchmark")
    if name not in COMMANDS:
        raise ValueError(f"not a benchmark result (benchmark: {name!r})")
    plot = importlib.import_module(COMMANDS[name]).plot
    try:
        plot(result, png)
    except (KeyError, IndexError, TypeError) as e:
        if has_samples(result):
            raise
        raise ValueError(f"the {name} plot needs the per-request samples "
                         f"({result.get('sample_file')}), which are not beside the summary") from e
    compact_png(png)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench results", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    rs = sub.add_parser("resave", help="rewrite full result JSONs as summary + samples file")
    rs.add_argument("files", nargs="+")
    pl = sub.add_parser("plot", help="draw a result's PNG again (from summary and samples)")
    pl.add_argument("file")
    pl.add_argument("png", nargs="?", default=None, help="default: beside the JSON")
    cp = sub.add_parser("compact", help="store plots as 256-colour palette PNGs")
    cp.add_argument("files", nargs="+")
    args = p.parse_args(argv)
    if args.command == "compact":
        for path in args.files:
            before = os.path.getsize(path)
            compact_png(path)
            print(f"{path}: {before} B -> {os.path.getsize(path)} B")
        return 0
    if args.command == "resave":
        for path in args.files:
            before = os.path.getsize(path)
            result = load(path)
            spath = save(path, result)
            extra = f" + {os.path.getsize(spath)} B in {os.path.basename(spath)}" if spath else ""
            print(f"{path}: {before} B -> {os.path.getsize(path)} B{extra}")
        return 0
    result = load(args.file)
    png = args.png or os.path.splitext(args.file)[0] + ".png"
    try:
        draw(result, png)
    except (ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
