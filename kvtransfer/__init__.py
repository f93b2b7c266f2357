"""Worker-to-worker KV block transfer: one package that prefill and decode workers both use.

- ``wire``: frame format and gRPC conventions (secret metadata, method names, sizes);
- ``shm``: the same-host path (a sender's shared-memory segment of slots, mapped by receivers);
- ``session``: one request's push stream, open while its prefill runs;
- ``sender``: ``KVSender`` (push sessions, pulls, queries; channels per address);
- ``receiver``: the server side over a ``BlockSink`` (the worker's engine adapter).

It knows bytes and block hashes, never tensors or models: it imports ``kvstore`` and ``proto``
only, and nothing imports a worker package.
"""
