"""A running job's alert detectors, on its coordinator (thresholds: node.toml's ``[alerts]``,
:class:`dllmd.alerts.AlertSettings`).

After every step (:meth:`JobWatch.step_done`, from the step's metrics row):

* ``loss_nan``: the step's loss is NaN or infinite.
* ``loss_diverged``: the loss stayed above ``diverge_factor`` x its running minimum (over the job's
  finite losses so far) for ``diverge_steps`` steps in a row; raised once per such run.
* ``straggler``: a node's compute time was above ``straggler_factor`` x the median of the other
  nodes' and above ``straggler_min_s`` (per-node times of the metrics' ``nodes``; a federated round's
  clients that missed ``--round-timeout`` are stragglers too).
* ``disk_low``: the coordinator's home (where checkpoints go) has less than ``disk_min_free_mb``
  free; raised again only after it recovered.
* ``epsilon_budget``: a DP job has spent ``epsilon_fraction`` (90%) of ``--dp-epsilon-budget``; once.

A watchdog thread (it runs even when the coordinator's event loop is stuck) raises ``stall`` when no
step was recorded for ``stall_factor`` x the median step time (at least ``stall_min_s``; once per
step), then pings the nodes whose part of the step has not come back: one that does not answer
within the ping timeout is ``node_hung`` (alive enough to keep its connection, too busy to answer).
``node_lost`` is raised where the coordinator drops a node that stopped answering
(:meth:`JobWatch.node_lost`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import statistics
import threading
import time
from collections import deque

from dllmd.alerts import Alert

log = logging.getLogger("dllmd.alerts")

WATCHDOG_TICK_S = 0.25
STEP_TIMES_KEPT = 50


class JobWatch:
    def __init__(self, run):
        self.run = run
        self.settings = run.c.service.config.alerts
        self.sink = run.c.alert_sink
        self.loop = asyncio.get_running_loop()  # where the node_hung pings run
        self.min_loss = math.inf
        self.high_steps = 0
        self.diverged = False
        self.disk_low = False
        self.epsilon_warned = False
        self.step_times: deque[float] = deque(maxlen=STEP_TIMES_KEPT)
        self.last_progress = time.monotonic()
        self.stalled = False
        self.pending: dict[str, asyncio.Task] = {}  # node name -> its call of the step in flight
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watchdog, name=f"watch-{run.job}", daemon=True)
        self._thread.start()

    def raise_alert(self, code: str, message: str, node: str = "", **details) -> Alert:
        alert = Alert.of(code, self.run.job, message, node, **details)
        log.warning("job %s alert %s: %s", self.run.job, code, message)
        self.run.store.event(self.run.job, alert.kind, alert.to_json())
        self.sink.deliver(alert)
        return alert

    # --- after a step ------------------------------------------------------------------------------

    def step_done(self, step: int, metrics: dict) -> None:
        self.step_times.append(metrics.get("step_s") or 0.0)
        self.last_progress, self.stalled = time.monotonic(), False
        self._loss(step, metrics.get("loss"))
        self._stragglers(step, metrics.get("nodes") or {})
        self._disk()
        self._epsilon(step, metrics.get("epsilon"))

    def _loss(self, step: int, loss) -> None:
        if loss is None:  # an empty DP batch
            return
        if not math.isfinite(loss):
            self.high_steps = 0
            self.raise_alert("loss_nan", f"step {step}: the loss is {loss}", step=step, loss=str(loss))
            return
        s = self.settings
        if loss > s.diverge_factor * self.min_loss:
            self.high_steps += 1
            if self.high_steps >= s.diverge_steps and not self.diverged:
                self.diverged = True
                self.raise_alert("loss_diverged", f"step {step}: loss {loss:.4g} has been above {s.diverge_factor:g}x "
                                                  f"its minimum {self.min_loss:.4g} for {self.high_steps} steps",
                                 step=step, loss=loss, min_loss=self.min_loss, steps=self.high_steps)
        else:
            self.high_steps, self.diverged = 0, False
        self.min_loss = min(self.min_loss, loss)

    def _stragglers(self, step: int, nodes: dict) -> None:
        times = {name: n["compute_s"] for name, n in nodes.items() if isinstance(n.get("compute_s"), (int, float))}
        if len(times) < 2:
            return
        s = self.settings
        for name, seconds in times.items():
            others = statistics.median(t for n, t in times.items() if n != name)
            if seconds > s.straggler_min_s and seconds > s.straggler_factor * others:
                self.raise_alert("straggler", f"step {step}: {name} computed for {seconds:.2f} s, the others' median "
                                              f"{others:.2f} s", node=name, step=step, compute_s=seconds,
                                 others_median_s=others)

    def _disk(self) -> None:
        home = self.run.c.service.home
        free = shutil.disk_usage(home).free
        low = free < self.settings.disk_min_free_mb * 2**20
        if low and not self.disk_low:
            self.raise_alert("disk_low", f"{free / 2**20:.0f} MiB free at {home} (checkpoints go there), below "
                                         f"{self.settings.disk_min_free_mb:g} MiB", node=self.run.c.service.config.name,
                             free_bytes=free, path=str(home))
        self.disk_low = low

    def _epsilon(self, step: int, epsilon) -> None:
        budget = self.run.spec.dp_epsilon_budget
        if epsilon is None or not budget or self.epsilon_warned:
            return
        if epsilon >= self.settings.epsilon_fraction * budget:
            self.epsilon_warned = True
            self.raise_alert("epsilon_budget", f"step {step}: epsilon {epsilon:.4g} spent of the budget {budget:g} "
                                               f"({epsilon / budget:.0%})", step=step, epsilon=epsilon, budget=budget)

    def node_lost(self, node: str, why: str) -> None:
        self.raise_alert("node_lost", f"{node} {why}", node=node)

    # --- the watchdog --------------------------------------------------------------------------------

    def stall_after_s(self) -> float:
        median = statistics.median(self.step_times) if self.step_times else 0.0
        return max(self.settings.stall_min_s, self.settings.stall_factor * median)

    def _watchdog(self) -> None:
        while not self._stop.wait(WATCHDOG_TICK_S):
            quiet = time.monotonic() - self.last_progress
            if self.stalled or quiet < self.stall_after_s():
                continue
            self.stalled = True
            waiting = sorted(name for name, task in list(self.pending.items()) if not task.done())
            self.raise_alert("stall", f"no step for {quiet:.1f} s (the usual step takes "
                                      f"{statistics.median(self.step_times) if self.step_times else 0:.2f} s)"
                                      + (f"; waiting for {', '.join(waiting)}" if waiting else ""),
                             quiet_s=quiet, waiting=waiting)
            if waiting:
                asyncio.run_coroutine_threadsafe(self._probe(waiting), self.loop)

    async def _probe(self, names: list[str]) -> None:
        """Ping the nodes a stalled step waits for: those that do not answer are hung."""
        nodes = [n for n in self.run.spec.nodes if n.name in names]
        alive = await asyncio.gather(*(self.run.c.alive(n) for n in nodes))
        for node, ok in zip(nodes, alive):
            if not ok:
                self.raise_alert("node_hung", f"{node.name} has not finished its part of the step and does not "
                                              f"answer a ping", node=node.name)

    def close(self) -> None:
        self._stop.set()
