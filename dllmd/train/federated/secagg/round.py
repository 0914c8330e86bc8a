"""What every party of one round derives alike from its :class:`SecAggConfig`: the neighbour graph, the
threshold, the contexts that bind each signature, ciphertext and key to this round, and the checks of
messages that client and coordinator both make.

A context names the protocol, what the bytes are for, the sender and recipient indices (-1: everyone),
and the round's digest: a hash of the job, round number, roster of node keys, graph seed, vector length,
modulus, degree and threshold. A client that signs or derives under it agrees to all of these at once,
so nothing replays into another job, round, roster or pair, and a coordinator cannot give two clients
different rosters or thresholds without their keys and shares failing to line up.
"""

from __future__ import annotations

import hashlib

import msgpack
import nacl.bindings
import torch

from dllmd.net.identity import InvalidKey, parse_public_key, verify_signature
from dllmd.train.federated.secagg import graph
from dllmd.train.federated.secagg.crypto import CryptoFailure, agree, derive, usable_public_key
from dllmd.train.federated.secagg.errors import SecAggAborted, SecAggCode, SecAggRejected
from dllmd.train.federated.secagg.messages import (COMMITMENT_BYTES, KEY_BYTES, MAX_CLIENTS, SIGNATURE_BYTES,
                                                   Advertisement, EncryptedShare, SecAggConfig)

PROTOCOL = "dllm-secagg/1"
MIN_CLIENTS = 3  # with two, each client's input is the sum minus its own


