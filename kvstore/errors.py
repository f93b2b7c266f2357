"""Failures of the KV store's tiers (subclasses of ``proto.errors.StrataError``).

Bad configuration or user input raises ``ValueError``; a broken invariant is an ``assert``.
"""

from __future__ import annotations

from proto.errors import StrataError


class StoreError(StrataError):
    """A tier of the KV store failed (I/O on the host slab or the disk environment)."""


class DiskUnavailableError(StoreError):
    """The disk tier cannot be opened or created (unwritable path, I/O error)."""


class DiskFormatError(StoreError):
    """``disk_path`` holds something that is not a Strata disk store (e.g. a regular file)."""
