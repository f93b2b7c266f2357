"""Tiers of the KV store below HBM: ``host`` (one slab in RAM) and ``disk`` (LMDB)."""

from kvstore.tiers.base import StoreTier
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.host import HostTier

__all__ = ["DiskTier", "HostTier", "StoreTier"]
