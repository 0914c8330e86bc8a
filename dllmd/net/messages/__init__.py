"""The protocol's operations, each declared once (:class:`~dllmd.net.schema.Op`: name, arguments,
reply) for both the daemon that serves it and the client that calls it, one module per subsystem:
``node`` (ping, info, keys), ``models`` (receiving files, loading spans), ``inference`` (sessions),
``data`` (dataset shards), ``transfer`` (files sent in chunks, for models and data alike),
``training`` (workers, the coordinator's jobs and checkpoints) and ``ringbench`` (the ring
benchmark, registered only where asked for)."""
