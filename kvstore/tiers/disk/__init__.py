"""The disk tier: segment files indexed by LMDB (``tier.DiskTier``; the parts in ``tier``'s
docstring)."""

from kvstore.tiers.disk.tier import DiskTier

__all__ = ["DiskTier"]
