"""Secure aggregation: the coordinator gets the sum of the clients' updates, survives dropouts, and a
coordinator (or anyone on the way) that tampers, forges, replays or asks too much gets a typed refusal."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass

import msgpack
import pytest
import torch

from dllmd.net.identity import Identity
from dllmd.net.schema import parse_args, to_wire
from dllmd.train.federated.secagg import (Advertisement, EncryptedShare, FixedPoint, RevealedShare, SecAggAborted,
                                          SecAggClient, SecAggCode, SecAggConfig, SecAggRejected, SecAggServer,
                                          UnmaskRequest)
from dllmd.train.federated.secagg.masks import mask

BOUND = 1.0
IDENTITIES = [Identity.generate() for _ in range(20)]  # node keys are slow to make: the tests share them


def config(n: int, length: int = 64, round_: int = 1, job: str = "job-a", **extra) -> SecAggConfig:
    return SecAggConfig(job=job, round=round_, clients=[i.public_key for i in IDENTITIES[:n]],
                        graph_seed=bytes(range(32)), length=length, **extra)


@dataclass
class RelayedRound:
    """One round driven the way a coordinator relays it, stage by stage."""

    config: SecAggConfig
    server: SecAggServer
    clients: list[SecAggClient]
    roster: list[Advertisement]
    routed: dict[int, list[EncryptedShare]]

    @classmethod
    def through_key_sharing(cls, cfg: SecAggConfig) -> "RelayedRound":
        n = len(cfg.clients)
        server, clients = SecAggServer(cfg), [SecAggClient(cfg, i, IDENTITIES[i]) for i in range(n)]
        for client in clients:
            server.collect_advert(client.advertise())
        roster = server.roster()
        for client in clients:
            server.collect_shares(client.index, client.share_keys(roster))
        routed = server.route_shares()
        for client in clients:
            client.receive_shares(routed[client.index])
        return cls(cfg, server, clients, roster, routed)

    def mask(self, inputs: dict[int, torch.Tensor], fp: FixedPoint) -> None:
        for index, x in inputs.items():
            self.server.collect_masked(index, self.clients[index].masked_input(fp.encode(x)))

    def unmask(self, revealers=None) -> torch.Tensor:
        request = self.server.unmask_request()
        for index in request.survivors if revealers is None else revealers:
            self.server.collect_reveals(index, self.clients[index].unmask(request))
        return self.server.aggregate()


def updates(n: int, length: int, seed: int = 0) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {i: (torch.rand(length, generator=generator) * 2 - 1) * BOUND for i in range(n)}


def assert_sum(total: torch.Tensor, fp: FixedPoint, inputs: dict[int, torch.Tensor]) -> None:
    """Within count * step / 2 of the exact sum (float64 decode), and equal to the fp32 sum within that too."""
    count = len(inputs)
    exact = sum(x.double() for x in inputs.values())
    tolerance = count * fp.step / 2
    assert float((fp.decode_sum(total, count, torch.float64) - exact).abs().max()) <= tolerance * (1 + 1e-9)
    fp32 = sum(inputs.values())
    slack = tolerance + count * BOUND * 2 ** -23  # fp32 rounding of either sum
    assert float((fp.decode_sum(total, count) - fp32).abs().max()) <= slack


@contextlib.contextmanager
def raises(kind, code: str, client: int | None = None):
    """pytest.raises for a secagg error of ``kind`` with ``code`` (and the client it names)."""
    with pytest.raises(kind) as info:
        yield info
    assert info.value.code == code, info.value.message
    if client is not None:
        assert info.value.client == client, info.value.message


# Fixed point


def test_fixed_point_rounds_each_element_to_its_step_and_clamps_at_the_bound():
    fp = FixedPoint(bound=2.0, summands=10)
    assert fp.step == 2.0 / ((2 ** 31 - 1) // 10)
    x = torch.tensor([0.0, 1e-12, -0.5, 1.999, -2.0, 7.0, -1e9])
    encoded = fp.encode(x)
    assert encoded.dtype == torch.int64 and int(encoded.min()) >= 0 and int(encoded.max()) < 2 ** 32
    back = fp.decode_sum(encoded, 1, torch.float64)
    assert float((back - x.double().clamp(-2, 2)).abs().max()) <= fp.step / 2
    with pytest.raises(ValueError):
        fp.encode(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError):
        fp.decode_sum(encoded, 11)


@pytest.mark.parametrize("bits", [8, 32])
def test_summands_at_the_bound_do_not_wrap(bits):
    fp = FixedPoint(bound=BOUND, summands=5, bits=bits)
    x = torch.tensor([BOUND, -BOUND, BOUND * 3, -BOUND * 3, 0.0])
    total = sum(fp.encode(x) for _ in range(5)) % 2 ** bits
    assert fp.decode_sum(total, 5, torch.float64).tolist() == pytest.approx([5, -5, 5, -5, 0], abs=5 * fp.step / 2)


# Whole rounds


@pytest.mark.parametrize("n", [3, 4, 5])
def test_the_coordinator_gets_the_sum_of_every_update(n):
    cfg = config(n, length=257)
    fp, inputs = FixedPoint(BOUND, n), updates(n, 257)
    rnd = RelayedRound.through_key_sharing(cfg)
    rnd.mask(inputs, fp)
    assert_sum(rnd.unmask(), fp, inputs)
    assert rnd.server.survivors == list(range(n))


def test_updates_at_plus_and_minus_the_bound_sum_without_overflow():
    n, fp = 5, FixedPoint(BOUND, 5)
    inputs = {i: torch.tensor([BOUND, -BOUND, BOUND, 0.0] * 16) for i in range(n)}
    rnd = RelayedRound.through_key_sharing(config(n))
    rnd.mask(inputs, fp)
    assert_sum(rnd.unmask(), fp, inputs)


def test_a_client_that_drops_before_masking_is_recovered_and_the_others_sum():
    n, fp = 5, FixedPoint(BOUND, 5)
    inputs = updates(n, 64)
    rnd = RelayedRound.through_key_sharing(config(n))
    survivors = {i: inputs[i] for i in (0, 1, 3, 4)}  # client 2 shared its keys, then went away
    rnd.mask(survivors, fp)
    request = rnd.server.unmask_request()
    assert request == UnmaskRequest(survivors=[0, 1, 3, 4], dropped=[2])
    assert_sum(rnd.unmask(), fp, survivors)


def test_in_a_round_of_three_a_client_dying_after_masking_is_recovered_from_its_own_holders():
    """Each client holds a share of its own secrets, so with three clients (threshold 2) a survivor's seed
    is rebuilt from its own share and its one surviving neighbour's."""
    n, fp = 3, FixedPoint(BOUND, 3)
    inputs = updates(n, 64)
    rnd = RelayedRound.through_key_sharing(config(n))
    rnd.mask(inputs, fp)  # all three masked; client 2 dies before it reveals anything
    assert_sum(rnd.unmask(revealers=[0, 1]), fp, inputs)


