"""The router: client-facing gRPC service, request validation, placement and the Python client.

- ``servicer.py``: ``GenerationServicer`` over a ``Backend`` protocol; all gRPC status codes.
- ``server.py``: ``serve()`` -> (server, port), with health and reflection registered.
- ``validation.py``, ``types.py``, ``config.py``, ``errors.py``, ``auth.py``, ``detokenize.py``.
- ``index.py`` (``GlobalBlockIndex``, one index over all workers; its rows in
  ``block_rows.py``), ``residency.py`` (the walk over a prompt's blocks that groups the
  holders), ``placement.py`` (``CostModel``) and ``profile.py`` (``WorkerProfile``): pure
  Python. ``index_ref.py``: the plain per-worker index and placement loop they are tested
  against (and benchmarked beside).
- ``client.py``: ``StrataClient``. ``metrics.py``: Prometheus metrics in a private registry.
- ``http_api.py`` + ``openai_api.py``: the OpenAI-compatible HTTP front door.

Imports ``proto``, ``kvstore`` (keys, errors) and ``textproc`` (tokenizers, chat templates)
only: never torch or the engine.
"""
