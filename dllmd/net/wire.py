"""The wire format: one msgpack header frame, then one raw frame per tensor.

Request header::

    {"v": PROTOCOL_VERSION, "id": int, "op": str, "args": {...}, "tensors": [{"dtype", "shape"}, ...]}

A request may carry ``"oneway": true``: the node sends no reply (hidden states pushed from stage to
stage; failures are reported on the session's stream instead).

Reply header::

    {"v": PROTOCOL_VERSION, "id": int, "result": {...}, "tensors": [...]}       success
    {"v": PROTOCOL_VERSION, "id": int, "error": {"code": str, "message": str}}  failure

A reply with ``"more": true`` is one item of a stream: more replies with the same id follow, and
the last one has no ``more`` (generated tokens flow back to the client this way).

Tensor bytes travel as their own frames so large activations are never copied into msgpack. A
small tensor (up to ``INLINE_MAX`` bytes per message in all, e.g. one decode step's hidden state) rides inside its
descriptor as ``"data"`` instead: every extra frame costs a measurable share of a loopback round
trip, while copying 2 KiB costs nothing. bf16
has no numpy dtype, so every tensor is rebuilt from raw bytes with ``torch.frombuffer``. Decoding
checks everything a peer could lie about (types, sizes, declared shapes against actual bytes)
before anything is allocated. torch is imported only when a message carries tensors: a client
that lists nodes or jobs never pays for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import msgpack

if TYPE_CHECKING:
    import torch

PROTOCOL_VERSION = 1
MAX_TENSORS = 64
MAX_NDIM = 8
MAX_OP_LEN = 64
INLINE_MAX = 16 * 1024

# What a tensor may be on the wire, by name (torch's own names), with its bytes per element.
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "int32": 4, "int64": 8}
DTYPES = tuple(ITEMSIZE)


class ErrorCode:
    """Codes a reply's ``error.code`` takes. Clients branch on these, never on messages."""

    BAD_MESSAGE = "bad_message"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_OP = "unknown_op"
    BAD_ARGS = "bad_args"
    FORBIDDEN = "forbidden"
    TOO_LARGE = "too_large"
    BUSY = "busy"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    # Inference: conditions a client fails over on (another replica may serve the session).
    SESSION_EXPIRED = "expired"  # the stage dropped the session after its TTL without use
    NEXT_HOP_UNREACHABLE = "next_hop_unreachable"  # this stage is fine; the next one did not take the push
    # The session's KV cache does not fit what this node may still reserve, or (span.load) the span's
    # weights do not fit the cap its owner set in node.toml.
    NO_MEMORY = "no_memory"
    # A write that does not fit the node's disk (a shard, a span's files, a checkpoint): nothing of it
    # was kept and what was there before is intact.
    NO_SPACE = "no_space"


class WireError(Exception):
    """A message that must be answered with a structured error instead of being processed."""

    def __init__(self, code: str, message: str, request_id: int = 0):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass
class Request:
    id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)
    tensors: list["torch.Tensor"] = field(default_factory=list)
    oneway: bool = False


