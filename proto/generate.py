"""Regenerate the Python stubs of ``strata.proto``.

Usage: ``python proto/generate.py`` (from the repository root, with grpcio-tools installed).
Writes ``strata_pb2.py``, ``strata_pb2.pyi`` and ``strata_pb2_grpc.py`` next to the .proto and
rewrites protoc's absolute ``import strata_pb2`` into a package-relative import, so the stubs
load as ``proto.strata_pb2`` from anywhere. tests/proto/test_stubs.py regenerates into a temp
directory and fails when the committed files differ.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_NAME = "strata.proto"
GENERATED = ("strata_pb2.py", "strata_pb2.pyi", "strata_pb2_grpc.py")
_ABS_IMPORT = re.compile(r"^import strata_pb2 as (\w+)$", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on strata.proto into ``out_dir``; return the generated files."""
    from grpc_tools import protoc  # only needed to regenerate, not at run time

    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_DIR / PROTO_NAME),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args)}")
    grpc_file = out_dir / "strata_pb2_grpc.py"
    text = grpc_file.read_text()
    fixed, n = _ABS_IMPORT.subn(r"from proto import strata_pb2 as \1", text)
    assert n == 1, f"expected one 'import strata_pb2' line in {grpc_file}, found {n}"
    grpc_file.write_text(fixed)
    return [out_dir / name for name in GENERATED]


def main() -> int:
    for path in generate(PROTO_DIR):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
