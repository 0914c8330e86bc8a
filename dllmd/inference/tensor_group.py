"""A tensor-parallel group: members that each hold a slice of every layer of one span and run every
pass together, summing their partial results after attention and after the MLP.

Rank 0, the *leader*, is the stage the rest of the system sees: sessions open there, steps arrive
there, the scheduler batches there, and it pushes the group's output on to the next stage or samples
the token. For every pass it first sends the other members (the *followers*) the pass itself - which
sessions, their positions, the input - and then all members run the same layers; a follower runs its
passes on a thread of its own, in the order the leader sent them, so every member's caches see the
same steps.

The reductions are latency-bound (a few KiB per token), so they use the simplest exchange: every member
sends its partial to every other one and adds all of them up in rank order. Every member adds the same
bytes in the same order, so all end with bitwise identical sums and the next layer sees the same input
everywhere. Each pair of members shares one direct link (:mod:`dllmd.net.bulk.direct`): the thread that
computes seals and writes its partial, and reads and opens the others', with no event loop and no I/O
thread between a matmul and its reduction (each would cost a wake-up, and on a home machine a wake-up
costs more than the transfer). The links are opened by the bulk handshake (Noise KK over both node
keys, fresh keys per link): the higher rank dials, the lower one's listener admits only members of
the group it has taken its place in, so every message is known to come from the member of its rank.

Messages are tagged with the leader's command number (``seq``) and the reduction's index within it. A
member that cannot go on with a pass (an error, a member silent past the timeout) tells every other
one (``ABORT``), so the whole group gives the pass up together; late messages of a given-up pass are
recognised by their number and dropped.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgpack
import numpy as np
import torch

from dllmd.net.bulk.connect import HANDSHAKE_TIMEOUT_S, LinkListener, dial_blocking, split_endpoint
from dllmd.net.bulk.direct import DirectLink, LinkBroken, LinkTimeout
from dllmd.net.bulk.handshake import Hello, LinkKeys, Mode
from dllmd.net.bulk.link import BulkLinkCode, BulkLinkError
from dllmd.net.codec import DEFAULT_BLOCK, CodecError, HopCodec, pack_partial, unpack_partial
from dllmd.net.identity import Identity
from dllmd.net.wire import ITEMSIZE

log = logging.getLogger("dllmd.tensor")

TAG = struct.Struct("!BQI")  # kind, command number, index within the command
PASS, OPEN, CLOSE, ACK, PARTIAL, GATHER, ABORT = range(1, 8)
REDUCE_TIMEOUT_S = 5.0  # a member silent this long mid-pass is taken for dead
POLL_MS = 200  # how often an idle follower checks whether it should stop
DIAL_RETRY_S = 0.05  # a member dialling one that has not taken its place in the group yet


class GroupError(RuntimeError):
    """The group could not finish a command: a member failed, gave up, or did not answer."""

    def __init__(self, message: str, member: int | None = None, fatal: bool = False):
        super().__init__(message)
        self.member = member
        self.fatal = fatal  # a member is gone: the group cannot run any more passes


@dataclass(frozen=True)
class GroupMember:
    public_key: str  # Ed25519, hex
    endpoint: str  # its group socket, tcp://host:port


@dataclass
class PassSpec:
    """One pass as the leader ran it, for the followers to run the same: ``one`` step of one session
    (a prefill chunk or a lone decode step) starting at ``start``, or a ``batch`` of decode steps."""

    mode: str
    sessions: list[str]
    start: int = 0
    keep: int = 1  # logits_to_keep of a lone step (0: all positions)
    wants: list[str] | None = None  # head only, per row: "token" (greedy id) or "logits" (the whole row)
    keeps: list[int] | None = None  # a "packed" pass (prefill chunks, never a group's): keep per session
    hops: HopCodec = HopCodec()  # how the pass's partial sums travel (fp32: exact)

    def to_wire(self) -> dict:
        return {"mode": self.mode, "sessions": self.sessions, "start": self.start, "keep": self.keep,
                "wants": self.wants, "hops": [self.hops.encoding, self.hops.block]}

    @classmethod
    def from_wire(cls, doc: dict) -> "PassSpec":
        encoding, block = doc.get("hops", ("fp32", DEFAULT_BLOCK))
        return cls(mode=str(doc["mode"]), sessions=[str(s) for s in doc["sessions"]], start=int(doc["start"]),
                   keep=int(doc["keep"]), wants=None if doc["wants"] is None else [str(w) for w in doc["wants"]],
                   hops=HopCodec(str(encoding), int(block)))


def _tensor_header(tensor: torch.Tensor) -> dict:
    return {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}


def _tensor(header: dict, data: bytes) -> torch.Tensor:
    dtype, shape = header["dtype"], [int(n) for n in header["shape"]]
    if dtype not in ITEMSIZE:
        raise GroupError(f"a pass carried an input of unknown dtype {dtype!r}")
    count = 1
    for n in shape:
        count *= n
    if count * ITEMSIZE[dtype] != len(data):
        raise GroupError(f"a pass's input is {len(data)} bytes, not the {count * ITEMSIZE[dtype]} its shape says")
    return torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).reshape(shape)


class GroupChannel:
    """One member's links to the others: one direct link (:mod:`dllmd.net.bulk.direct`) per other member,
    dialled by the higher rank, accepted by the lower one on this member's listener. Used by one thread
    at a time (the compute thread of the leader, the follow thread of a follower); the listener runs
    the handshakes on the event loop it was made on."""

    def __init__(self, identity: Identity, host: str, max_message_bytes: int, spin_s: float = 0.0):
        self.identity = identity
        self.max_message_bytes, self.spin_s = max_message_bytes, spin_s
        self._loop = asyncio.get_running_loop()
        self._listener = LinkListener(identity, host, 0, self._admit, self._adopt, wrap=self._wrap)
        self.port = self._listener.port
        self.rank = 0
        self.members: list[GroupMember] = []
        self._ranks: dict[str, int] = {}  # a member's public key -> its rank
        self._links: dict[int, DirectLink] = {}
        self._queues: dict[int, deque[list[bytes]]] = {}
        self._arrived = threading.Condition()  # the loop adopts accepted links; the channel's thread waits
        self._closed = False

    def connect(self, rank: int, members: Sequence[GroupMember]) -> None:
        """Take this member's place in the group (the links are made on first use)."""
        with self._arrived:
            for link in self._links.values():
                link.close()
            self.rank, self.members = rank, list(members)
            self._links, self._queues = {}, {r: deque() for r in range(len(members))}
            self._ranks = {m.public_key: r for r, m in enumerate(members)}

    def close(self) -> None:
        with self._arrived:
            self._closed = True
            for link in self._links.values():
                link.close()
            self._links = {}
            self._arrived.notify_all()
        if _running_loop() is self._loop:
            self._listener.close()
            return
        try:
            self._loop.call_soon_threadsafe(self._listener.close)
        except RuntimeError:  # the loop is gone, and its listener with it
            pass

    @property
    def size(self) -> int:
        return len(self.members)

    def others(self) -> list[int]:
        return [r for r in range(self.size) if r != self.rank]

    # --- links ---------------------------------------------------------------------------------------

    def _admit(self, hello: Hello) -> bool:
        """Only a member of the group, of a higher rank, to this listener (the port is the generation)."""
        rank = self._ranks.get(hello.initiator_key)
        return (not self._closed and rank is not None and rank > self.rank and hello.generation == self.port
                and hello.mode == Mode.AEAD)

    def _wrap(self, sock: socket.socket, keys: LinkKeys | None, peer: str) -> DirectLink:
        return DirectLink(sock, keys, peer, self.max_message_bytes, self.spin_s)

    def _adopt(self, hello: Hello, link: DirectLink) -> None:
        with self._arrived:
            rank = self._ranks.get(hello.initiator_key)
            if self._closed or rank is None or rank in self._links:
                link.close()  # the group changed meanwhile, or a second link from one member
                return
            self._links[rank] = link
            self._arrived.notify_all()

    def _link(self, rank: int, deadline: float) -> DirectLink:
        """The link to ``rank``: dialled now if it is lower, else waited for (until ``deadline``)."""
        link = self._links.get(rank)
        if link is not None:
            return link
        member = self.members[rank]
        if rank > self.rank:
            with self._arrived:
                while rank not in self._links and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise GroupError(f"member {rank} ({member.endpoint}) did not link to this member", rank)
                    self._arrived.wait(left)
                if self._closed:
                    raise GroupError("this member left the group", fatal=True)
                return self._links[rank]
        while True:
            try:
                sock, keys = dial_blocking(self.identity, member.endpoint, member.public_key, _port_of(member.endpoint),
                                           timeout_s=max(0.1, min(HANDSHAKE_TIMEOUT_S, deadline - time.monotonic())))
                break
            except BulkLinkError as exc:
                if exc.code == BulkLinkCode.PEER_MISMATCH:
                    raise GroupError(f"member {rank} at {member.endpoint}: {exc}", rank, fatal=True) from None
                if time.monotonic() + DIAL_RETRY_S >= deadline:  # it may not have taken its place yet
                    raise GroupError(f"cannot link to member {rank}: {exc}", rank) from None
                time.sleep(DIAL_RETRY_S)
        link = DirectLink(sock, keys, member.public_key, self.max_message_bytes, self.spin_s)
        with self._arrived:
            if self._closed:
                link.close()
                raise GroupError("this member left the group", fatal=True)
            self._links[rank] = link
        return link

    def _lost(self, rank: int, exc: Exception) -> GroupError:
        return GroupError(f"member {rank} ({self.members[rank].endpoint}) is unreachable: {exc}", rank, fatal=True)

    # --- messages ------------------------------------------------------------------------------------

    def send(self, rank: int, kind: int, seq: int, index: int, *payload: bytes | memoryview) -> None:
        self._send(rank, [TAG.pack(kind, seq, index), *payload])

    def send_all(self, kind: int, seq: int, index: int, *payload: bytes | memoryview) -> None:
        frames = [TAG.pack(kind, seq, index), *payload]
        for rank in range(self.size):
            if rank != self.rank:
                self._send(rank, frames)

    def _send(self, rank: int, frames: list) -> None:
        link = self._links.get(rank) or self._link(rank, time.monotonic() + REDUCE_TIMEOUT_S)
        try:
            link.send(frames, REDUCE_TIMEOUT_S)
        except LinkBroken as exc:
            raise self._lost(rank, exc) from None

    def tell_linked(self, kind: int, seq: int, index: int, *payload: bytes) -> None:
        """Send to every member already linked, ignoring any that is not (an abort, on the way out)."""
        for rank, link in list(self._links.items()):
            try:
                link.send([TAG.pack(kind, seq, index), *payload], 1.0)
            except (LinkBroken, ValueError):
                pass

    def _pull(self, rank: int, timeout_s: float) -> None:
        """Move the next message from ``rank`` into its queue, if one arrives within ``timeout_s``."""
        link = self._links.get(rank) or self._link(rank, time.monotonic() + timeout_s)
        try:
            frames = link.receive(timeout_s)
        except LinkTimeout:
            return
        except LinkBroken as exc:
            raise self._lost(rank, exc) from None
        if not frames or len(frames[0]) != TAG.size:
            raise GroupError(f"member {rank} sent a message without a tag", rank, fatal=True)
        self._queues[rank].append(frames)

    def receive(self, rank: int, seq: int, index: int, kinds: tuple[int, ...],
                timeout_s: float = REDUCE_TIMEOUT_S) -> list[bytes]:
        """The next message of command ``seq`` from ``rank`` (its payload frames). Raises GroupError when
        that member aborts the command, has moved past it, or says nothing within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        queue = self._queues[rank]
        while True:
            while queue:
                kind, got_seq, got_index = TAG.unpack(queue[0][0])
                if got_seq < seq or (got_seq == seq and got_index < index and kind != ABORT):
                    queue.popleft()  # left over from a command that was given up
                    continue
                if got_seq > seq:
                    raise GroupError(f"member {rank} has moved past command {seq}", rank)
                frames = queue.popleft()
                if kind == ABORT:
                    raise GroupError(f"member {rank} gave up: {frames[1].decode(errors='replace')}", rank)
                if kind not in kinds or got_index != index:
                    raise GroupError(f"member {rank} sent message kind {kind} #{got_index} where kind {kinds} "
                                     f"#{index} was due", rank)
                return frames[1:]
            left = deadline - time.monotonic()
            if left <= 0:
                raise GroupError(f"member {rank} ({self.members[rank].endpoint}) did not answer within "
                                 f"{timeout_s:g}s", rank, fatal=True)
            self._pull(rank, left)

    def wait_any(self, rank: int, timeout_s: float) -> bool:
        """Whether a message from ``rank`` is waiting (after up to ``timeout_s`` of waiting for one). A
        member not linked yet, or gone, is waited for as one that says nothing."""
        if self._queues[rank]:
            return True
        started = time.monotonic()
        try:
            self._pull(rank, timeout_s)
        except GroupError:
            time.sleep(max(0.0, timeout_s - (time.monotonic() - started)))
            return False
        return bool(self._queues[rank])

    def peek_tag(self, rank: int) -> tuple[int, int, int]:
        return TAG.unpack(self._queues[rank][0][0])

    def drop_next(self, rank: int) -> None:
        self._queues[rank].popleft()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _port_of(endpoint: str) -> int:
    return split_endpoint(endpoint)[1]


class TensorGroup:
    """This node's membership in one tensor-parallel group (of one model's span)."""

    def __init__(self, channel: GroupChannel, group: str, rank: int, vocab_lo: int = 0):
        self.channel, self.group, self.rank = channel, group, rank
        self.vocab_lo = vocab_lo  # the first vocabulary row of this member's head slice
        self.seq = 0  # the leader's command number; followers take it from each command
        self._index = 0  # reductions so far within the current command
        self.broken: str | None = None  # why the group can no longer run passes
        self.reductions = 0
        self.reduce_s = 0.0
        self.wait_s = 0.0
        self.hops = HopCodec()  # the current pass's encoding of partial sums

    @property
    def size(self) -> int:
        return self.channel.size

    @property
    def leader(self) -> bool:
        return self.rank == 0

    # --- within a pass (every member) --------------------------------------------------------------

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum of every member's ``partial`` of this reduction, added in rank order (bitwise the
        same on every member)."""
        if self.hops.encoding != "fp32":
            return self._reduce_encoded(partial)
        started = time.perf_counter()
        index = self._index
        self._index += 1
        # Every torch or numpy call here costs microseconds between two matmuls that evict the caches,
        # sixty times a token: the fewest that do the job (one view of the partial, one copy, adds).
        local = partial if partial.device.type == "cpu" else partial.detach().cpu()
        if local.dtype == torch.bfloat16:  # numpy has no bfloat16: carried as its 16-bit words
            local = local.contiguous().view(torch.int16)
        mine = local.detach().contiguous().numpy()
        self.channel.send_all(PARTIAL, self.seq, index, mine)
        waited = 0.0
        parts = []
        for rank in range(self.size):
            if rank == self.rank:
                parts.append(mine)
                continue
            before = time.perf_counter()
            (data,) = self.channel.receive(rank, self.seq, index, (PARTIAL,))
            waited += time.perf_counter() - before
            if len(data) != mine.nbytes:
                raise GroupError(f"member {rank}'s partial is {len(data)} bytes, not {mine.nbytes}: the members "
                                 f"disagree on the pass", rank)
            parts.append(np.frombuffer(data, dtype=mine.dtype).reshape(mine.shape))
        if partial.dtype == torch.bfloat16:
            words = [torch.from_numpy(part.copy()).view(torch.bfloat16) for part in parts]
            total = words[0]
            for word in words[1:]:
                total = total + word
        else:
            # Added in rank order on every member, elementwise IEEE: bitwise the same sum everywhere. The
            # first add makes the sum's own array; a lone member's is a copy of its partial.
            total = torch.from_numpy(np.add(parts[0], parts[1]) if len(parts) > 1 else parts[0].copy())
            for part in parts[2:]:
                np.add(total.numpy(), part, out=total.numpy())
        self.reductions += 1
        self.reduce_s += time.perf_counter() - started
        self.wait_s += waited
        return total if partial.device.type == "cpu" else total.to(partial.device)

    def _reduce_encoded(self, partial: torch.Tensor) -> torch.Tensor:
        """The reduction with partials sent in ``self.hops``' encoding (fp16, blockwise int8): every member
        sums the dequantized form of every partial, its own included, in rank order, so all members
        still end bitwise identical (to each other; the sum is within the codec's error of the exact one)."""
        started = time.perf_counter()
        index = self._index
        self._index += 1
        local = partial.detach().to("cpu").contiguous()
        mine = pack_partial(local, self.hops)
        self.channel.send_all(PARTIAL, self.seq, index, mine)
        total, waited = None, 0.0
        for rank in range(self.size):
            payload = mine
            if rank != self.rank:
                before = time.perf_counter()
                (payload,) = self.channel.receive(rank, self.seq, index, (PARTIAL,))
                waited += time.perf_counter() - before
            try:
                value = unpack_partial(payload, local, self.hops.block)
            except CodecError as exc:
                raise GroupError(f"member {rank}'s partial: {exc}: the members disagree on the pass", rank) from None
            total = value if total is None else total.add_(value)
        self.reductions += 1
        self.reduce_s += time.perf_counter() - started
        self.wait_s += waited
        return total.to(partial.dtype).to(partial.device)

    def abort(self, why: str) -> None:
        """Tell every other member this command is given up (they stop at their next wait for it)."""
        self.channel.tell_linked(ABORT, self.seq, self._index, why.encode()[:1000])

    # --- the leader ---------------------------------------------------------------------------------

    def _command(self, kind: int, doc: dict, *payload: bytes | memoryview) -> int:
        if self.broken:
            raise GroupError(self.broken, fatal=True)
        self.seq += 1
        self._index = 0
        self.channel.send_all(kind, self.seq, 0, msgpack.packb(doc), *payload)
        return self.seq

    def _acks(self, seq: int) -> list[dict]:
        return [msgpack.unpackb(self.channel.receive(rank, seq, 0, (ACK,))[0]) for rank in self.channel.others()]

    def open(self, session: str, positions: int, ttl_s: float) -> None:
        """Reserve ``session``'s cache on every follower; GroupError with the first refusal."""
        seq = self._command(OPEN, {"session": session, "positions": positions, "ttl_s": ttl_s})
        refusals = [a for a in self._guarded(lambda: self._acks(seq)) if not a.get("ok")]
        if refusals:
            self.close([session])
            raise GroupError(str(refusals[0].get("error", "a member refused the session")))

    def close(self, sessions: Sequence[str]) -> None:
        if sessions and not self.broken:
            self._command(CLOSE, {"sessions": list(sessions)})

    def lead(self, spec: PassSpec, inputs: torch.Tensor, compute: Callable[[], list[torch.Tensor]]) -> list:
        """Run one pass on every member: send it to the followers, compute here (the reductions inside),
        and at the head gather what each row wants. Returns ``compute``'s outputs, where at the head
        each row is a greedy token id (``int``) or the whole row's logits."""
        cpu_inputs = inputs.detach().to("cpu").contiguous()
        self.hops = spec.hops
        seq = self._command(PASS, {"spec": spec.to_wire(), "input": _tensor_header(cpu_inputs)},
                            memoryview(cpu_inputs.view(torch.uint8).numpy()))
        outputs = self._guarded(compute)
        if spec.wants is None:
            return outputs
        return self._guarded(lambda: self._gather(seq, spec.wants, outputs))

    def _guarded(self, work: Callable):
        try:
            return work()
        except GroupError as exc:
            self._give_up(exc)
            raise
        except BaseException as exc:
            self.abort(f"the leader failed: {exc}")
            raise

    def _give_up(self, exc: GroupError) -> None:
        self.abort(str(exc))
        if exc.fatal:
            self.broken = f"tensor-parallel group {self.group} lost a member: {exc}"

    def _gather(self, seq: int, wants: list[str], outputs: list[torch.Tensor]) -> list:
        """At the head: each row's greedy token (the largest logit over every member's vocabulary rows,
        the lowest id on a tie, as argmax over the whole row would pick) or its whole logits."""
        mine = head_summary(wants, outputs, self.vocab_lo)
        theirs = [_unpack_summary(self.channel.receive(rank, seq, 0, (GATHER,)), wants)
                  for rank in self.channel.others()]
        results = []
        for row, want in enumerate(wants):
            rows = [mine[row], *[t[row] for t in theirs]]  # rank order
            if want == "token":
                best = max(rows, key=lambda pair: pair[0])  # max keeps the first of equals: the lowest ids
                results.append(int(best[1]))
            else:
                results.append(torch.cat(rows, dim=-1).unsqueeze(0))
        return results

    # --- a follower ----------------------------------------------------------------------------------

    def follow(self, stop: threading.Event, run_pass: Callable[[PassSpec, torch.Tensor], list[torch.Tensor]],
               open_session: Callable[[str, int, float], str | None], close_sessions: Callable[[list[str]], None]) -> None:
        """Run the leader's commands until ``stop`` is set (the follow thread's body)."""
        while not stop.is_set():
            if not self.channel.wait_any(0, POLL_MS / 1000):
                continue
            kind, seq, _ = self.channel.peek_tag(0)
            if kind not in (PASS, OPEN, CLOSE):
                self.channel.drop_next(0)  # the rest of a command this member already gave up
                continue
            self.seq, self._index = seq, 0
            try:
                frames = self.channel.receive(0, seq, 0, (PASS, OPEN, CLOSE))
            except GroupError:
                continue  # an abort or a stale message: the leader has given that command up
            try:
                doc = msgpack.unpackb(frames[0])
                if kind == OPEN:
                    error = open_session(str(doc["session"]), int(doc["positions"]), float(doc["ttl_s"]))
                    self.channel.send(0, ACK, seq, 0, msgpack.packb({"ok": error is None, "error": error}))
                elif kind == CLOSE:
                    close_sessions([str(s) for s in doc["sessions"]])
                else:
                    spec = PassSpec.from_wire(doc["spec"])
                    self.hops = spec.hops
                    outputs = run_pass(spec, _tensor(doc["input"], frames[1]))
                    if spec.wants is not None:
                        summary = head_summary(spec.wants, outputs, self.vocab_lo)
                        self.channel.send(0, GATHER, seq, 0, *_pack_summary(summary, spec.wants))
            except GroupError as exc:
                log.warning("tensor-parallel pass %d given up: %s", seq, exc)
                self.abort(str(exc))
            except Exception as exc:  # a failed pass must not end the thread: the leader ends its sessions
                log.exception("tensor-parallel command %d failed", seq)
                self.abort(f"member {self.rank} failed: {exc}")