class Round:
    def __init__(self, config: SecAggConfig):
        n = len(config.clients)
        if not MIN_CLIENTS <= n <= MAX_CLIENTS:
            raise SecAggAborted(SecAggCode.BAD_CONFIG, f"a round has {MIN_CLIENTS}..{MAX_CLIENTS} clients, not {n}")
        try:
            keys = [parse_public_key(key) for key in config.clients]
        except InvalidKey as exc:
            raise SecAggAborted(SecAggCode.BAD_CONFIG, f"the roster has a bad node key: {exc}") from None
        if len(set(keys)) != n:
            raise SecAggAborted(SecAggCode.BAD_CONFIG, "the roster names one node key twice")
        if len(config.graph_seed) != 32:
            raise SecAggAborted(SecAggCode.BAD_CONFIG, "the graph seed is 32 bytes")
        try:
            self.degree = graph.degree(n, config.neighbours, config.complete_up_to)
            self.threshold = graph.threshold(self.degree, config.threshold)
        except ValueError as exc:
            raise SecAggAborted(SecAggCode.BAD_CONFIG, str(exc)) from None
        self.config = config
        self.size = n
        self.modulus_mask = (1 << config.bits) - 1
        self.digest = hashlib.blake2b(msgpack.packb(
            [PROTOCOL, config.job, config.round, [key.hex() for key in keys], config.graph_seed, config.length,
             config.bits, self.degree, self.threshold]), digest_size=32).digest()
        self._graph = graph.neighbour_graph(n, self.degree, derive(config.graph_seed, self.context("graph", -1, -1)))

    def context(self, purpose: str, sender: int, recipient: int) -> bytes:
        return msgpack.packb([PROTOCOL, purpose, self.digest, sender, recipient])

    def neighbours(self, client: int) -> frozenset[int]:
        return self._graph[client]

    def holders(self, owner: int, advertised) -> list[int]:
        """Who holds shares of ``owner``'s secrets, in point order (point = position + 1): its neighbours that
        advertised, and itself (Bonawitz et al. share among all of U1, the owner included: a survivor's own
        share counts toward rebuilding its seed, so a round of three survives one death after masking)."""
        return sorted((self._graph[owner] | {owner}).intersection(advertised))

    def share_point(self, owner: int, holder: int, advertised) -> int:
        """The Shamir point of ``holder``'s share of ``owner``'s secrets."""
        return self.holders(owner, advertised).index(holder) + 1

    # Keys both sides of a pair (or a client and the coordinator rebuilding its secrets) derive alike.
    def pair_key(self, own: int, peer: int, s_secret: bytes, peer_s_public: bytes) -> bytes:
        return self._agree(s_secret, peer_s_public, peer, self.context("pair-mask", min(own, peer), max(own, peer)))

    def share_key(self, sender: int, recipient: int, c_secret: bytes, peer_c_public: bytes, peer: int) -> bytes:
        return self._agree(c_secret, peer_c_public, peer, self.context("share", sender, recipient))

    @staticmethod
    def _agree(secret: bytes, peer_public: bytes, peer: int, context: bytes) -> bytes:
        try:
            return agree(secret, peer_public, context)
        except CryptoFailure:
            raise SecAggRejected(SecAggCode.BAD_MESSAGE, f"client {peer} advertised a degenerate key", peer) from None

    def self_mask_key(self, client: int, seed: bytes) -> bytes:
        return derive(seed, self.context("self-mask", client, client))

    def commitment(self, client: int, seed: bytes) -> bytes:
        return derive(seed, self.context("seed-commitment", client, client))

    @staticmethod
    def s_public_of(s_secret: bytes) -> bytes:
        return nacl.bindings.crypto_scalarmult_base(s_secret)

    def check_index(self, index: int, what: str) -> None:
        if not 0 <= index < self.size:
            raise SecAggRejected(SecAggCode.BAD_MESSAGE, f"{what} {index} is not a client of this round")

    def advert_payload(self, advert: Advertisement) -> bytes:
        return (self.context("advertisement", advert.index, -1) + advert.c_public + advert.s_public
                + advert.b_commitment)

    def check_advert(self, advert: Advertisement) -> None:
        """Sizes, index and the node signature of one advertisement (SecAggRejected naming what is wrong)."""
        self.check_index(advert.index, "advertisement of")
        sizes = (len(advert.c_public), len(advert.s_public), len(advert.b_commitment), len(advert.signature))
        if sizes != (KEY_BYTES, KEY_BYTES, COMMITMENT_BYTES, SIGNATURE_BYTES):
            raise SecAggRejected(SecAggCode.BAD_MESSAGE,
                                 f"advertisement of {advert.index} has fields of the wrong size", advert.index)
        if not (usable_public_key(advert.c_public) and usable_public_key(advert.s_public)):
            raise SecAggRejected(SecAggCode.BAD_MESSAGE, f"advertisement of {advert.index} has a degenerate key",
                                 advert.index)
        if not verify_signature(self.config.clients[advert.index], self.advert_payload(advert), advert.signature):
            raise SecAggRejected(SecAggCode.BAD_SIGNATURE, f"advertisement of {advert.index} is not signed by its node",
                                 advert.index)

    def share_payload(self, share: EncryptedShare) -> bytes:
        return self.context("share", share.sender, share.recipient) + share.ciphertext

    def check_share_signature(self, share: EncryptedShare) -> None:
        self.check_index(share.sender, "share from")
        self.check_index(share.recipient, "share for")
        if not verify_signature(self.config.clients[share.sender], self.share_payload(share), share.signature):
            raise SecAggRejected(SecAggCode.BAD_SIGNATURE,
                                 f"share from {share.sender} for {share.recipient} is not signed by its node",
                                 share.sender)

    def check_vector(self, vector: torch.Tensor, what: str) -> None:
        """An encoded or masked vector: 1-D int64 of the round's length, values in [0, 2**bits)."""
        if not isinstance(vector, torch.Tensor) or vector.dtype != torch.int64 or vector.dim() != 1:
            raise SecAggRejected(SecAggCode.BAD_INPUT, f"{what} is a 1-D int64 tensor")
        if vector.numel() != self.config.length:
            raise SecAggRejected(SecAggCode.BAD_INPUT,
                                 f"{what} has {vector.numel()} elements, the round {self.config.length}")
        low, high = torch.aminmax(vector)
        if int(low) < 0 or int(high) > self.modulus_mask:
            raise SecAggRejected(SecAggCode.BAD_INPUT, f"{what} has values outside [0, 2**{self.config.bits})")
