"""Bearer-token check of the client API (``authorization: Bearer <token>`` metadata).

The decision lives here; the interceptor that turns a refusal into UNAUTHENTICATED lives with
the other status-code choices in router/servicer.py.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

AUTH_METADATA_KEY = "authorization"
# Methods every caller may use without a token (load balancer and Kubernetes probes, grpcurl).
OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Client-side metadata carrying ``token`` (empty when there is none)."""
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),) if token else ()


def is_open_method(method: str) -> bool:
    return method.startswith(OPEN_METHOD_PREFIXES)


def check_bearer(metadata: Iterable[tuple[str, str | bytes]] | None, token: str) -> bool:
    """True when ``metadata`` carries ``authorization: Bearer <token>`` (constant-time compare)."""
    for key, value in metadata or ():
        if key.lower() != AUTH_METADATA_KEY or not isinstance(value, str):
            continue
        scheme, _, given = value.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            return True
    return False