def head_summary(wants: list[str], outputs: list[torch.Tensor], vocab_lo: int) -> list:
    """Per row, what the leader needs of this member's logits: (max, its global id) for a greedy token,
    else the row's logits (``[seq, vocab slice]``, float32, on the CPU)."""
    summary = []
    for want, out in zip(wants, outputs):
        row = out[0].float().cpu()
        if want == "token":
            value, index = row[-1].max(dim=-1)
            summary.append((float(value), int(index) + vocab_lo))
        else:
            summary.append(row)
    return summary


def _pack_summary(summary: list, wants: list[str]) -> list[bytes]:
    tokens = [pair for pair, want in zip(summary, wants) if want == "token"]
    frames = [msgpack.packb({"tokens": tokens, "shapes": [list(s.shape) for s, w in zip(summary, wants)
                                                          if w != "token"]})]
    frames += [s.contiguous().numpy().tobytes() for s, w in zip(summary, wants) if w != "token"]
    return frames


def _unpack_summary(frames: list[bytes], wants: list[str]) -> list:
    head = msgpack.unpackb(frames[0])
    tokens, shapes, blobs = iter(head["tokens"]), iter(head["shapes"]), iter(frames[1:])
    out = []
    for want in wants:
        if want == "token":
            value, index = next(tokens)
            out.append((float(value), int(index)))
        else:
            out.append(_tensor({"dtype": "float32", "shape": next(shapes)}, next(blobs)))
    return out
