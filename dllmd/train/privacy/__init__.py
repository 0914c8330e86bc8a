"""Differential privacy for training: how much a job has spent (``accountant``), the settings a job
may run with (``settings``), the seeded Gaussian noise every replica draws alike (``noise``), and
DP-SGD's per-example clipping and private update (``clipping``, ``dpsgd``).

Importing this package, ``settings`` or ``accountant`` imports neither torch nor Opacus: the client
checks a job's settings before it submits, and ``dllmctl --help`` stays light."""
