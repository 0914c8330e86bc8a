"""Where things go, as pure functions (no I/O): layouts of layer spans over nodes (``layout``,
``planner``), moving as few layers as possible when nodes come and go (``rebalance``), what the
live nodes can offer (``capacity``), how many nodes hold each layer (``coverage``) and which chain
of stages a session runs through (``routing``)."""
