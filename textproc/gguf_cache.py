"""The converted-checkpoint cache of GGUF files.

A GGUF file is converted once into a Hugging Face style directory (``config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``) under
``$STRATA_CACHE/gguf/<stem>-<identity>/`` (``~/.cache/strata`` by default); later starts load
that directory instead of parsing and dequantizing the GGUF again.

The identity is a hash of the file's size and of its contents at fixed places: the first and
last 16 MiB (header, metadata, tensor table, first and last tensors) and 32 slices of 64 KiB
spread over the rest, so a copy of the same file hits and a different file does not. Every file
is written under a temporary name and renamed into place, so processes converting the same
GGUF at once (the router reads the tokenizer while the workers convert the weights) never see
half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any

logger = logging.getLogger(__name__)

_EDGE = 16 << 20
_SLICES = 32
_SLICE = 64 << 10
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def cache_root() -> str:
    return os.environ.get("STRATA_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "strata"
    )


def gguf_identity(path: str) -> str:
    """32 hex digits naming the file's contents (see the module docstring)."""
    size = os.path.getsize(path)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"gguf-identity-v1:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        if size > 2 * _EDGE:
            step = (size - 2 * _EDGE) // (_SLICES + 1)
            for i in range(1, _SLICES + 1):
                f.seek(_EDGE + i * step)
                h.update(f.read(_SLICE))
        if size > _EDGE:
            f.seek(max(_EDGE, size - _EDGE))
            h.update(f.read())
    return h.hexdigest()


def cache_dir(path: str, identity: str | None = None) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(cache_root(), "gguf", f"{stem}-{(identity or gguf_identity(path))[:20]}")


def write_atomic(dest: str, data: bytes) -> None:
    """Write ``data`` to ``dest`` through a temporary file in the same directory."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(dest: str, obj: Any) -> None:  # any JSON value
    write_atomic(dest, json.dumps(obj, indent=1, ensure_ascii=False).encode("utf-8"))


def gguf_tokenizer_dir(path: str, reader: Any = None) -> str:  # GGUFReader
    """The cache directory of ``path`` holding its tokenizer files, converted now if missing
    (from ``reader`` when the caller has the file open already)."""
    out = cache_dir(path)
    if all(os.path.exists(os.path.join(out, name)) for name in TOKENIZER_FILES):
        return out
    from textproc.gguf_models import open_gguf
    from textproc.gguf_tokenizer import tokenizer_files

    logger.info("converting the tokenizer of %s into %s", path, out)
    tok_json, tok_cfg = tokenizer_files(reader if reader is not None else open_gguf(path), path)
    write_atomic(os.path.join(out, "tokenizer.json"), tok_json.encode("utf-8"))
    write_json(os.path.join(out, "tokenizer_config.json"), tok_cfg)
    return out
