"""``strata.Client``: ``router.client.StrataClient`` with its address and token taken from the
environment when not given (``STRATA_SERVER``, default 127.0.0.1:50051; ``STRATA_TOKEN``)."""

from __future__ import annotations

import os

from router.client import DEFAULT_MAX_MESSAGE_BYTES, GenerationResult, StrataClient, StreamChunk
from router.errors import RemoteError
from router.types import Usage

DEFAULT_SERVER = "127.0.0.1:50051"


class Client(StrataClient):
    """A client of a running Strata service (gRPC). Use it as a context manager, or call
    ``close()``."""

    def __init__(
        self,
        address: str | None = None,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        address = address or os.environ.get("STRATA_SERVER") or DEFAULT_SERVER
        token = token if token is not None else (os.environ.get("STRATA_TOKEN") or None)
        super().__init__(address, token=token, max_message_bytes=max_message_bytes)


__all__ = ["Client", "GenerationResult", "RemoteError", "StreamChunk", "Usage"]
