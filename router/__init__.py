"""The router: client-facing gRPC service, request validation, placement and the Python client.

- ``event_loop.py``: ``RouterLoop``, the one asyncio loop the whole request path runs on.
- ``servicer.py``: ``GenerationServicer`` over a ``Backend`` protocol; all gRPC status codes.
- ``server.py``: ``serve()`` -> (server, port) (``grpc.aio``), with health and reflection.
- ``backend.py``: ``RayBackend``, the cluster as the router sees it; ``request_run.py``:
  ``RequestRun``, one request's placement, prefill, decode, retries and migrations;
  ``membership.py``: which workers are placed on; ``liveness.py``: the health watch that tells
  at once that a worker's process died; ``outputs.py``: the decode workers' output streams.
- ``validation.py``, ``types.py``, ``config.py``, ``errors.py``, ``auth.py``, ``detokenize.py``.
- ``index.py`` (``GlobalBlockIndex``, one index over all workers; its rows in
  ``block_rows.py``), ``residency.py`` (the walk over a prompt's blocks that groups the
  holders), ``placement.py`` (``CostModel``) and ``profile.py`` (``WorkerProfile``): pure
  Python. The plain per-worker index and placement loop they are tested against (and
  benchmarked beside) is ``bench.router_ref``.
- ``client.py``: ``StrataClient``; ``aio_client.py``: ``AsyncStrataClient``. ``metrics.py``:
  Prometheus metrics in a private registry.
- ``http_api.py`` + ``openai_api.py``: the OpenAI-compatible HTTP front door.

Imports ``proto``, ``kvstore`` (keys, errors) and ``textproc`` (tokenizers, chat templates)
only: never torch or the engine.
"""
