"""The disk tier against the device: read layouts, a hit across processes, opening a large store.

    python -m bench.disk --sections layouts --block-bytes 737280 --total-mib 256 --dir D
    python -m bench.disk --sections cross-process --model smollm2-135m --length 4000 --dir D
    python -m bench.disk --sections startup --store-gib 1,2,4,8 --block-bytes 32768 --dir D

Every read from disk here comes after ``echo 3 > /proc/sys/vm/drop_caches`` (root; the JSON says
whether it could be done), and every figure sits beside the device's own ``O_DIRECT`` sequential
read speed (``kvstore.bandwidth.device_read_ceiling``), measured in the same run.

1. ``layouts`` -- how the disk tier's layout was chosen: the same blocks read back, in order, as
   (a) one LMDB value per block with ``readahead=False`` (disk format 1), (b) with readahead,
   (c) with readahead, ``MADV_WILLNEED`` on every value and 4 threads, and (d) through the disk
   tier (format 2: segment files, ``O_DIRECT`` chunks on reader threads); medians of
   ``--repeats``. Checksums are verified in (a) to (d) alike.
2. ``cross-process`` -- process 1 runs a prompt cold with a fresh ``--disk-path`` and exits.
   Then, in each repeat, the same prompt runs in a fresh process twice, in alternating order:
   on that store with its files' pages evicted (``POSIX_FADV_DONTNEED``; ``mincore`` says what
   was still resident), so the hit reads the device, and on a copy of the store in memory
   (tmpfs: with ``O_DIRECT`` or without, a read there is a memory copy). What reading the disk
   costs, counted over the whole process and not only the TTFT, = wall(device) - wall(memory),
   against the ``O_DIRECT`` floor of the bytes it read; beside it the bytes each process read
   from the device over its whole life (``getrusage``), the hit's load alone (``load_s``:
   its start to its last block's arrival, inside the TTFT), and the whole hit over a process
   that runs a 1-token prompt on the same store.
3. ``startup`` -- a store grown to each size in ``--store-gib`` (real blocks written through the
   tier), then opened in a fresh process after a cache drop: seconds to open against blocks.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from bench.common import format_table, machine_info, parse_ints, random_prompt, write_json
from kvstore.bandwidth import device_read_ceiling, drop_os_caches, drop_page_cache

SECTIONS = ("layouts", "cross-process", "startup")
FP = b"bench-disk-fprnt"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.disk", description=__doc__.split("\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--dir", default=tempfile.gettempdir(), help="scratch directory on the disk")
    p.add_argument("--block-bytes", type=int, default=737280, help="layouts/startup block size")
    p.add_argument("--total-mib", type=int, default=256, help="layouts: MiB read")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="smollm2-135m", help="cross-process: the model")
    p.add_argument("--length", type=int, default=4000, help="cross-process: prompt tokens")
    p.add_argument("--store-gib", default="1,2,4", help="startup: store sizes (GiB)")
    p.add_argument("--out", default=None, help="directory for the JSON (bench/results)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = set(sections) - set(SECTIONS)
    if bad:
        print(f"error: unknown sections {sorted(bad)}; choose from {', '.join(SECTIONS)}",
              file=sys.stderr)
        return 2
    os.makedirs(args.dir, exist_ok=True)
    ceiling = device_read_ceiling(args.dir)
    out: dict[str, Any] = {"benchmark": "disk", "machine": machine_info(),
                           "config": vars(args), "device_read_gbps": ceiling, "sections": {}}
    print(f"device: O_DIRECT sequential read {ceiling:.2f} GB/s (best of queue depths 1/4/8)")
    runs: dict[str, Callable[[argparse.Namespace, float], dict[str, Any]]] = {
        "layouts": layouts, "cross-process": cross_process, "startup": startup}
    for name in sections:
        out["sections"][name] = res = runs[name](args, ceiling)
        print(f"\n{res['title']}\n{res['table']}")
    path = write_json(args.out, "disk", out)
    print(f"\nwrote {path}")
    return 0


# ---- 1. layouts ----------------------------------------------------------------------------
def layouts(args: argparse.Namespace, ceiling: float) -> dict[str, Any]:
    import lmdb

    from kvstore.tiers.disk import DiskTier

    nb, n = args.block_bytes, max(1, (args.total_mib << 20) // args.block_bytes)
    work = tempfile.mkdtemp(prefix="strata-layouts-", dir=args.dir)
    rng = np.random.default_rng(0)
    hashes = [os.urandom(16) for _ in range(n)]
    try:
        env = lmdb.open(os.path.join(work, "lmdb"), map_size=2 * n * (nb + 8192) + (64 << 20))
        tier = DiskTier(os.path.join(work, "tier"), 2 * n * nb + (64 << 20), nb, FP,
                        write_queue_blocks=64)
        crcs = []
        for i0 in range(0, n, 64):
            rows = torch.from_numpy(rng.integers(0, 256, (min(64, n - i0), nb), dtype=np.uint8))
            with env.begin(write=True) as txn:
                for j, row in enumerate(rows):
                    crcs.append(zlib.crc32(row.numpy()))
                    txn.put(hashes[i0 + j], struct.pack("<I", crcs[-1]) + row.numpy().tobytes())
            tier.put(hashes[i0 : i0 + len(rows)], rows)
            tier.flush()
        env.close()
        tier.close()
        methods: dict[str, Callable[[], float]] = {
            "LMDB values, readahead off (format 1)": lambda: _lmdb_read(work, hashes, crcs, nb,
                                                                         False, False, 1),
            "LMDB values, readahead": lambda: _lmdb_read(work, hashes, crcs, nb, True, False, 1),
            "LMDB values, readahead + WILLNEED + 4 threads": lambda: _lmdb_read(
                work, hashes, crcs, nb, True, True, 4),
            "disk tier (format 2)": lambda: _tier_read(work, hashes, nb, n),
        }
        times: dict[str, list[float]] = {m: [] for m in methods}
        dropped = True
        for _ in range(args.repeats):
            for name, fn in methods.items():
                dropped &= drop_os_caches()
                times[name].append(fn())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows, res = [], {}
    for name, ts in times.items():
        gbps = n * nb / statistics.median(ts) / 1e9
        res[name] = {"seconds": ts, "gbps": gbps, "of_ceiling": gbps / ceiling}
        rows.append([name, gbps, gbps / ceiling])
    title = (f"layouts: {n} blocks of {nb} bytes ({n * nb >> 20} MiB) read in order, medians of "
             f"{args.repeats}; caches {'dropped' if dropped else 'NOT dropped (not root)'} "
             "before each")
    return {"title": title, "table": format_table(["method", "GB/s", "of O_DIRECT"], rows),
            "block_bytes": nb, "num_blocks": n, "caches_dropped": dropped, "methods": res}


def _lmdb_read(work: str, hashes: list[bytes], crcs: list[int], nb: int, readahead: bool,
               willneed: bool, threads: int) -> float:
    import lmdb

    env = lmdb.open(os.path.join(work, "lmdb"), readonly=True, lock=False, readahead=readahead)
    out = np.empty((len(hashes), nb), np.uint8)
    libc = ctypes.CDLL(None)
    start = time.perf_counter()
    with env.begin(buffers=True) as txn:
        values = [txn.get(h) for h in hashes]
        if willneed:
            for v in values:
                addr = np.frombuffer(v, np.uint8).ctypes.data
                base = addr & ~4095
                libc.madvise(ctypes.c_void_p(base), ctypes.c_size_t(addr + len(v) - base), 3)

        def copy(idx: range) -> None:
            for i in idx:
                out[i] = np.frombuffer(values[i], np.uint8, nb, 4)
                assert zlib.crc32(out[i]) == crcs[i]

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(copy, [range(t, len(hashes), threads) for t in range(threads)]))
    seconds = time.perf_counter() - start
    env.close()
    return seconds


def _tier_read(work: str, hashes: list[bytes], nb: int, n: int) -> float:
    from kvstore.keys import BlockHash
    from kvstore.layout import aligned_empty
    from kvstore.tiers.disk import DiskTier

    tier = DiskTier(os.path.join(work, "tier"), 2 * n * nb + (64 << 20), nb, FP)
    out = aligned_empty(n, nb)
    try:
        start = time.perf_counter()
        ok = tier.get_into([BlockHash(h) for h in hashes], out)
        seconds = time.perf_counter() - start
        assert all(ok), "the tier lost blocks"
        return seconds
    finally:
        tier.close()


# ---- 2. a hit across processes -------------------------------------------------------------
def cross_process(args: argparse.Namespace, ceiling: float) -> dict[str, Any]:
    from engine.loader import load_model

    loaded = load_model(args.model, "auto", "cpu", 0)
    vocab = loaded.config.vocab_size
    prompt = random_prompt(7, args.length, vocab)
    store = tempfile.mkdtemp(prefix="strata-xproc-", dir=args.dir)
    ram_root = tempfile.mkdtemp(prefix="strata-xproc-ram-", dir=_memory_fs())
    ram = os.path.join(ram_root, "store")

    def cmd(path: str, ids: list[int]) -> list[str]:
        return [sys.executable, "-m", "cluster.cli", "generate", "--model", args.model,
                "--max-tokens", "1", "--disk-path", path, "--json", "--prompt-ids", _ids(ids)]

    def on_device(ids: list[int]) -> dict[str, Any]:
        evicted = drop_page_cache(store)
        resident = resident_bytes(store)
        run = _timed_run(cmd(store, ids))
        run.update(evicted=evicted, resident_before=resident)
        return run

    try:
        first = _timed_run(cmd(store, prompt))
        drop_page_cache(store)
        shutil.copytree(store, ram)  # memory: what reads it costs is a copy, never the device
        runs = []
        for i in range(args.repeats):
            r: dict[str, Any] = {}
            for kind in (("device", "memory") if i % 2 == 0 else ("memory", "device")):
                r[kind] = on_device(prompt) if kind == "device" else _timed_run(cmd(ram, prompt))
            r["baseline"] = on_device(random_prompt(8, 1, vocab))
            runs.append(r)
    finally:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(ram_root, ignore_errors=True)
    disk_tokens = runs[0]["device"]["json"]["cached_tokens_by_tier"].get("disk", 0)
    block_nbytes = (16 * 2 * loaded.config.num_layers * loaded.config.num_kv_heads
                    * loaded.config.head_dim * loaded.dtype.itemsize)
    nbytes = disk_tokens // 16 * block_nbytes
    floor = nbytes / (ceiling * 1e9)

    def med(fn: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median(fn(r) for r in runs)

    cost = med(lambda r: r["device"]["wall_s"] - r["memory"]["wall_s"])
    over_one = med(lambda r: r["device"]["wall_s"] - r["baseline"]["wall_s"])
    load = med(lambda r: r["device"]["json"]["load_ms"]) / 1e3
    load_mem = med(lambda r: r["memory"]["json"]["load_ms"]) / 1e3
    ttft = med(lambda r: r["device"]["json"]["ttft_ms"])
    read = med(lambda r: r["device"]["device_read_bytes"])
    rows = [[r["device"]["wall_s"], r["memory"]["wall_s"],
             r["device"]["wall_s"] - r["memory"]["wall_s"], r["baseline"]["wall_s"],
             r["device"]["json"]["ttft_ms"], r["device"]["json"]["load_ms"],
             r["memory"]["json"]["load_ms"], r["device"]["device_read_bytes"] / 2**20,
             r["memory"]["device_read_bytes"] / 2**20, r["device"]["resident_before"]]
            for r in runs]
    title = (
        f"cross-process hit: {args.model}, {args.length} tokens, {disk_tokens} from disk "
        f"({nbytes / 2**20:.0f} MiB; O_DIRECT floor {floor * 1e3:.0f} ms). Process 1 (cold) "
        f"{first['wall_s']:.2f} s. Each repeat runs the hit in a fresh process twice, in "
        "alternating order: its store on the device (the store's pages evicted first; resident "
        "bytes checked with mincore) and a copy of the store in memory (tmpfs). Cost of reading "
        f"the disk over the whole process = wall(device) - wall(memory): median {cost:.2f} s = "
        f"{cost / floor:.2f} x floor; the device run read {read / 2**20:.0f} MiB from the device "
        f"in all (getrusage). The hit's load: {load * 1e3:.0f} ms from the device = "
        f"{load / floor:.2f} x floor, {load_mem * 1e3:.0f} ms from memory; its TTFT "
        f"{ttft:.0f} ms (the rest computes the prompt's last block over the loaded context). "
        f"The whole hit over a 1-token process on the same store: {over_one:.2f} s")
    table = format_table(["device wall s", "memory wall s", "disk cost s", "1-token wall s",
                          "TTFT ms", "load ms", "memory load ms", "device MiB read",
                          "memory MiB read", "resident B"], rows)
    return {"title": title, "table": table, "runs": runs, "cold": first, "disk_tokens":
            disk_tokens, "bytes": nbytes, "floor_s": floor, "hit_cost_s": cost,
            "hit_cost_over_floor": cost / floor if floor else None,
            "hit_over_one_token_s": over_one, "hit_device_read_bytes": read,
            "hit_load_s": load, "hit_load_over_floor": load / floor if floor else None,
            "hit_load_memory_s": load_mem,
            "caches": "the store's files evicted (POSIX_FADV_DONTNEED) before each device run; "
                      "resident_before is what mincore found of them just before"}


def _memory_fs() -> str:
    """A directory whose files are memory (tmpfs): /dev/shm where it is one."""
    if os.path.isdir("/dev/shm") and os.statvfs("/dev/shm").f_bavail:
        return "/dev/shm"
    raise SystemExit("error: cross-process needs a tmpfs at /dev/shm for its in-memory run")


def resident_bytes(root: str) -> int:
    """Bytes of the files under ``root`` now in the page cache (``mincore`` of a mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for top, _, names in os.walk(root):
        for name in names:
            path = os.path.join(top, name)
            size = os.path.getsize(path)
            if size == 0:
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
                if addr in (None, ctypes.c_void_p(-1).value):
                    raise OSError(ctypes.get_errno(), f"mmap {path}")
                try:
                    vec = ctypes.create_string_buffer((size + page - 1) // page)
                    if libc.mincore(addr, size, vec) != 0:
                        raise OSError(ctypes.get_errno(), f"mincore {path}")
                    total += sum(b & 1 for b in vec.raw) * page
                finally:
                    libc.munmap(addr, size)
            finally:
                os.close(fd)
    return total


def _ids(prompt: list[int]) -> str:
    return ",".join(str(t) for t in prompt)


def _timed_run(cmd: list[str]) -> dict[str, Any]:
    """Run ``cmd``: its wall seconds, its JSON, and the bytes it read from block devices over
    its whole life (``getrusage`` of the children: ``O_DIRECT`` reads count, page-cache hits
    and tmpfs do not)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    read = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock - before) * 512
    return {"wall_s": wall, "json": json.loads(done.stdout), "device_read_bytes": read}


# ---- 3. opening a large store --------------------------------------------------------------
OPEN = """
import sys, time
t0 = time.perf_counter()
from kvstore.tiers.disk import DiskTier
t1, c1 = time.perf_counter(), time.process_time()
d = DiskTier(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), {fp!r})
t2, c2 = time.perf_counter(), time.process_time()
print(d.num_blocks, t1 - t0, t2 - t1, c2 - c1)
d.close()
"""


def startup(args: argparse.Namespace, ceiling: float) -> dict[str, Any]:
    from kvstore.keys import BlockHash
    from kvstore.tiers.disk import DiskTier

    nb = args.block_bytes
    sizes = parse_ints(args.store_gib, "--store-gib")
    capacity = (max(sizes) << 30) + (256 << 20)
    path = tempfile.mkdtemp(prefix="strata-startup-", dir=args.dir)
    batch = max(1, (64 << 20) // nb)
    data = torch.randint(0, 256, (batch, nb), dtype=torch.uint8)
    rows, res = [], []
    written = 0
    try:
        for gib in sorted(sizes):
            tier = DiskTier(path, capacity, nb, FP, write_queue_blocks=batch)
            t0 = time.perf_counter()
            while written < (gib << 30) // nb:
                k = min(batch, (gib << 30) // nb - written)
                tier.put([BlockHash(os.urandom(16)) for _ in range(k)], data[:k])
                tier.flush()
                written += k
            write_s = time.perf_counter() - t0
            tier.close()
            dropped = drop_os_caches()
            out = subprocess.run([sys.executable, "-c", OPEN.format(fp=FP), path, str(capacity),
                                  str(nb)], check=True, capture_output=True, text=True)
            blocks, import_s, open_s, cpu_s = out.stdout.split()
            index_mib = os.path.getsize(os.path.join(path, "index", "data.mdb")) / 2**20
            res.append({"gib": gib, "blocks": int(blocks), "open_s": float(open_s),
                        "open_cpu_s": float(cpu_s), "import_s": float(import_s),
                        "index_mib": index_mib, "caches_dropped": dropped, "write_s": write_s})
            rows.append([gib, int(blocks), float(open_s), float(cpu_s),
                         float(cpu_s) / int(blocks) * 1e6, index_mib, dropped])
    finally:
        shutil.rmtree(path, ignore_errors=True)
    title = (f"startup: a store of {nb}-byte blocks opened in a fresh process after a cache "
             "drop (the index is read, no payload)")
    return {"title": title, "table": format_table(
        ["GiB", "blocks", "open s", "open CPU s", "CPU us / block", "index MiB",
         "caches dropped"], rows),
        "block_bytes": nb, "rows": res}


if __name__ == "__main__":
    sys.exit(main())
