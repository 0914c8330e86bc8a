"""One client's side of a secure-aggregation round, as a state machine: advertise keys, share secrets with
its neighbours, mask its input, and reveal shares for the coordinator to unmask the sum.

Everything a client receives comes through the coordinator, which it does not trust: a roster, share or
unmask request that fails a check aborts the client (:class:`SecAggAborted`), and an aborted client
answers nothing more. A call out of order is refused (:class:`SecAggRejected`) and changes nothing.
"""

from __future__ import annotations

import contextlib
import enum

import nacl.public
import nacl.utils
import torch

from dllmd.net.identity import Identity
from dllmd.train.federated.secagg.crypto import CryptoFailure, seal, unseal
from dllmd.train.federated.secagg.errors import SecAggAborted, SecAggCode, SecAggError, SecAggRejected
from dllmd.train.federated.secagg.masks import add_mask
from dllmd.train.federated.secagg.messages import (KEY_BYTES, S_KEY, SEED, SEED_BYTES, Advertisement,
                                                   EncryptedShare, RevealedShare, SecAggConfig, UnmaskRequest)
from dllmd.train.federated.secagg.round import Round
from dllmd.train.federated.secagg.shamir import split_secret

POINT_BYTES = 2


class Stage(enum.Enum):
    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"  # its own shares are out
    READY = "ready"  # holds its neighbours' shares: may mask
    MASKED = "masked"
    DONE = "done"  # has revealed: its round secrets are gone
    FAILED = "failed"


def _pack_share(point: int, s_share: bytes, b_share: bytes) -> bytes:
    return point.to_bytes(POINT_BYTES, "big") + s_share + b_share


def _unpack_share(plain: bytes, sender: int) -> tuple[int, bytes, bytes]:
    if len(plain) != POINT_BYTES + KEY_BYTES + SEED_BYTES:
        raise SecAggRejected(SecAggCode.BAD_MESSAGE, f"the share from {sender} has the wrong size", sender)
    s_end = POINT_BYTES + KEY_BYTES
    return int.from_bytes(plain[:POINT_BYTES], "big"), plain[POINT_BYTES:s_end], plain[s_end:]


