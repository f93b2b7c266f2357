"""The words every package shares, as string-valued enums: a block's tier, a block event's
kind, a worker's role, a request's finish reason.

Each member is a ``str`` equal to its value (``Tier.HOST == "host"``), and formats and
serialises as that value (f-strings, JSON, protobuf fields, Prometheus labels), so the wire
formats are the plain strings they always were; a string read back from the wire becomes a
member with ``Tier(text)``. ``StrEnum`` is the standard library's on Python 3.11+ and the same
behaviour written out on 3.10.
"""

from __future__ import annotations

import sys
from enum import Enum

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10

    class StrEnum(str, Enum):
        """A ``str`` enum that prints and formats as its value (``enum.StrEnum`` of 3.11)."""

        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, spec: str) -> str:
            return str(self.value).__format__(spec)


class Tier(StrEnum):
    """Where a block is held, fastest first (the order placement and the index rank them)."""

    DEVICE = "device"  # the engine's paged pool (HBM on a GPU)
    HOST = "host"  # the store's pinned host slab
    DISK = "disk"  # the store's segment files indexed by LMDB


class EventKind(StrEnum):
    """What a block event says about its tier."""

    STORED = "stored"  # the tier now holds the blocks
    REMOVED = "removed"  # the tier no longer does


class Role(StrEnum):
    """A worker's role in the service."""

    PREFILL = "prefill"  # computes prompts and pushes their KV to a decode worker
    DECODE = "decode"  # generates the tokens after the first (and whole requests, colocated)


class FinishReason(StrEnum):
    """Why a request's generation ended (the last delta's ``finish_reason``)."""

    STOP = "stop"  # a stop token (or EOS) was generated
    LENGTH = "length"  # max_tokens reached (or the model's context is full)
    ABORT = "abort"  # the backend gave up on the request (worker lost, cancelled)
    ERROR = "error"  # the worker failed the request (its output stream says why)


__all__ = ["EventKind", "FinishReason", "Role", "StrEnum", "Tier"]
