"""Training data onto the nodes: ``shard-data`` (``sharding``), the all-or-nothing push (``push``)
and this client's dataset records (``records``)."""