@dataclass
class Reply:
    id: int
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    tensors: list["torch.Tensor"] = field(default_factory=list)
    more: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts. ZeroMQ's MAXMSGSIZE caps each frame before we see it; these caps
    apply to what is inside."""

    max_header_bytes: int = 64 * 1024
    max_tensor_bytes: int = 256 * 1024 * 1024


# --- encoding ------------------------------------------------------------------------------------


def _tensor_frames(tensors: Sequence["torch.Tensor"]) -> tuple[list[dict], list[memoryview]]:
    descs, frames = [], []
    if not tensors:
        return descs, frames
    import torch

    inline_budget = INLINE_MAX  # cumulative, so headers stay far below the receiver's header limit
    for t in tensors:
        name = str(t.dtype).removeprefix("torch.")
        if name not in ITEMSIZE:
            raise ValueError(f"dtype {t.dtype} cannot travel on the wire; use one of {sorted(DTYPES)}")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        desc = {"dtype": name, "shape": list(t.shape)}
        # Reinterpret as bytes: works for bf16 too (numpy has no bf16) and keeps zero-copy.
        raw = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        if raw.nbytes <= inline_budget:
            inline_budget -= raw.nbytes
            desc["data"] = raw.tobytes()
        else:
            frames.append(raw)
        descs.append(desc)
    return descs, frames


def encode_request(req: Request) -> list:
    descs, frames = _tensor_frames(req.tensors)
    header = {"v": PROTOCOL_VERSION, "id": req.id, "op": req.op, "args": req.args, "tensors": descs}
    if req.oneway:
        header["oneway"] = True
    return [msgpack.packb(header, use_bin_type=True), *frames]


def encode_reply(reply: Reply) -> list:
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": reply.id}
    if reply.error is not None:
        header["error"] = reply.error
        return [msgpack.packb(header, use_bin_type=True)]
    descs, frames = _tensor_frames(reply.tensors)
    header["result"] = reply.result if reply.result is not None else {}
    header["tensors"] = descs
    if reply.more:
        header["more"] = True
    return [msgpack.packb(header, use_bin_type=True), *frames]


def error_reply(request_id: int, code: str, message: str) -> Reply:
    return Reply(id=request_id, error={"code": code, "message": message})


# --- decoding ------------------------------------------------------------------------------------


def _buffer(frame: Any) -> memoryview:
    """Frames arrive as bytes or zmq.Frame (zero-copy); both expose a buffer."""
    buf = getattr(frame, "buffer", None)
    return buf if buf is not None else memoryview(frame)


def _leading_id(buf: memoryview) -> int | None:
    """The request id of an over-long header, read from its first bytes only (encoders put ``v`` and
    ``id`` first), so the refusal reaches the waiting caller instead of leaving it to time out."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64)
    unpacker.feed(bytes(buf[:64]))
    try:
        for _ in range(min(unpacker.read_map_header(), 2)):
            key, value = unpacker.unpack(), unpacker.unpack()
            if key == "id" and type(value) is int and 0 <= value < 2**63:
                return value
    except Exception:  # truncated or not a map: there is no id to answer to
        pass
    return None


def _unpack_header(frame: Any, limits: Limits) -> dict:
    buf = _buffer(frame)
    if len(buf) > limits.max_header_bytes:
        raise WireError(ErrorCode.TOO_LARGE, f"header is {len(buf)} bytes; the limit is {limits.max_header_bytes} "
                        "(send bulk data as tensor frames)", _leading_id(buf) or 0)
    try:
        header = msgpack.unpackb(buf, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for malformed input
        raise WireError(ErrorCode.BAD_MESSAGE, f"header is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise WireError(ErrorCode.BAD_MESSAGE, f"header must be a map, got {type(header).__name__}")
    request_id = header.get("id")
    if not isinstance(request_id, int) or isinstance(request_id, bool) or not 0 <= request_id < 2**63:
        raise WireError(ErrorCode.BAD_MESSAGE, "header 'id' must be an integer in [0, 2^63)")
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise WireError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version!r} is not supported; this node speaks {PROTOCOL_VERSION}",
            request_id,
        )
    return header


def _torch():
    """torch, imported on the first message that carries a tensor."""
    import torch

    return torch


