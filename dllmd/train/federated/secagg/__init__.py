"""Secure aggregation for federated rounds: the coordinator learns the sum of the clients' update vectors
and nothing else about any one of them (SecAgg, Bonawitz et al. 2017, with SecAgg+'s sparse neighbour
graph, Bell et al. 2020). No networking: a daemon carries the messages.

One round, as the coordinator relays it::

    config = SecAggConfig(job, round, clients=[node keys...], graph_seed=os.urandom(32), length=n)
    clients: SecAggClient(config, index, identity)      server: SecAggServer(config)
    1. advertise() -> Advertisement                  -> collect_advert(...); roster() -> list[Advertisement]
    2. share_keys(roster) -> list[EncryptedShare]    -> collect_shares(index, ...); route_shares() -> {index: [...]}
    3. receive_shares(routed[index])
       masked_input(FixedPoint.encode(update))       -> collect_masked(index, tensor); unmask_request()
    4. unmask(request) -> list[RevealedShare]        -> collect_reveals(index, ...); aggregate() -> modular sum
    FixedPoint.decode_sum(sum, len(server.survivors)) -> the float sum

Modules: ``fixedpoint`` (floats to integers mod 2**bits), ``masks`` (the AES-CTR mask generator),
``shamir`` (t-of-n shares), ``graph`` (who neighbours whom), ``crypto`` (key derivation, agreement and
sealing), ``round`` (what all parties derive from the config), ``messages`` (wire dataclasses),
``client`` and ``server`` (the two state machines), ``errors`` (codes).
"""

from dllmd.train.federated.secagg.client import SecAggClient
from dllmd.train.federated.secagg.errors import SecAggAborted, SecAggCode, SecAggError, SecAggRejected
from dllmd.train.federated.secagg.fixedpoint import FixedPoint
from dllmd.train.federated.secagg.messages import (Advertisement, EncryptedShare, RevealedShare, SecAggConfig,
                                                   UnmaskRequest)
from dllmd.train.federated.secagg.server import SecAggServer

__all__ = ["Advertisement", "EncryptedShare", "FixedPoint", "RevealedShare", "SecAggAborted", "SecAggClient",
           "SecAggCode", "SecAggConfig", "SecAggError", "SecAggRejected", "SecAggServer", "UnmaskRequest"]
