"""The installed ``strata`` command: ``strata bench ...`` runs a benchmark (``bench.cli``);
every other subcommand is the service's (``cluster.cli``). Both sit below this package, so
neither imports the other."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    lead = [a for a in args if a in ("-v", "--verbose", "--debug")]
    rest = args[len(lead):] if args[: len(lead)] == lead else args
    if rest and rest[0] == "bench":  # every flag after it is the benchmark's (--help too)
        from bench.cli import main as bench_main

        return bench_main(rest[1:], prog="strata bench")
    from cluster.cli import main as cluster_main

    return cluster_main(args)


if __name__ == "__main__":
    sys.exit(main())