def test_a_client_that_drops_before_sharing_keys_is_left_out_of_every_mask():
    n, fp = 5, FixedPoint(BOUND, 5)
    inputs = updates(n, 64)
    cfg = config(n)
    server, clients = SecAggServer(cfg), [SecAggClient(cfg, i, IDENTITIES[i]) for i in range(n)]
    for client in clients:
        server.collect_advert(client.advertise())
    roster = server.roster()
    for client in clients[:4]:  # client 4 advertised, then never shared its keys
        server.collect_shares(client.index, client.share_keys(roster))
    routed = server.route_shares()
    assert sorted(routed) == [0, 1, 2, 3] and all(len(routed[i]) == 3 for i in routed)
    for client in clients[:4]:
        client.receive_shares(routed[client.index])
        server.collect_masked(client.index, client.masked_input(FixedPoint(BOUND, 5).encode(inputs[client.index])))
    request = server.unmask_request()
    assert request.dropped == []
    for client in clients[:4]:
        server.collect_reveals(client.index, client.unmask(request))
    assert_sum(server.aggregate(), fp, {i: inputs[i] for i in range(4)})


def test_too_many_dropouts_fail_before_anything_is_revealed_naming_the_client():
    n, fp = 5, FixedPoint(BOUND, 5)  # 4 neighbours each, 5 holders of each secret, threshold 3
    rnd = RelayedRound.through_key_sharing(config(n))
    rnd.mask({i: x for i, x in updates(n, 64).items() if i in (1, 2)}, fp)
    with raises(SecAggAborted, SecAggCode.TOO_FEW_CLIENTS):
        rnd.server.unmask_request()
    with raises(SecAggRejected, SecAggCode.WRONG_STATE):
        rnd.server.aggregate()
    # On a sparse graph one client's holders can be gone while enough others survive: it is named.
    n = 20
    rnd = RelayedRound.through_key_sharing(config(n))  # 10 neighbours, threshold 6
    neighbours = sorted(rnd.server.round.neighbours(0))
    survivors = {0, *neighbours[:4], *(set(range(n)) - set(neighbours) - {0})}
    rnd.mask({i: x for i, x in updates(n, 64).items() if i in survivors}, FixedPoint(BOUND, n))
    with raises(SecAggAborted, SecAggCode.TOO_FEW_SHARES, client=0) as info:
        rnd.server.unmask_request()
    assert "client 0" in info.value.message


