"""Who may call what: every operation a daemon serves and the roles allowed to call it, in one table.

The table is the only place roles are decided. ``Operation`` takes its roles from here, and
``RpcServer.register`` refuses an operation that has no entry, so an operation added later
(relays, pairing, metrics) cannot be served until someone decides who may call it, and the role
test (tests/test_roles.py), which walks this table with a key of every role and a stranger, covers
it by construction.

Roles: ``admin`` (the owner's keys), ``client`` (people and programs that run inference and read
jobs), ``peer`` (the other daemons of the owner's cluster: stages, ring neighbours, coordinators),
``federation`` (another organization's coordinator: federated rounds only), ``relay`` (a relay node's
key: it carries sealed session traffic for others with a client's rights, and may call only the
relay and session operations, not even ``info``). A key that is not
authorized gets no answer at all (ZAP refuses its handshake).
"""

from __future__ import annotations

from dllmd.net.keys import Role

A, C, P, F, R = Role.ADMIN, Role.CLIENT, Role.PEER, Role.FEDERATION, Role.RELAY

_GROUPS: dict[frozenset[Role], tuple[str, ...]] = {
    # Liveness only: a federated coordinator may see that the node is up.
    frozenset({A, C, P, F}): ("ping",),
    # What a client of the cluster does: the node's card.
    frozenset({A, C, P}): ("info",),
    # Inference sessions: a client's (or a relay's, for the client behind it), a peer's (the previous stage).
    frozenset({A, C, P, R}): ("session.open", "session.forward", "session.close", "session.keepalive"),
    # Relayed session traffic (dllmd/inference/relay.py): from a client or the relay before; never from a
    # peer, whose rights on sessions are wider than a client's.
    frozenset({A, C, R}): ("relay.forward", "relay.deliver"),
    # Reading jobs on their coordinator; what the node is doing now (load, tokens, traffic: 'dllmctl top').
    frozenset({A, C}): ("node.stats", "jobs.list", "jobs.show", "jobs.metrics", "checkpoints.list"),
    # The owner's: keys, models, data, deployments, jobs, benchmarks. echo (a payload mirrored back) is
    # a debugging tool: a client could make the node hold and send whatever it sends.
    frozenset({A}): ("echo", "keys.list", "keys.authorize", "keys.revoke", "peers.ping",
                     "model.offer", "model.put", "model.remove", "span.load", "span.unload", "group.connect",
                     "data.stage", "data.stage_patch", "data.put", "data.commit", "data.abort", "data.list",
                     "data.describe", "data.remove", "data.local",
                     "jobs.submit", "jobs.stop", "jobs.resume", "checkpoints.read",
                     "ring.open", "ring.form", "ring.run", "ring.close"),
    # A job's coordinator and its workers, within the owner's cluster.
    frozenset({A, P}): ("train.prepare", "train.ring", "train.backup", "train.rows", "train.step", "train.apply",
                        "train.reset", "train.probe", "train.state", "train.load_state", "train.release", "train.links",
                        "train.pipe", "train.stage_step", "train.stage_apply", "train.save_part",
                        "train.read_part", "train.fetch_part", "train.load_part",
                        "train.inner", "train.sync", "train.outer", "train.evaluate", "train.stage_evaluate"),
    # Federated rounds: the owner's coordinator or another organization's (datasets it opened only).
    frozenset({A, P, F}): ("fed.prepare", "fed.load", "fed.train", "fed.update", "fed.release", "fed.evaluate",
                           "fed.secagg_advertise", "fed.secagg_share", "fed.secagg_mask", "fed.secagg_unmask"),
}

ROLE_TABLE: dict[str, frozenset[Role]] = {name: roles for roles, names in _GROUPS.items() for name in names}
assert len(ROLE_TABLE) == sum(len(names) for names in _GROUPS.values()), "an operation is listed twice"


class UnlistedOperation(KeyError):
    """An operation registered without an entry in the role table."""


def roles_of(name: str) -> frozenset[Role]:
    try:
        return ROLE_TABLE[name]
    except KeyError:
        raise UnlistedOperation(f"operation {name!r} has no entry in the role table (dllmd/net/roles.py): decide "
                                f"who may call it there") from None
