"""Relayed session traffic: ``relay.forward`` (at a relay: open one layer, pass the rest on) and
``relay.deliver`` (at a stage: open the innermost layer, run the session operation inside it). Every
argument and reply is one opaque sealed blob (:mod:`dllmd.net.sealing`); the layers inside are typed
here too, so a stage and a relay parse what they open as strictly as any request."""

from __future__ import annotations

from dataclasses import dataclass

from dllmd.net.schema import Op, bounded

# A sealed request carries a session step's tensors inside it (a long prompt's chunk of hidden states):
# the same bound a message's tensors have by default.
MAX_SEALED_BYTES = 256 * 1024 * 1024
MAX_INNER_FRAMES = 64


@dataclass
class RelayArgs:
    sealed: bytes = bounded(max_len=MAX_SEALED_BYTES)


@dataclass
class RelayReply:
    """Each reply of the stage, sealed to the client's reply key; relays pass it back unopened."""

    sealed: bytes = bounded(max_len=MAX_SEALED_BYTES)


@dataclass
class HopLayer:
    """What a relay finds when it opens its layer: where the rest goes, and the rest (sealed to that hop)."""

    address: str = bounded(max_len=256)
    public_key: str = bounded(max_len=64)
    sealed: bytes = bounded(max_len=MAX_SEALED_BYTES)
    deliver: bool = False  # the next hop is the stage (relay.deliver), not another relay (relay.forward)


@dataclass
class InnerRequest:
    """The innermost layer, sealed to the stage: a session request exactly as the wire encodes it
    (header and tensor frames), and the key the stage seals its replies to (the client's, made for
    the session: it names nobody)."""

    reply_key: bytes = bounded(max_len=32)
    frames: list[bytes] = bounded(max_len=MAX_INNER_FRAMES)


RELAY_FORWARD = Op("relay.forward", RelayArgs, RelayReply)
RELAY_DELIVER = Op("relay.deliver", RelayArgs, RelayReply)