def test_survivors_that_do_not_reveal_leave_a_secret_short_of_its_threshold():
    n, fp = 5, FixedPoint(BOUND, 5)
    rnd = RelayedRound.through_key_sharing(config(n))
    rnd.mask({i: x for i, x in updates(n, 64).items() if i != 4}, fp)
    with raises(SecAggAborted, SecAggCode.TOO_FEW_SHARES, client=0):
        rnd.unmask(revealers=[0, 1])  # 0's seed is held by 0-4: only 0 and 1 answered, 3 are needed


def test_a_survivor_revealing_a_wrong_share_is_caught_against_the_commitment():
    n, fp = 4, FixedPoint(BOUND, 4)
    rnd = RelayedRound.through_key_sharing(config(n))
    rnd.mask(updates(n, 64), fp)
    request = rnd.server.unmask_request()
    for index in request.survivors:
        reveals = rnd.clients[index].unmask(request)
        if index == 1:
            reveals = [dataclasses.replace(r, share=os.urandom(len(r.share))) if r.owner == 0 else r for r in reveals]
        rnd.server.collect_reveals(index, reveals)
    with raises(SecAggAborted, SecAggCode.BAD_SHARES, client=0):
        rnd.server.aggregate()


# What a client refuses


def test_a_client_refuses_to_reveal_both_secrets_of_one_client_and_then_answers_nothing():
    n, fp = 5, FixedPoint(BOUND, 5)
    rnd = RelayedRound.through_key_sharing(config(n))
    rnd.mask(updates(n, 64), fp)
    greedy = UnmaskRequest(survivors=[0, 1, 2, 3, 4], dropped=[3])
    with raises(SecAggAborted, SecAggCode.BOTH_SHARES, client=3):
        rnd.clients[0].unmask(greedy)
    with raises(SecAggRejected, SecAggCode.WRONG_STATE):  # not even a fair request now
        rnd.clients[0].unmask(UnmaskRequest(survivors=[0, 1, 2, 3, 4], dropped=[]))


def test_a_client_answers_one_unmask_request_a_round():
    """Telling some neighbours that client 2 survived and others that it dropped fails: each answers once,
    and a threshold above half the neighbours keeps the two halves from both reaching it."""
    n, fp = 5, FixedPoint(BOUND, 5)
    rnd = RelayedRound.through_key_sharing(config(n))
    rnd.mask(updates(n, 64), fp)
    reveals = rnd.clients[0].unmask(UnmaskRequest(survivors=[0, 1, 2, 3, 4], dropped=[]))
    assert {(r.owner, r.kind) for r in reveals} == {(0, "b"), (1, "b"), (2, "b"), (3, "b"), (4, "b")}
    with raises(SecAggRejected, SecAggCode.WRONG_STATE):
        rnd.clients[0].unmask(UnmaskRequest(survivors=[0, 1, 3, 4], dropped=[2]))


@pytest.mark.parametrize("request_", [UnmaskRequest(survivors=[1, 2, 3], dropped=[0]),  # leaves it out
                                      UnmaskRequest(survivors=[0, 1, 1], dropped=[]),
                                      UnmaskRequest(survivors=[0, 9], dropped=[])],
                         ids=["not-a-survivor", "duplicate", "out-of-range"])
def test_a_client_refuses_a_malformed_unmask_request(request_):
    rnd = RelayedRound.through_key_sharing(config(4))
    rnd.mask(updates(4, 64), FixedPoint(BOUND, 4))
    with raises(SecAggAborted, SecAggCode.BAD_MESSAGE):
        rnd.clients[0].unmask(request_)


def test_a_client_refuses_to_unmask_too_few_survivors():
    rnd = RelayedRound.through_key_sharing(config(5))
    rnd.mask(updates(5, 64), FixedPoint(BOUND, 5))
    with raises(SecAggAborted, SecAggCode.TOO_FEW_CLIENTS):
        rnd.clients[0].unmask(UnmaskRequest(survivors=[0, 1], dropped=[2, 3, 4]))