class SecAggClient:
    """Client ``index`` of a round, holding the node ``identity`` whose public key the config lists at it."""

    def __init__(self, config: SecAggConfig, index: int, identity: Identity):
        self.round = Round(config)
        if not 0 <= index < self.round.size or config.clients[index] != identity.public_key:
            raise SecAggAborted(SecAggCode.BAD_CONFIG, f"client {index} of the roster is not this node's key", index)
        self.index = index
        self.identity = identity
        self.stage = Stage.NEW
        self._c: nacl.public.PrivateKey | None = None  # this round's keys and seed, forgotten once revealed
        self._s: nacl.public.PrivateKey | None = None
        self._b: bytes | None = None
        self._advert: Advertisement | None = None
        self._adverts: dict[int, Advertisement] = {}
        self._held: dict[int, tuple[int, bytes, bytes]] = {}  # neighbour -> (point, s-key share, seed share)

    @contextlib.contextmanager
    def _step(self, expected: Stage, then: Stage):
        """Run one step from ``expected`` to ``then``; any check that fails on the way aborts the client."""
        if self.stage is not expected:
            raise SecAggRejected(SecAggCode.WRONG_STATE,
                                 f"client {self.index} is {self.stage.value}, not {expected.value}")
        try:
            yield
        except SecAggError as exc:
            self._forget(Stage.FAILED)
            raise SecAggAborted(exc.code, exc.message, exc.client) from None
        except BaseException:
            self._forget(Stage.FAILED)
            raise
        self.stage = then

    def _forget(self, stage: Stage) -> None:
        self.stage = stage
        self._c = self._s = self._b = None
        self._held = {}

    def advertise(self) -> Advertisement:
        """Fresh round keys c (shares to this client) and s (pairwise masks), and a fresh self-mask seed b."""
        with self._step(Stage.NEW, Stage.ADVERTISED):
            self._c, self._s = nacl.public.PrivateKey.generate(), nacl.public.PrivateKey.generate()
            self._b = nacl.utils.random(SEED_BYTES)
            advert = Advertisement(self.index, bytes(self._c.public_key), bytes(self._s.public_key),
                                   self.round.commitment(self.index, self._b), b"")
            advert.signature = self.identity.sign(self.round.advert_payload(advert))
            self._advert = advert
            return advert

    def share_keys(self, roster: list[Advertisement]) -> list[EncryptedShare]:
        """Check the roster (every advertisement signed by its node, ours among them unchanged), then share
        s and b t-of-m among the m neighbours that advertised, each share sealed and signed for one of them."""
        with self._step(Stage.ADVERTISED, Stage.SHARED):
            for advert in roster:
                self.round.check_advert(advert)
                if advert.index in self._adverts:
                    raise SecAggRejected(SecAggCode.DUPLICATE, f"the roster lists {advert.index} twice", advert.index)
                self._adverts[advert.index] = advert
            if self._adverts.get(self.index) != self._advert:
                raise SecAggRejected(SecAggCode.BAD_MESSAGE, "the roster does not hold this client's advertisement")
            holders = self.round.holders(self.index, self._adverts)
            t = self.round.threshold
            if len(holders) < t:
                raise SecAggRejected(SecAggCode.TOO_FEW_NEIGHBOURS,
                                     f"{len(holders)} neighbours advertised; sharing needs {t}", self.index)
            s_shares = split_secret(bytes(self._s), t, len(holders))
            b_shares = split_secret(self._b, t, len(holders))
            shares = []
            for point, (v, s_share, b_share) in enumerate(zip(holders, s_shares, b_shares), start=1):
                if v == self.index:  # its own share stays here, never sealed or sent
                    self._held[v] = (point, s_share, b_share)
                    continue
                context = self.round.context("share", self.index, v)
                key = self.round.share_key(self.index, v, bytes(self._c), self._adverts[v].c_public, v)
                share = EncryptedShare(self.index, v, seal(key, _pack_share(point, s_share, b_share), context), b"")
                share.signature = self.identity.sign(self.round.share_payload(share))
                shares.append(share)
            return shares

    def receive_shares(self, shares: list[EncryptedShare]) -> None:
        """Take the shares the coordinator routed here: one from each neighbour that shared keys, each signed
        by its node, opening under this pair's context, at the point its sender gave this client."""
        with self._step(Stage.SHARED, Stage.READY):
            neighbours = self.round.neighbours(self.index)
            for share in shares:
                sender = share.sender
                if share.recipient != self.index or sender not in neighbours or sender not in self._adverts:
                    raise SecAggRejected(SecAggCode.BAD_MESSAGE, f"a share from {sender} for {share.recipient} "
                                         f"was routed to {self.index}", sender)
                if sender in self._held:
                    raise SecAggRejected(SecAggCode.DUPLICATE, f"two shares from {sender}", sender)
                self.round.check_share_signature(share)
                context = self.round.context("share", sender, self.index)
                key = self.round.share_key(sender, self.index, bytes(self._c), self._adverts[sender].c_public, sender)
                try:
                    plain = unseal(key, share.ciphertext, context)
                except CryptoFailure:
                    raise SecAggRejected(SecAggCode.BAD_CIPHERTEXT, f"the share from {sender} does not open",
                                         sender) from None
                point, s_share, b_share = _unpack_share(plain, sender)
                if point != self.round.share_point(sender, self.index, self._adverts):
                    raise SecAggRejected(SecAggCode.BAD_MESSAGE, f"the share from {sender} is at the wrong point",
                                         sender)
                self._held[sender] = (point, s_share, b_share)
            if len(self._held) < self.round.threshold:
                raise SecAggRejected(SecAggCode.TOO_FEW_NEIGHBOURS, f"shares came from {len(self._held)} neighbours; "
                                     f"masking needs {self.round.threshold}", self.index)

    def masked_input(self, encoded: torch.Tensor) -> torch.Tensor:
        """``encoded`` (a :class:`FixedPoint` encoding) plus the self mask PRG(b) and, for each neighbour v
        whose shares came, +PRG(s_uv) if v > u else -PRG(s_uv), modulo 2**bits. Once a round: two masked
        inputs under the same masks would give away their difference."""
        if self.stage is Stage.READY:
            self.round.check_vector(encoded, "the encoded input")  # a bad input is refused before anything is used
        with self._step(Stage.READY, Stage.MASKED):
            masked = encoded.clone(memory_format=torch.contiguous_format)
            add_mask(masked, self.round.self_mask_key(self.index, self._b))
            for v in sorted(set(self._held) - {self.index}):
                key = self.round.pair_key(self.index, v, bytes(self._s), self._adverts[v].s_public)
                add_mask(masked, key, 1 if v > self.index else -1)
            return masked.bitwise_and_(self.round.modulus_mask)

    def unmask(self, request: UnmaskRequest) -> list[RevealedShare]:
        """Reveal, for each neighbour whose shares this client holds, its seed share if the request counts it
        a survivor, or its s-key share if dropped. Refuses (aborting) a request that counts one client as
        both, leaves this client out of the survivors, or has fewer survivors than the threshold. Answers
        once; the round's secrets are forgotten after."""
        with self._step(Stage.MASKED, Stage.DONE):
            survivors, dropped = set(request.survivors), set(request.dropped)
            if len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped):
                raise SecAggRejected(SecAggCode.BAD_MESSAGE, "the unmask request lists a client twice")
            for client in survivors | dropped:
                self.round.check_index(client, "the unmask request names")
            both = survivors & dropped
            if both:
                raise SecAggRejected(SecAggCode.BOTH_SHARES, f"the unmask request asks for both secrets of {min(both)}",
                                     min(both))
            if self.index not in survivors:
                raise SecAggRejected(SecAggCode.BAD_MESSAGE, "the unmask request does not count this client a survivor")
            if len(survivors) < self.round.threshold:
                raise SecAggRejected(SecAggCode.TOO_FEW_CLIENTS, f"{len(survivors)} survivors; unmasking needs "
                                     f"{self.round.threshold}")
            reveals = []
            for v, (point, s_share, b_share) in sorted(self._held.items()):
                if v in survivors:
                    reveals.append(RevealedShare(v, SEED, point, b_share))
                elif v in dropped:
                    reveals.append(RevealedShare(v, S_KEY, point, s_share))
            self._forget(Stage.DONE)
            return reveals
