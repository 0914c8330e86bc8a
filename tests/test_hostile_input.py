"""Malformed messages from an authenticated peer get structured errors; the daemon keeps serving."""

from __future__ import annotations

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dllmd.net.identity import Identity, curve_public_z85
from dllmd.net.keys import Role
from dllmd.net.wire import PROTOCOL_VERSION, Request, decode_reply, encode_request

RECV_TIMEOUT_MS = 5000


@pytest.fixture(scope="module")
def raw_peer(tmp_path_factory):
    """One daemon for the module and a raw, authenticated DEALER (an admin key: admin arguments are hostile too)."""
    from tests.conftest import make_home, start_daemon
    from dllmd.net.keys import AuthorizedKeys

    home = tmp_path_factory.mktemp("hostile") / "home"
    make_home(home, "target")
    me = Identity.generate()
    AuthorizedKeys(home / "authorized_keys.toml").authorize(me.public_key, Role.ADMIN)
    daemon = start_daemon(home)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.curve_secretkey, sock.curve_publickey = me.curve_secret, me.curve_public
    sock.curve_serverkey = curve_public_z85(daemon.public_key)
    sock.rcvtimeo = RECV_TIMEOUT_MS
    sock.linger = 0
    sock.connect(daemon.address)
    yield daemon, sock
    sock.close()
    ctx.term()
    daemon.stop()


def _exchange(sock: zmq.Socket, frames: list[bytes]):
    sock.send_multipart(frames)
    return decode_reply(sock.recv_multipart())


def _assert_still_serving(daemon, sock) -> None:
    reply = _exchange(sock, encode_request(Request(id=424242, op="ping")))
    assert reply.ok and reply.id == 424242 and reply.result["pong"] is True
    assert daemon.proc.poll() is None


def _header(**fields) -> bytes:
    base = {"v": PROTOCOL_VERSION, "id": 7, "op": "echo", "args": {}, "tensors": []}
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not ...}, use_bin_type=True)


# What each header field may validly hold for an 'echo' with no frames; anything else must fail.
VALID = {
    "id": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63,
    "op": lambda v: v in ("ping", "echo", "info"),
    "args": lambda v: v == {},
    "tensors": lambda v: v == [],
    "v": lambda v: v == PROTOCOL_VERSION and not isinstance(v, bool),
}

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@st.composite
def malformed_messages(draw):
    kind = draw(st.sampled_from(["garbage", "wrong_types", "lying_tensor", "huge_shape", "unknown_op",
                                 "bad_version", "bad_args", "bad_dtype", "frame_count"]))
    if kind == "garbage":
        return [draw(st.binary(max_size=300)) for _ in range(draw(st.integers(1, 3)))]
    if kind == "wrong_types":
        field = draw(st.sampled_from(sorted(VALID)))
        return [_header(**{field: draw(msgpack_values.filter(lambda v: not VALID[field](v)))})]
    if kind == "lying_tensor":
        shape = draw(st.lists(st.integers(0, 64), min_size=1, max_size=3))
        actual = draw(st.binary(max_size=2048))
        declared = 4 * int(torch.tensor(shape).prod())
        if len(actual) == declared:
            actual += b"\0"
        return [_header(tensors=[{"dtype": "float32", "shape": shape}]), actual]
    if kind == "huge_shape":
        shape = draw(st.lists(st.integers(2**20, 2**31 - 1), min_size=2, max_size=8))
        return [_header(tensors=[{"dtype": "float32", "shape": shape}]), b"\0" * 16]
    if kind == "unknown_op":
        return [_header(op=draw(st.text(min_size=1, max_size=64).filter(lambda s: s not in {"ping", "info", "echo"})))]
    if kind == "bad_version":
        return [_header(v=draw(st.integers(-(2**63), 2**64 - 1).filter(lambda v: v != PROTOCOL_VERSION)))]
    if kind == "bad_args":
        return [_header(op="ping", args=draw(st.dictionaries(st.text(min_size=1, max_size=8), msgpack_values, min_size=1)))]
    if kind == "bad_dtype":
        return [_header(tensors=[{"dtype": draw(st.text(max_size=12)), "shape": [1]}]), b"\0" * 4]
    # frame_count: frames that the header does not account for
    return [_header(), *[b"x" * 4 for _ in range(draw(st.integers(1, 3)))]]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(frames=malformed_messages())
def test_malformed_messages_get_structured_errors(raw_peer, frames):
    daemon, sock = raw_peer
    reply = _exchange(sock, frames)
    assert not reply.ok, f"accepted a malformed message: {frames!r}"
    assert reply.error["code"] in {"bad_message", "unsupported_version", "unknown_op", "bad_args", "too_large",
                                   "forbidden"}
    assert reply.error["message"]


def test_daemon_survives_the_whole_barrage_and_still_serves(raw_peer):
    daemon, sock = raw_peer
    _assert_still_serving(daemon, sock)
    # A large message right at the edge of the per-tensor limit is refused, not allocated.
    header = _header(tensors=[{"dtype": "float32", "shape": [2**30]}])
    reply = _exchange(sock, [header, b"\0" * 8])
    assert reply.error["code"] == "too_large"
    _assert_still_serving(daemon, sock)


def test_specific_errors_are_precise(raw_peer):
    daemon, sock = raw_peer
    reply = _exchange(sock, [_header(tensors=[{"dtype": "float32", "shape": [2, 3]}]), b"\0" * 20])
    assert reply.id == 7 and reply.error["code"] == "bad_message" and "24 bytes" in reply.error["message"]
    reply = _exchange(sock, [_header(op="warp_drive")])
    assert reply.error == {"code": "unknown_op", "message": "unknown operation 'warp_drive'"}
    for version in (99, True, "1"):
        assert _exchange(sock, [_header(v=version)]).error["code"] == "unsupported_version"
    reply = _exchange(sock, [_header(op="ping", args={"x": 1})])
    assert reply.error["code"] == "bad_args" and "x" in reply.error["message"]
    # bf16 round trip through a real daemon (no numpy dtype exists for it)
    tensor = torch.randn(3, 5).to(torch.bfloat16)
    reply = _exchange(sock, encode_request(Request(id=9, op="echo", tensors=[tensor, torch.arange(5)])))
    assert reply.ok and torch.equal(reply.tensors[0], tensor) and torch.equal(reply.tensors[1], torch.arange(5))
    _assert_still_serving(daemon, sock)


def test_an_oversized_header_is_answered_to_its_caller(raw_peer):
    """Args too big for a header (bulk data belongs in tensor frames) get 'too_large' with the
    request's own id, so the caller learns at once instead of waiting out its timeout."""
    daemon, sock = raw_peer
    reply = _exchange(sock, encode_request(Request(id=31337, op="echo", args={"blob": b"x" * (80 * 1024)})))
    assert reply.id == 31337 and reply.error["code"] == "too_large"
    assert "tensor frames" in reply.error["message"]
    _assert_still_serving(daemon, sock)