def test_a_client_masks_once_and_only_a_valid_encoding():
    rnd = RelayedRound.through_key_sharing(config(3))
    client, fp = rnd.clients[0], FixedPoint(BOUND, 3)
    for bad in (torch.zeros(63, dtype=torch.int64), torch.zeros(64, dtype=torch.int32),
                torch.full((64,), 2 ** 32, dtype=torch.int64), torch.full((64,), -1, dtype=torch.int64)):
        with raises(SecAggRejected, SecAggCode.BAD_INPUT):
            client.masked_input(bad)
    client.masked_input(fp.encode(torch.zeros(64)))
    with raises(SecAggRejected, SecAggCode.WRONG_STATE):
        client.masked_input(fp.encode(torch.ones(64)))  # a second input under the same masks


# Tampering, forgery and replay


def _advert(cfg: SecAggConfig, index: int) -> Advertisement:
    return SecAggClient(cfg, index, IDENTITIES[index]).advertise()


def test_the_coordinator_rejects_tampered_forged_and_replayed_advertisements():
    cfg = config(4)
    server = SecAggServer(cfg)
    honest = _advert(cfg, 1)
    tampered = dataclasses.replace(honest, s_public=bytes(a ^ b for a, b in zip(honest.s_public, b"\1" + bytes(31))))
    other_round = _advert(config(4, round_=2), 1)
    other_job = _advert(config(4, job="job-b"), 1)
    forged = dataclasses.replace(honest, index=2)  # client 1's keys passed off as client 2's
    impostor = SecAggClient(cfg, 3, IDENTITIES[3]).advertise()
    impostor = dataclasses.replace(impostor, index=0)  # signed by node 3, claimed for node 0
    for bad in (tampered, other_round, other_job, forged, impostor):
        with raises(SecAggRejected, SecAggCode.BAD_SIGNATURE, client=bad.index):
            server.collect_advert(bad)
    for bad in (dataclasses.replace(honest, index=4), dataclasses.replace(honest, c_public=b"short")):
        with raises(SecAggRejected, SecAggCode.BAD_MESSAGE):
            server.collect_advert(bad)
    server.collect_advert(honest)
    with raises(SecAggRejected, SecAggCode.DUPLICATE, client=1):
        server.collect_advert(honest)


def test_an_advertisement_with_a_small_order_key_is_refused():
    cfg = config(4)
    client = SecAggClient(cfg, 0, IDENTITIES[0])
    advert = client.advertise()
    advert = dataclasses.replace(advert, s_public=bytes(32))  # the identity point: every agreement is zero
    advert.signature = IDENTITIES[0].sign(client.round.advert_payload(advert))
    with raises(SecAggRejected, SecAggCode.BAD_MESSAGE, client=0):
        SecAggServer(cfg).collect_advert(advert)


def test_a_client_refuses_a_roster_that_does_not_verify_or_leaves_it_out():
    cfg = config(4)
    clients = [SecAggClient(cfg, i, IDENTITIES[i]) for i in range(4)]
    adverts = [c.advertise() for c in clients]
    swapped = adverts[:2] + [dataclasses.replace(adverts[2], c_public=adverts[3].c_public)] + adverts[3:]
    with raises(SecAggAborted, SecAggCode.BAD_SIGNATURE, client=2):
        clients[0].share_keys(swapped)
    with raises(SecAggRejected, SecAggCode.WRONG_STATE):  # an aborted client answers nothing more
        clients[0].share_keys(adverts)
    with raises(SecAggAborted, SecAggCode.BAD_MESSAGE):
        clients[1].share_keys([a for a in adverts if a.index != 1])
    with raises(SecAggAborted, SecAggCode.DUPLICATE):
        clients[2].share_keys(adverts + [adverts[0]])
    with raises(SecAggAborted, SecAggCode.TOO_FEW_NEIGHBOURS):  # threshold 2 of 3: one neighbour is not enough
        clients[3].share_keys([adverts[0], adverts[3]])


def _shares_round(n: int = 4, **extra):
    cfg = config(n, **extra)
    server, clients = SecAggServer(cfg), [SecAggClient(cfg, i, IDENTITIES[i]) for i in range(n)]
    for client in clients:
        server.collect_advert(client.advertise())
    roster = server.roster()
    return server, clients, {c.index: c.share_keys(roster) for c in clients}


def _swap(batch: list[EncryptedShare], bad: EncryptedShare) -> list[EncryptedShare]:
    return [s for s in batch if s.recipient != bad.recipient] + [bad]


