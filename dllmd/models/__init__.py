"""Model side of a node: one adapter per architecture family, and the layer span a node loads and runs."""

import importlib

# Resolved on first use: families and spans pull in torch and transformers (seconds), which callers
# that only read manifests (the model store, the CLI) should not pay for.
_HOME = {
    **dict.fromkeys(("SUPPORTED_FAMILIES", "FamilyAdapter", "UnsupportedFamily", "adapter_for"), "families"),
    **dict.fromkeys(("LayerSpan", "SpanLoadError", "TensorSource", "span_tensor_names"), "span"),
    "SpanCache": "cache",
}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"dllmd.models.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