def _decode_tensors(header: dict, frames: Sequence[Any], limits: Limits, request_id: int) -> list["torch.Tensor"]:
    descs = header.get("tensors", [])
    if not isinstance(descs, list):
        raise WireError(ErrorCode.BAD_MESSAGE, "'tensors' must be a list", request_id)
    if len(descs) > MAX_TENSORS:
        raise WireError(ErrorCode.TOO_LARGE, f"{len(descs)} tensors; at most {MAX_TENSORS} per message", request_id)
    if not all(isinstance(d, dict) and set(d) in ({"dtype", "shape"}, {"dtype", "shape", "data"}) for d in descs):
        raise WireError(ErrorCode.BAD_MESSAGE, "each tensor descriptor must be {dtype, shape[, data]}", request_id)
    framed = sum("data" not in d for d in descs)
    if framed != len(frames):
        raise WireError(
            ErrorCode.BAD_MESSAGE, f"header declares {framed} framed tensors but {len(frames)} frames follow", request_id
        )
    frame_iter = iter(frames)
    tensors = []
    total = 0
    for i, desc in enumerate(descs):
        if not isinstance(desc["dtype"], str) or desc["dtype"] not in ITEMSIZE:
            raise WireError(
                ErrorCode.BAD_MESSAGE, f"tensor {i}: dtype {desc['dtype']!r} is not one of {sorted(DTYPES)}", request_id
            )
        shape = desc["shape"]
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)
        ):
            raise WireError(
                ErrorCode.BAD_MESSAGE, f"tensor {i}: shape must be a list of <= {MAX_NDIM} non-negative ints", request_id
            )
        declared = math.prod(shape) * ITEMSIZE[desc["dtype"]]
        total += declared
        if declared > limits.max_tensor_bytes or total > limits.max_tensor_bytes:
            raise WireError(
                ErrorCode.TOO_LARGE, f"tensor {i}: {declared} bytes exceed the limit of {limits.max_tensor_bytes}", request_id
            )
        if "data" in desc:
            if not isinstance(desc["data"], bytes):
                raise WireError(ErrorCode.BAD_MESSAGE, f"tensor {i}: inline data must be binary", request_id)
            buf = memoryview(desc["data"])
        else:
            buf = _buffer(next(frame_iter))
        if len(buf) != declared:
            raise WireError(
                ErrorCode.BAD_MESSAGE,
                f"tensor {i}: shape {shape} of {desc['dtype']} is {declared} bytes but the frame has {len(buf)}",
                request_id,
            )
        dtype = getattr(_torch(), desc["dtype"])
        if declared == 0:
            tensors.append(_torch().empty(shape, dtype=dtype))
            continue
        # zmq frames are read-only; a bytearray copy keeps torch from aliasing memory it may not write.
        data = buf if not buf.readonly else bytearray(buf)
        tensors.append(_torch().frombuffer(data, dtype=_torch().uint8).view(dtype).reshape(shape))
    return tensors


def decode_request(frames: Sequence[Any], limits: Limits = Limits()) -> Request:
    """Parse and validate a request; raises WireError (with the request id when it was readable)."""
    if not frames:
        raise WireError(ErrorCode.BAD_MESSAGE, "empty message")
    header = _unpack_header(frames[0], limits)
    request_id = header["id"]
    extra = set(header) - {"v", "id", "op", "args", "tensors", "oneway"}
    if extra:
        raise WireError(ErrorCode.BAD_MESSAGE, f"unknown header field(s): {sorted(map(str, extra))}", request_id)
    op = header.get("op")
    if not isinstance(op, str) or not 0 < len(op) <= MAX_OP_LEN:
        raise WireError(ErrorCode.BAD_MESSAGE, f"'op' must be a string of 1-{MAX_OP_LEN} characters", request_id)
    args = header.get("args", {})
    if not isinstance(args, dict):
        raise WireError(ErrorCode.BAD_MESSAGE, "'args' must be a map", request_id)
    oneway = header.get("oneway", False)
    if not isinstance(oneway, bool):
        raise WireError(ErrorCode.BAD_MESSAGE, "'oneway' must be a boolean", request_id)
    tensors = _decode_tensors(header, frames[1:], limits, request_id)
    return Request(id=request_id, op=op, args=args, tensors=tensors, oneway=oneway)


def decode_reply(frames: Sequence[Any], limits: Limits = Limits()) -> Reply:
    """Parse and validate a reply (clients trust nodes no more than nodes trust clients)."""
    if not frames:
        raise WireError(ErrorCode.BAD_MESSAGE, "empty reply")
    header = _unpack_header(frames[0], limits)
    request_id = header["id"]
    error = header.get("error")
    if error is not None:
        if not isinstance(error, dict) or not isinstance(error.get("code"), str) or not isinstance(error.get("message"), str):
            raise WireError(ErrorCode.BAD_MESSAGE, "reply 'error' must be {code: str, message: str}", request_id)
        return Reply(id=request_id, error={"code": error["code"], "message": error["message"]})
    result = header.get("result", {})
    if not isinstance(result, dict):
        raise WireError(ErrorCode.BAD_MESSAGE, "reply 'result' must be a map", request_id)
    more = header.get("more", False)
    if not isinstance(more, bool):
        raise WireError(ErrorCode.BAD_MESSAGE, "reply 'more' must be a boolean", request_id)
    tensors = _decode_tensors(header, frames[1:], limits, request_id)
    return Reply(id=request_id, result=result, tensors=tensors, more=more)
