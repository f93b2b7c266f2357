"""Configuration of worker-to-worker KV transfer (one frozen dataclass, validated)."""

from __future__ import annotations

from dataclasses import dataclass

from kvtransfer import wire


@dataclass(frozen=True)
class TransferConfig:
    # Payload of one frame (whole blocks; at least one): big enough to spread gRPC's per-message
    # cost, small enough to pipeline a chunk's blocks.
    frame_bytes: int = wire.DEFAULT_FRAME_BYTES
    # The sender's shared-memory segment for receivers on the same host (0 turns it off); at
    # most half of what /dev/shm has free is taken.
    shm_bytes: int = 256 << 20
    # gRPC channels (TCP connections) per receiving worker; concurrent pushes take them in turn.
    num_channels: int = 1
    # A push stream's deadline (the receiver gives up waiting for it sooner: its own timeout).
    deadline_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.frame_bytes <= wire.MAX_BLOCK_BYTES:
            raise ValueError(f"frame_bytes must be in (0, {wire.MAX_BLOCK_BYTES}]")
        if self.shm_bytes < 0:
            raise ValueError("shm_bytes must be >= 0 (0 turns shared memory off)")
        if self.num_channels < 1:
            raise ValueError("num_channels must be >= 1")
        if self.deadline_s <= 0:
            raise ValueError("deadline_s must be positive")
