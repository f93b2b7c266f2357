"""Configuration of the tiered store (one frozen dataclass, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StoreConfig:
    host_capacity_bytes: int = 1 << 30  # pinned host slab; 0 turns the host tier off
    disk_path: str | None = None  # store directory (NVMe); None turns the disk tier off
    disk_capacity_bytes: int = 8 << 30  # bytes of blocks on disk; 0 turns the disk tier off
    disk_write_queue_blocks: int = 256  # bound of the write-behind queue (then writes are refused)
    disk_read_threads: int = 8  # disk reads in flight (kvstore.tiers.disk.reader)
    disk_read_chunk_bytes: int = 1 << 20  # bytes of one read (one block at least)
    # caps the disk tier's read speed (0 = off): a slow disk on purpose, for tests and benchmarks
    disk_read_limit_bytes_per_s: float = 0.0
    prefetch_threads: int = 2  # background workers moving disk -> host
    pin_host_memory: bool = True  # cudaHostRegister the slab when CUDA is present
    # when a block goes to disk (kvstore.write_policy): "evict" | "write_through" |
    # "second_hit" | "evict_or_second_hit"
    disk_write_policy: str = "evict"
    persist_on_close: bool = True  # close() writes host blocks the disk lacks (warm restarts)
    # fraction of host slots a background thread keeps free by evicting LRU blocks ahead of
    # writes, so a write rarely evicts (and copies the victim to disk) on the caller's thread
    host_headroom: float = 0.05

    def __post_init__(self) -> None:
        if self.host_capacity_bytes < 0:
            raise ValueError("host_capacity_bytes must be >= 0 (0 turns the host tier off)")
        if self.disk_capacity_bytes < 0:
            raise ValueError("disk_capacity_bytes must be >= 0 (0 turns the disk tier off)")
        if self.disk_write_queue_blocks <= 0:
            raise ValueError("disk_write_queue_blocks must be positive")
        if self.prefetch_threads <= 0:
            raise ValueError("prefetch_threads must be positive")
        if self.disk_read_threads <= 0 or self.disk_read_chunk_bytes <= 0:
            raise ValueError("disk_read_threads and disk_read_chunk_bytes must be positive")
        if self.disk_read_limit_bytes_per_s < 0:
            raise ValueError("disk_read_limit_bytes_per_s must be >= 0 (0 = no limit)")
        if not 0.0 <= self.host_headroom < 0.5:
            raise ValueError(f"host_headroom must be in [0, 0.5), got {self.host_headroom}")
        from kvstore.write_policy import POLICIES

        if self.disk_write_policy not in POLICIES:
            raise ValueError(
                f"disk_write_policy must be one of {', '.join(POLICIES)}, "
                f"not {self.disk_write_policy!r}"
            )

    @property
    def disk_enabled(self) -> bool:
        return bool(self.disk_path) and self.disk_capacity_bytes > 0

    @property
    def host_enabled(self) -> bool:
        return self.host_capacity_bytes > 0
