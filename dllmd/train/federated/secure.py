"""A round's sum under secure aggregation: the coordinator relays the protocol between the round's
clients (``dllmd.train.federated.secagg``) and learns only the sum of their updates.

Four exchanges, each with every client at once: advertise keys, share them (sealed for each
recipient; the coordinator only routes), mask the update (then fetched, masked, chunk by chunk),
reveal the shares that remove the masks. A client that fails an exchange is left out of the rest; the
protocol recovers its masks if enough others remain, and otherwise the round fails with the
protocol's code (event ``secagg_failed``) and is tried again without the nodes that are gone.
"""

from __future__ import annotations

import asyncio
import logging
import os

import msgpack
import torch

from dllmd.net.client import CallError
from dllmd.net.messages import federated as F
from dllmd.net.schema import parse_reply, to_wire
from dllmd.train.federated.ops import from_int32
from dllmd.train.federated.secagg import FixedPoint, SecAggAborted, SecAggConfig, SecAggRejected, SecAggServer

log = logging.getLogger("dllmd.coordinator")

CALL_TIMEOUT_S = 300.0  # masking expands one AES-CTR stream per neighbour over the whole update


class SecureSum:
    def __init__(self, run):
        self.run = run
        self.protocol_bytes = 0  # keys, shares and reveals exchanged (msgpack), this round, all clients

    def _count(self, message) -> None:
        self.protocol_bytes += len(msgpack.packb(message if isinstance(message, dict) else to_wire(message)))

    async def sum(self, round: int, order: list[str], by_key, bound: float) -> tuple[torch.Tensor | None, list[str]]:
        """The sum of the updates of ``order``'s clients that made it through, and who they are (an empty
        list if the round cannot be summed). ``bound``: the elements' range the clients encoded with."""
        run = self.run
        self.protocol_bytes = 0
        config = SecAggConfig(job=run.job, round=round, clients=list(order), graph_seed=os.urandom(32),
                              length=run.model.weights.numel())
        try:
            if len(order) < 3:  # with two, each would learn the other's update from the sum
                raise SecAggAborted("too_few_clients", f"{len(order)} client(s) trained; secure aggregation "
                                                       f"needs at least 3")
            server = SecAggServer(config)
            nodes = [by_key[k] for k in order]
            adverts = await self._each(nodes, F.FED_ADVERTISE, round, lambda i: {"config": to_wire(config)})
            for i, advert in adverts.items():
                self._take(server.collect_advert, advert, nodes[i], round)
            roster = [to_wire(a) for a in server.roster()]
            shares = await self._each(nodes, F.FED_SHARE, round, lambda i: {"roster": roster}, only=adverts)
            for i, reply in shares.items():
                self._take(lambda r, i=i: server.collect_shares(i, r.shares), reply, nodes[i], round)
            routed = server.route_shares()
            masked = await self._each(nodes, F.FED_MASK, round, lambda i: {"shares": [to_wire(s) for s in routed[i]]},
                                      only=routed)
            for i in sorted(masked):
                try:
                    vector = from_int32(await run.fetch(nodes[i], round, torch.int32))
                except CallError as exc:
                    log.warning("job %s round %d: no masked update from %s: %s", run.job, round, nodes[i].name, exc)
                    continue
                self._take(lambda v, i=i: server.collect_masked(i, v), vector, nodes[i], round)
            request = server.unmask_request()
            reveals = await self._each(nodes, F.FED_UNMASK, round, lambda i: {"request": to_wire(request)},
                                       only=request.survivors)
            for i, reply in reveals.items():
                self._take(lambda r, i=i: server.collect_reveals(i, r.reveals), reply, nodes[i], round)
            total = await asyncio.to_thread(server.aggregate)
        except SecAggAborted as exc:
            who = f" ({by_key[order[exc.client]].name})" if exc.client is not None and exc.client < len(order) else ""
            run.store.event(run.job, "secagg_failed", f"round {round}: {exc.code}: {exc.message}{who}")
            return None, []
        survivors = server.survivors
        encoding = FixedPoint(bound, len(order), config.bits)
        return encoding.decode_sum(total, len(survivors)), [order[i] for i in survivors]

    async def _each(self, nodes, op, round: int, args, only=None) -> dict[int, object]:
        """``op`` on every client (``only`` those indices), with its round's arguments; the replies of
        those that answered, by index."""
        run = self.run
        indices = sorted(only) if only is not None else range(len(nodes))

        async def one(i):
            request = {"job": run.job, "round": round, **args(i)}
            reply, _ = await run.c.service.call(nodes[i], op.name, request, timeout=CALL_TIMEOUT_S)
            self._count(request)
            self._count(reply)
            return parse_reply(op.reply, reply)
        results = await asyncio.gather(*(one(i) for i in indices), return_exceptions=True)
        answered = {}
        for i, result in zip(indices, results):
            if isinstance(result, BaseException):
                log.warning("job %s: %s failed %s: %s", run.job, nodes[i].name, op.name, result)
                run.store.event(run.job, "client_dropped", f"{nodes[i].name} failed {op.name}: {result}")
            else:
                answered[i] = result
        return answered

    def _take(self, collect, message, node, round: int) -> None:
        """Hand one client's message to the server; one it refuses leaves that client out (as dropped)."""
        try:
            collect(message)
        except SecAggRejected as exc:
            self.run.store.event(self.run.job, "client_dropped", f"round {round}: {node.name}: secure aggregation "
                                                                 f"refused its message: {exc.code}: {exc.message}")
