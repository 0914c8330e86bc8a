"""The Prometheus endpoint (node.toml's ``metrics_listen``): prometheus_client's own HTTP server on the
daemon's registry (:class:`NodeMetrics`), plus the node's live state as gauges.

The live gauges are built from :func:`node_stats`, run on the daemon's event loop (the services'
tables belong to it; the HTTP server answers on threads of its own), so a scrape and ``node.stats``
show the same figures.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Iterable

from prometheus_client import start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dllmd.net.messages.node import NodeStats
from dllmd.observe.metrics import NodeMetrics

log = logging.getLogger("dllmd.metrics")

SCRAPE_STATS_TIMEOUT_S = 5.0  # a loop this late to answer: the scrape goes without the live gauges


class LiveState(Collector):
    """What the node holds now, as gauges, from one :class:`NodeStats` per scrape."""

    def __init__(self, stats: Callable[[], NodeStats | None]):
        self.stats = stats

    def describe(self) -> Iterable:
        return []  # built per scrape; nothing to check at registration

    def collect(self) -> Iterable[GaugeMetricFamily]:
        s = self.stats()
        if s is None:
            return
        yield _gauge("dllm_uptime_seconds", "Seconds since the daemon started", s.uptime_s)
        yield _gauge("dllm_cpu_usage_ratio", "The machine's CPU use over the last second (0-1)", s.cpu_percent / 100)
        yield _gauge("dllm_memory_used_bytes", "The machine's RAM in use", s.ram_used_bytes)
        yield _gauge("dllm_memory_total_bytes", "The machine's RAM", s.ram_total_bytes)
        yield _gauge("dllm_resident_memory_bytes", "The daemon's resident memory", s.rss_bytes)
        gpu = {name: GaugeMetricFamily(name, text, labels=["gpu", "name"]) for name, text in (
            ("dllm_gpu_memory_used_bytes", "GPU memory in use"), ("dllm_gpu_memory_total_bytes", "GPU memory"),
            ("dllm_gpu_utilization_ratio", "GPU compute use (0-1), where NVML reports it"))}
        for g in s.gpus:
            labels = [str(g.index), g.name]
            gpu["dllm_gpu_memory_used_bytes"].add_metric(labels, g.memory_used_bytes)
            gpu["dllm_gpu_memory_total_bytes"].add_metric(labels, g.memory_total_bytes)
            if g.util_percent is not None:
                gpu["dllm_gpu_utilization_ratio"].add_metric(labels, g.util_percent / 100)
        yield from gpu.values()
        per_model = {name: GaugeMetricFamily(name, text, labels=["model"]) for name, text in (
            ("dllm_sessions_open", "Inference sessions open on the model's span"),
            ("dllm_kv_cache_bytes", "KV cache the span's sessions hold"),
            ("dllm_kv_reserved_bytes", "KV cache the span's sessions reserved"),
            ("dllm_queue_depth", "Steps waiting for a pass of the span"),
            ("dllm_span_weights_bytes", "Weights of the span"),
            ("dllm_span_first_layer", "First layer of the span this node serves"),
            ("dllm_span_end_layer", "Layer after the last of the span this node serves"))}
        for span in s.serving:
            for name, value in (("dllm_sessions_open", span.sessions), ("dllm_kv_cache_bytes", span.kv_bytes),
                                ("dllm_kv_reserved_bytes", span.kv_reserved_bytes), ("dllm_queue_depth", span.queued),
                                ("dllm_span_weights_bytes", span.param_bytes),
                                ("dllm_span_first_layer", span.start), ("dllm_span_end_layer", span.end)):
                per_model[name].add_metric([span.model], value)
        yield from per_model.values()
        yield _gauge("dllm_train_jobs_running", "Training jobs this node coordinates that are running", len(s.jobs))


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)


class MetricsEndpoint:
    """prometheus_client's HTTP server on ``host:port`` for ``metrics``; ``stats`` builds the node's
    NodeStats (on ``loop``: the services' state is the loop's)."""

    def __init__(self, metrics: NodeMetrics, stats: Callable[[], NodeStats | None], loop: asyncio.AbstractEventLoop):
        self.metrics, self._stats, self._loop = metrics, stats, loop
        self._server = None
        metrics.registry.register(LiveState(self._stats_from_loop))

    def _stats_from_loop(self) -> NodeStats | None:
        async def now() -> NodeStats | None:
            return self._stats()

        try:
            return asyncio.run_coroutine_threadsafe(now(), self._loop).result(SCRAPE_STATS_TIMEOUT_S)
        except Exception as exc:  # a stopping loop, a late one: the counters still answer
            log.warning("a metrics scrape went without the live gauges: %s", exc or type(exc).__name__)
            return None

    def start(self, host: str, port: int) -> int:
        """Serve; returns the bound port (``port`` 0 binds a free one). OSError if it cannot bind."""
        self._server, _ = start_http_server(port, addr=host, registry=self.metrics.registry)
        return self._server.server_port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