def test_tampered_rerouted_and_replayed_shares_are_rejected_by_coordinator_and_client():
    server, clients, shares = _shares_round()
    share = next(s for s in shares[1] if s.recipient == 0)
    flipped = dataclasses.replace(share, ciphertext=share.ciphertext[:-1] + bytes([share.ciphertext[-1] ^ 1]))
    rerouted = dataclasses.replace(share, recipient=2)  # client 1's share for 0 handed to 2
    _, _, other_round = _shares_round(round_=2)
    replayed = next(s for s in other_round[1] if s.recipient == 0)
    for bad in (flipped, rerouted, replayed):
        with raises(SecAggRejected, SecAggCode.BAD_SIGNATURE, client=1):
            server.collect_shares(1, _swap(shares[1], bad))
        # and straight to its recipient, past the coordinator's checks
        _, fresh_clients, fresh = _shares_round()
        honest = [s for sender in (0, 2, 3) for s in fresh[sender] if s.recipient == bad.recipient]
        with raises(SecAggAborted, SecAggCode.BAD_SIGNATURE, client=1):
            fresh_clients[bad.recipient].receive_shares(honest + [bad])


def test_a_share_signed_by_its_sender_but_sealed_for_another_pair_does_not_open():
    """A client that re-signs a share it was given, as if it were its own, still cannot make it open."""
    server, clients, shares = _shares_round()
    to_zero = next(s for s in shares[1] if s.recipient == 0)
    as_two = EncryptedShare(sender=2, recipient=0, ciphertext=to_zero.ciphertext, signature=b"")
    as_two.signature = IDENTITIES[2].sign(clients[0].round.share_payload(as_two))
    batch = [s for s in shares[2] if s.recipient != 0] + [as_two]
    server.collect_shares(2, batch)  # the coordinator can check the signature, not the sealing
    with raises(SecAggAborted, SecAggCode.BAD_CIPHERTEXT, client=2):
        clients[0].receive_shares([as_two] + [s for s in shares[1] + shares[3] if s.recipient == 0])


def test_the_coordinator_checks_every_sender_stage_and_vector():
    server, clients, shares = _shares_round()
    with raises(SecAggRejected, SecAggCode.BAD_MESSAGE):
        server.collect_shares(7, shares[1])
    with raises(SecAggRejected, SecAggCode.BAD_MESSAGE, client=0):
        server.collect_shares(0, shares[1])  # in another's name
    with raises(SecAggRejected, SecAggCode.BAD_MESSAGE, client=1):
        server.collect_shares(1, shares[1][:-1])  # one neighbour left without its share
    with raises(SecAggRejected, SecAggCode.WRONG_STATE):
        server.collect_masked(1, torch.zeros(64, dtype=torch.int64))
    for client in clients:
        server.collect_shares(client.index, shares[client.index])
    with raises(SecAggRejected, SecAggCode.DUPLICATE, client=2):
        server.collect_shares(2, shares[2])
    routed = server.route_shares()
    for client in clients:
        client.receive_shares(routed[client.index])
    masked = clients[0].masked_input(FixedPoint(BOUND, 4).encode(torch.zeros(64)))
    for bad in (masked[:10], masked.to(torch.int32), masked.reshape(8, 8), masked + 2 ** 32):
        with raises(SecAggRejected, SecAggCode.BAD_INPUT):
            server.collect_masked(0, bad)
    server.collect_masked(0, masked)
    with raises(SecAggRejected, SecAggCode.DUPLICATE, client=0):
        server.collect_masked(0, masked)
    for client in clients[1:]:
        server.collect_masked(client.index, clients[client.index].masked_input(
            FixedPoint(BOUND, 4).encode(torch.zeros(64))))
    request = server.unmask_request()
    reveals = clients[1].unmask(request)
    off_point = [dataclasses.replace(r, point=r.point % 3 + 1) if r.owner == 0 else r for r in reveals]
    not_asked = reveals + [RevealedShare(owner=2, kind="s", point=1, share=bytes(32))]
    for bad in (off_point, not_asked, reveals + reveals[:1]):
        with pytest.raises(SecAggRejected) as info:
            server.collect_reveals(1, bad)
        assert info.value.code in (SecAggCode.BAD_MESSAGE, SecAggCode.DUPLICATE)
    server.collect_reveals(1, reveals)
    with raises(SecAggRejected, SecAggCode.DUPLICATE, client=1):
        server.collect_reveals(1, reveals)


