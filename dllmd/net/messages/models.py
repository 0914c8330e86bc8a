"""A node's copy of a model and the spans it loads: ``model.offer`` / ``model.put`` (a signed manifest,
then the files it lists, in chunks), ``model.remove``, ``span.load`` / ``span.unload``. Admin only."""

from __future__ import annotations

from dataclasses import dataclass

from dllmd.net.messages.node import ServedSpan
from dllmd.net.messages.tensor import TensorSlice
from dllmd.net.messages.transfer import PutArgs, PutReply
from dllmd.net.schema import Op, bounded


@dataclass
class OfferArgs:
    model: str = bounded(max_len=128)
    manifest: bytes = bounded(max_len=4 * 1024 * 1024)
    signature: bytes = bounded(max_len=64)


@dataclass
class Offer:
    """What the node already holds of the offered model, so the sender skips or resumes."""

    have: dict[str, str]  # file -> sha256 of the complete files
    partial: dict[str, int]  # file -> bytes received of the incomplete ones


@dataclass
class LoadArgs:
    model: str = bounded(max_len=128)
    start: int = bounded(lo=0, hi=100_000)
    end: int = bounded(lo=0, hi=100_000)
    embed: bool = False
    head: bool = False
    dtype: str = bounded("", max_len=16)  # "": the dtype the model was imported in
    tensor_slice: TensorSlice | None = None  # None: the whole of every layer in the span


@dataclass
class Loaded:
    """The span a node loaded, where it runs and the node's memory after loading it."""

    span: ServedSpan
    device: str
    rss_bytes: int


@dataclass
class ModelArgs:
    model: str = bounded(max_len=128)


@dataclass
class Unloaded:
    unloaded: bool


@dataclass
class Removed:
    removed: bool


MODEL_OFFER = Op("model.offer", OfferArgs, Offer)
MODEL_PUT = Op("model.put", PutArgs, PutReply)
MODEL_REMOVE = Op("model.remove", ModelArgs, Removed)
SPAN_LOAD = Op("span.load", LoadArgs, Loaded)
SPAN_UNLOAD = Op("span.unload", ModelArgs, Unloaded)
