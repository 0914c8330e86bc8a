"""Execute an all-reduce plan (``dllmd.train.allreduce_plan``) over bulk links.

Every receive of the plan is handed to its link up front; the sends and local adds that depend on
nothing go at once, and each completion (reported from the links' threads) starts whatever it
was the last dependency of. So the whole schedule runs in the links' threads, chunk after chunk,
with no trip through the event loop: the loop only waits for the end (or for no progress within
the timeout).

On failure the plan is marked failed first, so the threads start nothing more in the caller's
buffer; ``quiesce`` then waits until none is still inside it, and only then does the caller get
its buffer back (with undefined contents) along with the error.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict

import numpy as np

from dllmd.net.bulk.link import TAG, BulkLink, BulkLinkError, Receive, Send
from dllmd.train.allreduce_plan import OpKind, Plan

QUIESCE_POLL_S = 0.0005


def _bytes(array: np.ndarray) -> memoryview:
    return memoryview(array).cast("B")


class PlanRun:
    """One rank's run of one plan; implements the links' ``Owner``."""

    def __init__(self, plan: Plan, array: np.ndarray, links: dict[int, BulkLink], generation: int, step: int):
        self.plan, self.array, self.links = plan, array, links
        self.generation, self.step = generation, step
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future = self.loop.create_future()
        self.scratch = np.empty(plan.scratch_elements, dtype=array.dtype)
        self.progress = 0  # completions so far: a timeout counts only time without any
        self._lock = threading.Lock()
        self._waiting = [len(op.deps) for op in plan.ops]
        self._dependents: list[list[int]] = [[] for _ in plan.ops]
        for i, op in enumerate(plan.ops):
            for dep in op.deps:
                self._dependents[dep].append(i)
        self._left = len(plan.ops)
        self._busy = 0
        self._failed: Exception | None = None

    def _tag(self, i: int) -> bytes:
        op = self.plan.ops[i]
        return TAG.pack(self.generation, self.step, op.bucket, op.phase, op.hop)

    def _region(self, i: int) -> np.ndarray:
        op = self.plan.ops[i]
        return self.array[op.lo:op.hi]

    def _scratch(self, i: int) -> np.ndarray:
        op = self.plan.ops[i]
        return self.scratch[op.scratch:op.scratch + op.hi - op.lo]

    # --- running -----------------------------------------------------------------------------

    async def run(self, timeout: float) -> None:
        """Run to the end; raises the first failure (``BulkLinkError``), or ``TimeoutError`` after
        ``timeout`` seconds in which no op completed."""
        if not self.plan.ops:
            return
        self._start()
        while True:
            seen = self.progress
            try:
                await asyncio.wait_for(asyncio.shield(self.future), timeout)
                return
            except TimeoutError:
                if self.progress == seen:
                    raise TimeoutError(f"no progress for {timeout:g}s") from None

    def _start(self) -> None:
        receives: dict[int, dict[bytes, Receive]] = defaultdict(dict)
        for i, op in enumerate(self.plan.ops):
            nbytes = self._region(i).nbytes
            if op.kind == OpKind.RECV_ADD:
                receives[op.peer][self._tag(i)] = Receive(self, i, nbytes, add_to=self._region(i))
            elif op.kind == OpKind.RECV_COPY:
                receives[op.peer][self._tag(i)] = Receive(self, i, nbytes, into=_bytes(self._region(i)))
            elif op.kind == OpKind.RECV_SCRATCH:
                receives[op.peer][self._tag(i)] = Receive(self, i, nbytes, into=_bytes(self._scratch(i)))
        try:
            for peer, expected in receives.items():
                self.links[peer].expect(expected)
        except BulkLinkError as exc:
            self.fail(exc)
            return
        for i, op in enumerate(self.plan.ops):
            if op.kind in (OpKind.SEND, OpKind.ADD) and not op.deps:
                self._dispatch(i)

    def _dispatch(self, i: int) -> None:
        op = self.plan.ops[i]
        if op.kind == OpKind.SEND:
            try:
                self.links[op.peer].send(Send(self, i, self._tag(i), _bytes(self._region(i))))
            except BulkLinkError as exc:
                self.fail(exc)
            return
        if not self.enter():
            return
        try:
            region = self._region(i)
            np.add(region, self._scratch(i), out=region)
        finally:
            self.leave()
        self.complete(i)

    # --- Owner: called from the links' threads -------------------------------------------------

    def enter(self) -> bool:
        with self._lock:
            if self._failed is not None:
                return False
            self._busy += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._busy -= 1

    def complete(self, op: int) -> None:
        ready = []
        with self._lock:
            if self._failed is not None:
                return
            self.progress += 1
            self._left -= 1
            for later in self._dependents[op]:
                self._waiting[later] -= 1
                if not self._waiting[later]:
                    ready.append(later)
            finished = not self._left
        for later in ready:
            self._dispatch(later)
        if finished:
            self._resolve(None)

    def fail(self, error: Exception) -> None:
        with self._lock:
            if self._failed is not None or not self._left:
                return
            self._failed = error
        self._resolve(error)

    def _resolve(self, error: Exception | None) -> None:
        def settle() -> None:
            if not self.future.done():
                if error is None:
                    self.future.set_result(None)
                else:
                    self.future.set_exception(error)
                    self.future.exception()  # retrieved here: the waiter may have gone already

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    async def quiesce(self, error: Exception, limit: float = 10.0) -> None:
        """Mark the run failed (if it is not yet) and wait until no thread is inside the caller's buffer."""
        self.fail(error)
        deadline = time.monotonic() + limit
        while True:
            with self._lock:
                if not self._busy:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("a ring thread still holds the buffer after the collective failed")
            await asyncio.sleep(QUIESCE_POLL_S)
