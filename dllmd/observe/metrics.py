"""A node's counters, kept once: ``node.stats`` reads them and the Prometheus endpoint exports them.

Every daemon has its own ``CollectorRegistry`` (never prometheus_client's global one), so daemons or
services built in one test process do not share counts. Label values are bounded by what the node
itself knows, never by what a caller sends: models it serves, operations it registered (anything else
is ``unknown``), error codes, authorized keys (by name or key fingerprint: ZAP refuses every other
key), alert codes, and the last ``MAX_JOB_SERIES`` jobs it coordinates.

The training figures come from one place, :meth:`JobStore.record_step` and :meth:`JobStore.event`
(dllmd/train/jobs.py), which call :meth:`NodeMetrics.training_step` and :meth:`NodeMetrics.job_event`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

RATE_WINDOW_S = 10.0  # tokens_per_s is measured over this much recent time
MAX_JOB_SERIES = 16  # per-job gauges kept, most recent jobs first
MAX_CODE_LEN = 64
# Decode passes of a tiny model on a CPU take ~1 ms, a prefill of a big one seconds.
PASS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

# Metrics rows (JobStore.record_step) -> the per-job gauge each key sets, where present.
JOB_GAUGES = {"loss": ("dllm_train_loss", "Training loss of the job's latest step"),
              "eval_loss": ("dllm_eval_loss", "Held-out loss at the job's latest evaluation"),
              "tokens_per_s": ("dllm_train_tokens_per_second", "Training tokens per second of the latest step"),
              "step_s": ("dllm_train_last_step_seconds", "Wall time of the job's latest step"),
              "epsilon": ("dllm_train_epsilon", "Differential-privacy epsilon spent so far")}


class NodeMetrics:
    """The counters of one daemon, and the rates ``node.stats`` derives from them."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.started = time.time()
        self.tokens_generated = Counter("dllm_tokens_generated", "Tokens sampled by this node's last stages",
                                        ["model"], registry=r)
        self.tokens_processed = Counter("dllm_tokens_processed", "Token positions run through this node's "
                                        "layers (prefill and decode)", ["model"], registry=r)
        self.pass_seconds = Histogram("dllm_forward_pass_seconds", "Compute time of one forward pass of a span",
                                      ["model"], buckets=PASS_BUCKETS, registry=r)
        self.batch_size = Histogram("dllm_forward_batch_size", "Sessions' steps in one forward pass", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.requests = Counter("dllm_requests", "Requests answered, by operation", ["op"], registry=r)
        self.errors = Counter("dllm_errors", "Requests answered with an error, by operation and error code",
                              ["op", "code"], registry=r)
        self.received = Counter("dllm_peer_received_bytes", "Bytes of requests received, by the key that sent "
                                "them", ["peer"], registry=r)
        self.sent = Counter("dllm_peer_sent_bytes", "Bytes of replies sent, by the key they answered",
                            ["peer"], registry=r)
        self.step_seconds = Histogram("dllm_train_step_seconds", "Wall time of a training step this node "
                                      "coordinated", buckets=STEP_BUCKETS, registry=r)
        self.comm_seconds = Histogram("dllm_allreduce_seconds", "Communication time (all-reduce) of a training "
                                      "step this node coordinated", buckets=STEP_BUCKETS, registry=r)
        self.train_steps = Counter("dllm_train_steps", "Training steps this node coordinated", registry=r)
        self.alerts = Counter("dllm_alerts", "Job events of kind alert.<code>, by code", ["code"], registry=r)
        self.job_step = Gauge("dllm_train_step", "Steps the job has completed", ["job"], registry=r)
        self.job_gauges = {key: Gauge(name, text, ["job"], registry=r) for key, (name, text) in JOB_GAUGES.items()}
        self._jobs: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()  # record_step runs on worker threads too
        self._samples: deque[tuple[float, float, float]] = deque()  # (monotonic time, generated, processed)
        self.cpu_percent = 0.0
        psutil.cpu_percent(None)  # the first reading starts the interval the next one measures

    # --- what the node's parts report -----------------------------------------------------------

    def pass_done(self, model: str, seconds: float, batch: int, tokens: int) -> None:
        self.pass_seconds.labels(model).observe(seconds)
        self.batch_size.labels(model).observe(batch)
        self.tokens_processed.labels(model).inc(tokens)

    def token_generated(self, model: str) -> None:
        self.tokens_generated.labels(model).inc()

    def answered(self, op: str, code: str | None) -> None:
        """A request finished: ``code`` None for a result, else its error code."""
        self.requests.labels(op).inc()
        if code is not None:
            self.errors.labels(op, code[:MAX_CODE_LEN]).inc()

    def traffic(self, peer: str, received: int = 0, sent: int = 0) -> None:
        if received:
            self.received.labels(peer).inc(received)
        if sent:
            self.sent.labels(peer).inc(sent)

    def training_step(self, job: str, step: int, row: dict) -> None:
        """A step of ``job`` completed with metrics ``row`` (JobStore.record_step's)."""
        with self._lock:
            self._track(job)
            self.train_steps.inc()
            self.job_step.labels(job).set(step + 1)
            if _number(row.get("step_s")):
                self.step_seconds.observe(row["step_s"])
            if _number(row.get("comm_s")):
                self.comm_seconds.observe(row["comm_s"])
            for key, gauge in self.job_gauges.items():
                if _number(row.get(key)):
                    gauge.labels(job).set(row[key])

    def job_event(self, job: str, kind: str) -> None:
        if kind.startswith("alert."):
            self.alerts.labels(kind.removeprefix("alert.")[:MAX_CODE_LEN]).inc()

    def _track(self, job: str) -> None:
        """Keep per-job series for the latest jobs only: a coordinator that ran hundreds keeps a bounded set."""
        self._jobs[job] = None
        self._jobs.move_to_end(job)
        while len(self._jobs) > MAX_JOB_SERIES:
            old, _ = self._jobs.popitem(last=False)
            for gauge in (self.job_step, *self.job_gauges.values()):
                try:
                    gauge.remove(old)
                except KeyError:
                    pass

    # --- what node.stats reads ------------------------------------------------------------------

    def sample(self) -> None:
        """Called about once a second (the daemon's sampler): the machine's CPU use since the last call,
        and a point of the token-rate window."""
        self.cpu_percent = psutil.cpu_percent(None)
        now = time.monotonic()
        self._samples.append((now, total(self.tokens_generated), total(self.tokens_processed)))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
            self._samples.popleft()

    def rates(self) -> tuple[float, float]:
        """(generated, processed) tokens per second over the last ~RATE_WINDOW_S."""
        if not self._samples:
            return 0.0, 0.0
        then, generated, processed = self._samples[0]
        elapsed = time.monotonic() - then
        if elapsed <= 0:
            return 0.0, 0.0
        return ((total(self.tokens_generated) - generated) / elapsed,
                (total(self.tokens_processed) - processed) / elapsed)

    def job_figure(self, key: str, job: str) -> float | None:
        """The latest value of a per-job gauge (``JOB_GAUGES``' keys), None if never set. Read from the
        gauge itself, not the registry: collecting the registry would also build the live gauges."""
        return next((s.value for family in self.job_gauges[key].collect() for s in family.samples
                     if s.labels.get("job") == job), None)


def total(metric: Counter) -> float:
    """A counter's sum over all its label values."""
    return sum(s.value for family in metric.collect() for s in family.samples if s.name.endswith("_total"))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
