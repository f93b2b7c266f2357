"""Strata's public Python API.

    from strata import Client

    with Client("127.0.0.1:50051") as client:  # or Client(): $STRATA_SERVER, $STRATA_TOKEN
        result = client.generate(prompt="Hello", max_tokens=16, temperature=0)
        print(result.text, result.usage.cached_tokens_by_tier, result.ttft_ms_client)
        for chunk in client.stream(messages=[{"role": "user", "content": "Hi"}], max_tokens=16):
            print(chunk.text, end="")

A failed call raises ``RemoteError`` (its gRPC status name in ``.code``); a value out of range
raises ``ValueError`` naming the field before anything is sent. This package is a thin layer
over ``router.client``; the service itself is started with the ``strata`` command.
"""

from __future__ import annotations

from strata.client import Client, GenerationResult, RemoteError, StreamChunk, Usage

__all__ = ["Client", "GenerationResult", "RemoteError", "StreamChunk", "Usage"]
