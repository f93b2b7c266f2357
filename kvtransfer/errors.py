"""The failure of a worker-to-worker KV transfer."""

from __future__ import annotations

from proto.errors import StrataError


class TransferError(StrataError):
    """A worker-to-worker KV transfer failed; ``code`` is the gRPC status name (e.g. "UNAVAILABLE",
    "DEADLINE_EXCEEDED", "UNAUTHENTICATED") or "" when the failure was not a gRPC status."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code
