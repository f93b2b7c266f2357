"""One entry for every benchmark: ``python -m bench NAME [flags]`` (``strata bench NAME``)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "ttft": "bench.ttft",
    "longdoc": "bench.longdoc",
    "trace": "bench.trace",
    "decode": "bench.decode",
    "transfer": "bench.transfer",
    "soak": "bench.soak",
    "router": "bench.router",
    "offload": "bench.offload",
    "gpu": "bench.gpu",
    "disk": "bench.disk",
    "results": "bench.run_files",
}


SUMMARY = {
    "ttft": "TTFT cold and warm from each tier (device, host, disk), with floors",
    "longdoc": "long documents asked several questions; TTFT per round, hits per tier",
    "trace": "replay a Mooncake-format trace; TTFT/TBT percentiles, hit rates",
    "decode": "decode tokens/s by batch size beside the roofline",
    "transfer": "KV transfer between processes (gRPC, shared memory) beside the raw gRPC ceiling",
    "soak": "chaos soak: clients while workers are killed; statuses, wrong outputs, recovery",
    "router": "placement and index at 8-1,024 simulated workers; trace hit rates and TTFT",
    "offload": "prefill with the offload to the host tier running against without",
    "gpu": "every GPU table, a process per section (correctness, TTFT to 128K, decode, ...)",
    "disk": "disk tier vs the device: read layouts, a hit across processes, opening a store",
    "results": "result files: resave full JSONs as summaries, plot a run again",
}


def usage(prog: str) -> str:
    lines = [f"usage: {prog} {{{'|'.join(COMMANDS)}}} [flags]   ({prog} NAME --help for flags)",
             ""]
    lines += [f"  {name:<9} {SUMMARY[name]}" for name in COMMANDS]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "python -m bench") -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(usage(prog))
        return 0
    if not args or args[0] not in COMMANDS:
        if args:
            print(f"error: unknown benchmark {args[0]!r}", file=sys.stderr)
        print(usage(prog), file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[args[0]])
    return int(module.main(args[1:]))
