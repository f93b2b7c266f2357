"""Failures a router backend reports; the servicer maps each to one gRPC status code."""

from __future__ import annotations

from proto.errors import StrataError


class NoWorkerError(StrataError):
    """No prefill or decode worker can take the request now (-> UNAVAILABLE)."""


class OverloadedError(StrataError):
    """The backend's queues are full (-> RESOURCE_EXHAUSTED)."""


class RequestTimeoutError(StrataError):
    """The request's deadline passed inside the backend (-> DEADLINE_EXCEEDED)."""


class RemoteError(StrataError):
    """A call to the Strata service failed (client side); ``code`` is the gRPC status name."""

    def __init__(self, message: str, code: str = "", details: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = details
