"""The wire format and payload schemas, without sockets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dllmd.net.schema import bounded, parse_args
from dllmd.net.wire import (
    DTYPES,
    INLINE_MAX,
    Limits,
    Reply,
    Request,
    WireError,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)


def _bytes(frames):
    return [bytes(memoryview(f)) for f in frames]


@pytest.mark.parametrize("dtype", [getattr(torch, name) for name in DTYPES])
@pytest.mark.parametrize("shape", [(), (0,), (1, 1, 576), (3, 7), (INLINE_MAX,)])
def test_tensors_round_trip_exactly(dtype, shape):
    tensor = (torch.randn(shape) * 100).to(dtype)
    frames = _bytes(encode_request(Request(id=3, op="echo", args={"a": 1}, tensors=[tensor, tensor.flatten()])))
    decoded = decode_request(frames)
    assert decoded.id == 3 and decoded.op == "echo" and decoded.args == {"a": 1}
    assert decoded.tensors[0].dtype == dtype and decoded.tensors[0].shape == tensor.shape
    assert torch.equal(decoded.tensors[0], tensor) and torch.equal(decoded.tensors[1], tensor.flatten())


def test_small_tensors_ride_inline_and_large_ones_get_frames():
    small, large = torch.zeros(1, 1, 576), torch.zeros(INLINE_MAX)  # 2 KiB and 64 KiB
    frames = encode_request(Request(id=1, op="x", tensors=[small, large]))
    assert len(frames) == 2  # header (with the small tensor inside) + one frame for the large one
    reply = decode_reply(_bytes(encode_reply(Reply(id=1, result={"k": "v"}, tensors=[small, large]))))
    assert reply.ok and reply.result == {"k": "v"} and torch.equal(reply.tensors[1], large)


def test_non_contiguous_and_sliced_tensors_travel_as_values():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    view = base[:, 1:4].t()
    assert torch.equal(decode_request(_bytes(encode_request(Request(id=1, op="x", tensors=[view])))).tensors[0], view)


def test_unsupported_dtype_is_refused_at_the_sender():
    with pytest.raises(ValueError, match="cannot travel"):
        encode_request(Request(id=1, op="x", tensors=[torch.zeros(2, dtype=torch.complex64)]))


def test_limits_are_enforced_before_allocation():
    limits = Limits(max_header_bytes=1024, max_tensor_bytes=1000)
    big = encode_request(Request(id=1, op="x", tensors=[torch.zeros(16384)]))
    with pytest.raises(WireError) as exc:
        decode_request(_bytes(big), limits)
    assert exc.value.code == "too_large" and exc.value.request_id == 1
    with pytest.raises(WireError) as exc:
        decode_request([b"\x80" * 2000], limits)
    assert exc.value.code == "too_large"


def test_error_reply_round_trip():
    reply = decode_reply(_bytes(encode_reply(Reply(id=5, error={"code": "busy", "message": "later"}))))
    assert not reply.ok and reply.error == {"code": "busy", "message": "later"} and reply.id == 5


@given(st.binary(max_size=512))
@settings(max_examples=300)
def test_garbage_never_escapes_as_anything_but_wire_error(blob):
    for decode in (decode_request, decode_reply):
        try:
            decode([blob])
        except WireError as exc:
            assert exc.code in {"bad_message", "unsupported_version", "too_large"}


@dataclass
class Inner:
    n: int = bounded(0, lo=0, hi=10)


@dataclass
class Payload:
    name: str = bounded(max_len=8)
    count: int = bounded(1, lo=1, hi=100)
    ratio: float = 0.5
    flag: bool = False
    ids: list[int] = field(default_factory=list)
    note: Optional[str] = None
    inner: Inner = field(default_factory=Inner)


def test_schema_accepts_well_typed_payloads():
    parsed = parse_args(Payload, {"name": "abc", "count": 3, "ratio": 1, "ids": [1, 2], "note": None, "inner": {"n": 4}})
    assert parsed == Payload(name="abc", count=3, ratio=1.0, ids=[1, 2], note=None, inner=Inner(4))
    assert isinstance(parsed.ratio, float)


@pytest.mark.parametrize("args, needle", [
    ({}, "missing argument name"),
    ({"name": "a", "extra": 1}, "unknown argument(s) extra"),
    ({"name": 5}, "name must be a string"),
    ({"name": "a", "count": True}, "count must be an integer"),
    ({"name": "a", "count": 0}, "count must be >= 1"),
    ({"name": "a", "count": 101}, "count must be <= 100"),
    ({"name": "toolongname"}, "name is longer than 8"),
    ({"name": "a", "ratio": float("nan")}, "ratio must be finite"),
    ({"name": "a", "ids": [1, "2"]}, "ids[1] must be an integer"),
    ({"name": "a", "inner": {"n": 11}}, "inner.n must be <= 10"),
    ({"name": "a", "inner": {"m": 1}}, "unknown argument(s) inner.m"),
    ({"name": "a", "flag": 1}, "flag must be a boolean"),
])
def test_schema_names_the_bad_field(args, needle):
    with pytest.raises(WireError) as exc:
        parse_args(Payload, args)
    assert exc.value.code == "bad_args" and needle in exc.value.message
