"""The coordinator's side of a secure-aggregation round: it relays what clients send each other, adds up
their masked inputs, and removes the masks with the secrets the survivors' shares rebuild. It learns the
sum of the survivors' inputs and nothing else about any one of them.

Each ``collect_*`` checks one client's message and refuses a bad one (:class:`SecAggRejected`, nothing
changed: that client counts as dropped unless it sends a good one). The steps that close a stage
(``roster``, ``route_shares``, ``unmask_request``, ``aggregate``) raise :class:`SecAggAborted` when too
few clients or shares are left to go on, naming the client that could not be recovered.

Work on the vectors: one accumulation per masked input, one mask regenerated per survivor (its self
mask) and per (dropped client, surviving neighbour) pair; nothing else touches the vector length.
"""

from __future__ import annotations

import enum

import torch

from dllmd.train.federated.secagg.errors import SecAggAborted, SecAggCode, SecAggRejected
from dllmd.train.federated.secagg.masks import add_mask
from dllmd.train.federated.secagg.messages import (KEY_BYTES, S_KEY, SEED, SEED_BYTES, Advertisement,
                                                   EncryptedShare, RevealedShare, SecAggConfig, UnmaskRequest)
from dllmd.train.federated.secagg.round import Round
from dllmd.train.federated.secagg.shamir import combine_secret

SHARE_BYTES = {SEED: SEED_BYTES, S_KEY: KEY_BYTES}


class Stage(enum.Enum):
    ADVERTS = "adverts"
    SHARES = "shares"
    MASKED = "masked"
    UNMASK = "unmask"
    DONE = "done"
    FAILED = "failed"


