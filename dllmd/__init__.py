"""dllmd: the daemon every contributing machine runs."""

import logging as _logging

__version__ = "0.1.0"

# transformers imports torchao whenever it is installed (we use it for quantized spans), and torchao
# then logs a warning for each optional CUDA extension a CPU build lacks, and torch one for each of
# its enums: noise on every command and in every daemon log that says nothing to the user.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
