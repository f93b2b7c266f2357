"""What the prefill and the decode worker share: ``base.WorkerBase`` (an engine on its loop
thread, the worker's gRPC server with its KV receiver and health service, its info, stats and
block events) and ``base.WorkerActorBase`` (the thin Ray actor shell over it).

Its own package because no existing one is the room: the two worker packages never import each
other, ``engine`` is the model and its runner (it serves nothing), and ``kvtransfer`` sits below
the engine. Both workers import this package; it imports ``engine``, ``kvtransfer``, ``kvstore``
and ``proto``, never a worker.
"""