class SecAggServer:
    def __init__(self, config: SecAggConfig):
        self.round = Round(config)
        self.stage = Stage.ADVERTS
        self._adverts: dict[int, Advertisement] = {}  # U1: who advertised
        self._shares: dict[int, list[EncryptedShare]] = {}  # U2: who shared keys
        self._masked: set[int] = set()  # U3: who sent a masked input
        self._total: torch.Tensor | None = None
        self._request: UnmaskRequest | None = None
        self._wanted: dict[tuple[int, str], None] = {}  # the secrets unmasking rebuilds, in order
        self._revealed_by: set[int] = set()
        self._reveals: dict[tuple[int, str], dict[int, tuple[int, bytes]]] = {}  # (owner, kind) -> holder -> share

    def _expect(self, stage: Stage) -> None:
        if self.stage is not stage:
            raise SecAggRejected(SecAggCode.WRONG_STATE, f"the round is at {self.stage.value}, not {stage.value}")

    def _abort(self, code: str, message: str, client: int | None = None) -> SecAggAborted:
        self.stage = Stage.FAILED
        self._total = None
        return SecAggAborted(code, message, client)

    def _check_sender(self, index: int, allowed, done, what: str) -> None:
        self.round.check_index(index, what)
        if index not in allowed:
            raise SecAggRejected(SecAggCode.BAD_MESSAGE, f"{what} {index}, which is not part of this stage", index)
        if index in done:
            raise SecAggRejected(SecAggCode.DUPLICATE, f"{what} {index} came twice", index)

    @property
    def survivors(self) -> list[int]:
        """The clients whose masked inputs are in the sum (what ``FixedPoint.decode_sum`` counts)."""
        return sorted(self._masked)

    def collect_advert(self, advert: Advertisement) -> None:
        self._expect(Stage.ADVERTS)
        self.round.check_advert(advert)
        if advert.index in self._adverts:
            raise SecAggRejected(SecAggCode.DUPLICATE, f"a second advertisement of {advert.index}", advert.index)
        self._adverts[advert.index] = advert

    def roster(self) -> list[Advertisement]:
        """Close advertising: the adverts every client gets, in index order."""
        self._expect(Stage.ADVERTS)
        if len(self._adverts) < self.round.threshold + 1:
            raise self._abort(SecAggCode.TOO_FEW_CLIENTS, f"{len(self._adverts)} clients advertised; the round needs "
                              f"{self.round.threshold + 1}")
        self.stage = Stage.SHARES
        return [self._adverts[i] for i in sorted(self._adverts)]

    def collect_shares(self, sender: int, shares: list[EncryptedShare]) -> None:
        """One client's shares: exactly one for each neighbour that advertised, each signed by its node."""
        self._expect(Stage.SHARES)
        self._check_sender(sender, self._adverts, self._shares, "shares from")
        if any(share.sender != sender for share in shares):
            raise SecAggRejected(SecAggCode.BAD_MESSAGE, f"client {sender} sent shares in another's name", sender)
        if sorted(share.recipient for share in shares) != [v for v in self.round.holders(sender, self._adverts)
                                                            if v != sender]:
            raise SecAggRejected(SecAggCode.BAD_MESSAGE, f"client {sender} did not send one share to each of its "
                                 "advertised neighbours", sender)
        for share in shares:
            self.round.check_share_signature(share)
        self._shares[sender] = list(shares)

    def route_shares(self) -> dict[int, list[EncryptedShare]]:
        """Close key sharing: for each client that shared its keys, the shares addressed to it by others that
        did. A client masks toward exactly the neighbours whose shares it gets here."""
        self._expect(Stage.SHARES)
        if len(self._shares) < self.round.threshold + 1:
            raise self._abort(SecAggCode.TOO_FEW_CLIENTS, f"{len(self._shares)} clients shared keys; the round needs "
                              f"{self.round.threshold + 1}")
        routed: dict[int, list[EncryptedShare]] = {v: [] for v in sorted(self._shares)}
        for sender in sorted(self._shares):
            for share in self._shares[sender]:
                if share.recipient in routed:
                    routed[share.recipient].append(share)
        self.stage = Stage.MASKED
        return routed

    def collect_masked(self, index: int, masked: torch.Tensor) -> None:
        """Add one client's masked input to the running sum (the vectors themselves are not kept)."""
        self._expect(Stage.MASKED)
        self._check_sender(index, self._shares, self._masked, "masked input from")
        self.round.check_vector(masked, f"the masked input from {index}")
        if self._total is None:
            self._total = masked.clone(memory_format=torch.contiguous_format)
        else:
            self._total.add_(masked)  # below 2**32 each: int64 holds billions of them before reducing
        self._masked.add(index)

    def unmask_request(self) -> UnmaskRequest:
        """Close masking: whose seeds and whose s keys the survivors are to reveal shares of. Aborts at once,
        before anything is revealed, if some needed secret has fewer surviving holders than the threshold.
        Asked again, it answers the same request: every survivor must get one and the same."""
        if self.stage is Stage.UNMASK:
            return self._request
        self._expect(Stage.MASKED)
        t = self.round.threshold
        if len(self._masked) < t:
            raise self._abort(SecAggCode.TOO_FEW_CLIENTS, f"{len(self._masked)} clients sent masked inputs; "
                              f"unmasking needs {t}")
        needed = self._needed()
        for owner, kind in needed:
            holders = (self.round.neighbours(owner) | {owner}) & self._masked
            if len(holders) < t:
                raise self._abort(SecAggCode.TOO_FEW_SHARES, f"client {owner} cannot be recovered: {len(holders)} "
                                  f"of its neighbours survive to reveal its {_what(kind)}, {t} are needed", owner)
        self.stage, self._wanted = Stage.UNMASK, needed
        self._request = UnmaskRequest(survivors=self.survivors, dropped=sorted(set(self._shares) - self._masked))
        return self._request

    def _needed(self) -> dict[tuple[int, str], None]:
        """The secrets unmasking rebuilds: each survivor's seed, and the s key of each dropped client that
        some survivor masked toward (one whose surviving neighbours hold its shares)."""
        dropped = sorted(set(self._shares) - self._masked)
        return dict.fromkeys([(u, SEED) for u in self.survivors]
                             + [(d, S_KEY) for d in dropped if self.round.neighbours(d) & self._masked])

    def collect_reveals(self, index: int, reveals: list[RevealedShare]) -> None:
        """One survivor's revealed shares: only what the request asked, from a holder of each, at its point."""
        self._expect(Stage.UNMASK)
        self._check_sender(index, self._masked, self._revealed_by, "revealed shares from")
        taken: dict[tuple[int, str], tuple[int, bytes]] = {}
        for reveal in reveals:
            secret = (reveal.owner, reveal.kind)
            if secret not in self._wanted or index not in self.round.neighbours(reveal.owner) | {reveal.owner}:
                raise SecAggRejected(SecAggCode.BAD_MESSAGE, f"client {index} revealed a share of {reveal.owner}'s "
                                     f"{reveal.kind!r} that was not asked of it", index)
            if secret in taken:
                raise SecAggRejected(SecAggCode.DUPLICATE, f"client {index} revealed two shares of one secret", index)
            if (reveal.point != self.round.share_point(reveal.owner, index, self._adverts)
                    or len(reveal.share) != SHARE_BYTES[reveal.kind]):
                raise SecAggRejected(SecAggCode.BAD_MESSAGE, f"client {index}'s share of {reveal.owner} is not the "
                                     "one it was given", index)
            taken[secret] = (reveal.point, reveal.share)
        for secret, share in taken.items():
            self._reveals.setdefault(secret, {})[index] = share
        self._revealed_by.add(index)

    def aggregate(self) -> torch.Tensor:
        """The modular sum of the survivors' encoded inputs (int64 in [0, 2**bits)): their masked inputs
        less each survivor's self mask and the masks survivors added toward dropped neighbours."""
        self._expect(Stage.UNMASK)
        total, secrets = self._total, {secret: self._rebuild(*secret) for secret in self._wanted}
        for (owner, kind), secret in secrets.items():
            if kind == SEED:
                add_mask(total, self.round.self_mask_key(owner, secret), -1)
                continue
            for u in sorted(self.round.neighbours(owner) & self._masked):
                key = self.round.pair_key(owner, u, secret, self._adverts[u].s_public)
                add_mask(total, key, -1 if owner > u else 1)  # u added +mask toward a higher index, -mask lower
        self.stage, self._total = Stage.DONE, None
        return total.bitwise_and_(self.round.modulus_mask)

    def _rebuild(self, owner: int, kind: str) -> bytes:
        t = self.round.threshold
        shares = self._reveals.get((owner, kind), {})
        if len(shares) < t:
            raise self._abort(SecAggCode.TOO_FEW_SHARES, f"client {owner} cannot be recovered: {len(shares)} shares "
                              f"of its {_what(kind)} were revealed, {t} are needed", owner)
        secret = combine_secret([shares[holder] for holder in sorted(shares)[:t]])
        advert = self._adverts[owner]
        if kind == SEED:
            matches = self.round.commitment(owner, secret) == advert.b_commitment
        else:
            matches = Round.s_public_of(secret) == advert.s_public
        if not matches:
            raise self._abort(SecAggCode.BAD_SHARES, f"the shares revealed for client {owner} rebuild a {_what(kind)} "
                              "that is not the one it advertised", owner)
        return secret


def _what(kind: str) -> str:
    return "self-mask seed" if kind == SEED else "s key"