@pytest.mark.parametrize("change", [dict(clients=[IDENTITIES[0].public_key] * 3), dict(clients=[]),
                                    dict(graph_seed=b"short"), dict(neighbours=3), dict(threshold=2)],
                         ids=["repeated-key", "empty", "seed", "odd-neighbours", "threshold-at-half"])
def test_an_inconsistent_configuration_is_refused(change):
    cfg = dataclasses.replace(config(5), **change)
    with raises(SecAggAborted, SecAggCode.BAD_CONFIG):
        SecAggServer(cfg)


def test_a_client_refuses_a_roster_that_gives_its_index_another_key():
    with raises(SecAggAborted, SecAggCode.BAD_CONFIG, client=1):
        SecAggClient(config(5), 1, IDENTITIES[2])


def test_messages_travel_through_msgpack_and_parse_back_as_wire_arguments():
    cfg = config(4)
    server, clients, shares = _shares_round()
    for message in (cfg, _advert(cfg, 0), shares[0][0], UnmaskRequest(survivors=[0, 1], dropped=[2]),
                    RevealedShare(owner=1, kind="b", point=2, share=bytes(16))):
        wire = msgpack.unpackb(msgpack.packb(to_wire(message)))
        assert parse_args(type(message), wire) == message


# What the coordinator sees


def test_a_masked_input_looks_uniform_and_uncorrelated_with_the_update():
    """One client's masked vector of a very structured update (a ramp), 1M elements: the top and bottom 16
    bits of its words fill 2**16 buckets evenly (chi-square), and it does not correlate with the input.
    The round around it still sums right."""
    n, length = 3, 1 << 20
    fp = FixedPoint(BOUND, n)
    inputs = {i: torch.linspace(-BOUND, BOUND, length) * (i + 1) / n for i in range(n)}
    rnd = RelayedRound.through_key_sharing(config(n, length=length))
    encoded = fp.encode(inputs[0])
    masked = rnd.clients[0].masked_input(encoded)
    rnd.server.collect_masked(0, masked)
    for i in (1, 2):
        rnd.server.collect_masked(i, rnd.clients[i].masked_input(fp.encode(inputs[i])))
    buckets = 1 << 16
    expected = length / buckets
    for part in (masked >> 16, masked & 0xFFFF):
        chi2 = float(((torch.bincount(part, minlength=buckets).double() - expected) ** 2 / expected).sum())
        assert abs(chi2 - (buckets - 1)) < 6 * math.sqrt(2 * (buckets - 1))
    correlation = torch.corrcoef(torch.stack([masked.double(), inputs[0].double()]))[0, 1]
    assert abs(float(correlation)) < 5 / math.sqrt(length)
    assert_sum(rnd.unmask(), fp, inputs)


def test_masks_are_the_aes_ctr_keystream_of_their_key():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = bytes(range(32))
    stream = Cipher(algorithms.AES256(key), modes.CTR(bytes(16))).encryptor().update(bytes(4 * 1000))
    words = [int.from_bytes(stream[4 * i:4 * i + 4], "little") for i in range(1000)]
    assert mask(key, 1000).tolist() == words
    assert not torch.equal(mask(key, 1000), mask(bytes(31) + b"\1", 1000))


# SecAgg+


def test_a_large_round_uses_a_sparse_graph_and_sums_with_two_dropouts():
    n = 20
    cfg = config(n)
    rnd = RelayedRound.through_key_sharing(cfg)
    k = 2 * math.ceil(math.log2(n))
    graph = rnd.server.round
    assert graph.degree == k == 10 and graph.threshold == 6
    for u in range(n):
        assert len(graph.neighbours(u)) == k and u not in graph.neighbours(u)
        assert all(u in graph.neighbours(v) for v in graph.neighbours(u))
        assert len(rnd.routed[u]) == k
    assert rnd.clients[7].round.neighbours(7) == graph.neighbours(7)  # everyone draws the same graph
    other = SecAggServer(dataclasses.replace(cfg, graph_seed=bytes(32))).round
    assert any(other.neighbours(u) != graph.neighbours(u) for u in range(n))
    fp = FixedPoint(BOUND, n)
    survivors = {i: x for i, x in updates(n, 64).items() if i not in (5, 13)}
    rnd.mask(survivors, fp)
    assert rnd.server.unmask_request().dropped == [5, 13]
    assert_sum(rnd.unmask(), fp, survivors)


def test_rounds_up_to_the_complete_size_neighbour_everyone():
    for n, complete in ((8, True), (9, True), (12, False)):
        graph = SecAggServer(config(n)).round
        assert (graph.degree == n - 1) is complete
