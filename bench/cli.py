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
    "offload": "bench.offload",
    "gpu": "bench.gpu",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        print(f"usage: python -m bench {{{'|'.join(COMMANDS)}}} [flags]  (--help per command)",
              file=sys.stderr if args and args[0] not in ("-h", "--help") else sys.stdout)
        return 0 if args and args[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[args[0]])
    return int(module.main(args[1:]))
