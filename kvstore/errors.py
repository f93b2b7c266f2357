"""Errors of Strata: one root, one subclass per kind of I/O, transfer or remote failure.

Bad configuration or user input raises ``ValueError``; a broken invariant is an ``assert``.
"""

from __future__ import annotations


class StrataError(Exception):
    """Root of every I/O, transfer and remote failure raised by Strata."""


class StoreError(StrataError):
    """A tier of the KV store failed (I/O on the host slab or the disk environment)."""


class DiskUnavailableError(StoreError):
    """The disk tier cannot be opened or created (unwritable path, I/O error)."""


class DiskFormatError(StoreError):
    """``disk_path`` holds something that is not a Strata disk store (e.g. a regular file)."""


class TransferError(StrataError):
    """A worker-to-worker KV transfer failed; ``code`` is the gRPC status name (e.g. "UNAVAILABLE",
    "DEADLINE_EXCEEDED", "UNAUTHENTICATED") or "" when the failure was not a gRPC status."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code
