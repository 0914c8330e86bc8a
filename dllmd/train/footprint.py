"""What a training step holds per token, estimated from a model's config before anything is loaded:
what the client's planner and a node's admission check compare with free memory. Torch-free, so
the planner stays pure. ``dllmctl bench train`` measures the real figures (:mod:`dllmd.train.memory`).
"""

from __future__ import annotations

from collections.abc import Mapping

LOGITS_BYTES_PER_VOCAB = 8  # the head's fp32 logits per token, and their gradient


def layer_activation_bytes(config: Mapping) -> int:
    """What one decoder layer saves for its backward per token, in fp32: the residual stream at its
    norms, projections, rotary products and attention output (about 8 x hidden), keys and values
    (2 x their width) and the MLP's four intermediate tensors (gate, up, the activation, the
    product). SDPA saves no attention matrix. SmolLM2-135M: 44,544 bytes; autograd's saved tensors
    counted on a real layer (:class:`SavedActivations`): 44,588."""
    hidden = int(config.get("hidden_size") or 0)
    heads = int(config.get("num_attention_heads") or 1)
    kv = hidden // heads * int(config.get("num_key_value_heads") or heads)
    intermediate = int(config.get("intermediate_size") or 4 * hidden)
    return 4 * (8 * hidden + 2 * kv + 4 * intermediate)
