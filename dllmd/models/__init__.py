"""Model side of a node: one adapter per architecture family, and the layer span a node loads and runs."""

from dllmd.models.families import SUPPORTED_FAMILIES, FamilyAdapter, UnsupportedFamily, adapter_for

_SPAN_NAMES = ("LayerSpan", "SpanCache", "SpanLoadError", "TensorSource", "span_tensor_names")

__all__ = ["SUPPORTED_FAMILIES", "FamilyAdapter", "UnsupportedFamily", "adapter_for", *_SPAN_NAMES]


def __getattr__(name: str):
    # Lazy: span.py pulls in transformers' cache and mask code (about a second), which callers that only
    # need adapter_for (the model importer, the CLI) should not pay for.
    if name in _SPAN_NAMES:
        from dllmd.models import span
        return getattr(span, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
