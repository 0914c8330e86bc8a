"""The daemon: lifecycle (lock, bind, ready, stop), and the node's own operations.

Subsystems (inference, training) register their operations on the same ``RpcServer``; this file
holds only what every node does: ``ping``, ``info``, ``node.stats`` (:mod:`dllmd.observe`), ``echo``,
remote key management and round trips to its peers (``peers.ping``, :mod:`dllmd.links`).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import signal
import time
from pathlib import Path

import psutil
import torch
import zmq

from dllmd import __version__, hardware
from dllmd.config import DAEMON_FILE, LOCK_FILE, NodeConfig, bind_host, metrics_address
from dllmd.inference.memory import MemoryCap
from dllmd.inference.ops import InferenceService
from dllmd.inference.relay import RelayService
from dllmd.inference.tensor_group import GroupChannel
from dllmd.links import PeerLinks
from dllmd.data.ops import DataOps
from dllmd.models.ops import ModelOps
from dllmd.net.identity import Identity, InvalidKey
from dllmd.net.keys import AuthorizedKeys, Role
from dllmd.net.pool import ConnectionPool
from dllmd.net.messages import node as M
from dllmd.net.server import Call, HandlerError, Operation, RpcServer
from dllmd.net.transport import KeyTableAuthenticator, bind_router
from dllmd.observe.exporter import MetricsEndpoint
from dllmd.observe.metrics import NodeMetrics
from dllmd.observe.stats import SAMPLE_INTERVAL_S, node_stats
from dllmd.net.wire import PROTOCOL_VERSION, ErrorCode, Limits
from dllmd.sdnotify import notify
from dllmd.train.ringbench import RingBenchOps
from dllmd.train.service import TrainingService
from dllmd.storage import atomic_write

log = logging.getLogger("dllmd")



class StartupError(RuntimeError):
    """The daemon cannot start; the message says why and what to do."""


class Daemon:
    def __init__(self, home: Path):
        self.home = home
        self.config = NodeConfig.load(home)
        self.identity = Identity.load(home / "identity")
        self.keys = AuthorizedKeys(home / "authorized_keys.toml")
        self.keys.refresh()
        self.wire_limits = Limits(max_header_bytes=self.config.max_header_bytes,
                             max_tensor_bytes=self.config.max_message_bytes)
        self.started_at = time.time()
        self.endpoint = ""
        self.speed = hardware.Speed(0.0, 0.0)
        self.metrics = NodeMetrics()
        self.inference: InferenceService | None = None  # built in run(), as is the training service
        self.training: TrainingService | None = None
        self._stop = asyncio.Event()
        self._lock_fd: int | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def _take_lock(self) -> None:
        fd = os.open(self.home / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(f"another dllmd is already running with home {self.home}") from None
        self._lock_fd = fd

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        self._take_lock()
        self._apply_limits()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        self.speed = await asyncio.to_thread(hardware.cached_speed, self.home)
        ctx = zmq.Context()
        auth = KeyTableAuthenticator(ctx, self.keys)
        auth.start()
        try:
            sock = bind_router(ctx, self.identity, self.config.listen, self.config.max_message_bytes,
                               self.config.heartbeat_interval_ms, self.config.heartbeat_timeout_ms)
        except zmq.ZMQError as exc:
            auth.stop()
            ctx.destroy(linger=0)
            raise StartupError(f"cannot listen on {self.config.listen}: {exc}") from None
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        try:
            exporter, metrics_at = self._serve_metrics(loop)
        except StartupError:
            sock.close(linger=0)
            auth.stop()
            ctx.destroy(linger=0)
            raise
        server = RpcServer(sock, self.keys, self.wire_limits, metrics=self.metrics)
        peers = ConnectionPool(self.identity, ctx)
        group_host = bind_host(self.config.listen)
        budget = self._kv_budget()
        self.inference = InferenceService(
            peers, self.keys, budget, own_key=self.identity.public_key,
            group_channel=lambda: GroupChannel(self.identity, group_host, self.config.max_message_bytes,
                                               self.config.tensor_spin_us / 1e6),
            memory_cap=MemoryCap(self.config.limits.memory),
            prefix_cache_bytes=budget * self.config.prefix_cache_percent // 100, metrics=self.metrics)
        self.links = PeerLinks(peers, self.keys, self.identity.public_key)
        self._register(server)
        self.inference.register(server)
        RelayService(self.identity, self.keys, peers, server, self.wire_limits, self.config.relay).register(server)
        self.training = TrainingService(self.home, self.config, self.identity, self.keys, peers, self.metrics)
        self.training.register(server)
        ModelOps(self.home, self.keys, self.inference).register(server)
        DataOps(self.home, self.config.data_root_paths(self.home)).register(server)
        self.ring_bench = RingBenchOps(self.identity, self.keys, self.config) if self.config.bench_operations else None
        if self.ring_bench is not None:  # benchmark-only: not part of what a production node answers
            self.ring_bench.register(server)
        self.inference.start()
        self.training.start()
        sampler = asyncio.ensure_future(self._sample())
        atomic_write(self.home / DAEMON_FILE, json.dumps({
            "pid": os.getpid(), "endpoint": self.endpoint, "public_key": self.identity.public_key,
            "started_at": self.started_at, "version": __version__, "metrics": metrics_at,
        }).encode())
        log.info("node %s (%s) listening on %s, public key %s",
                 self.config.name, self.identity.node_id, self.endpoint, self.identity.public_key)
        server.start()
        notify("READY=1")
        announcing = self._announce()
        try:
            await self._stop.wait()
        finally:
            notify("STOPPING=1")
            log.info("stopping")
            sampler.cancel()
            if exporter is not None:
                exporter.stop()
            if announcing is not None:
                advertiser, registered = announcing
                await registered
                await asyncio.to_thread(advertiser.stop)
            self.inference.stop()
            await self.training.stop()
            if self.ring_bench is not None:
                self.ring_bench.stop()
            await server.stop(timeout=5.0)
            peers.close()
            auth.stop()
            ctx.term()
            try:
                (self.home / DAEMON_FILE).unlink()
            except FileNotFoundError:
                pass
            log.info("stopped cleanly after serving %d requests", server.requests_served)

    def _serve_metrics(self, loop: asyncio.AbstractEventLoop) -> tuple[MetricsEndpoint | None, str]:
        """node.toml's metrics_listen: the Prometheus endpoint, and where it listens ("" when off)."""
        if not self.config.metrics_listen:
            return None, ""
        host, port = metrics_address(self.config.metrics_listen, self.config.metrics_allow_remote)
        exporter = MetricsEndpoint(self.metrics, self._live_stats, loop)
        try:
            port = exporter.start(host, port)
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {self.config.metrics_listen}: {exc}") from None
        at = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("metrics on http://%s/metrics", at)
        return exporter, at

    def _live_stats(self) -> M.NodeStats | None:
        """What a scrape's live gauges show; None while the services are still being built."""
        if self.training is None:
            return None
        return node_stats(self.config.name, self.metrics, self.inference, self.training)

    async def _sample(self) -> None:
        """The counters' rate window and the CPU figure, once a second (node.stats reads them)."""
        while True:
            self.metrics.sample()
            await asyncio.sleep(SAMPLE_INTERVAL_S)
    def _announce(self):
        """With ``discoverable = true``: announce the node over mDNS in the background (probing the
        name takes a moment); returns the advertiser and its registration task, or None."""
        if not self.config.discoverable:
            return None
        from dllmd.discovery import Advertiser

        try:
            advertiser = Advertiser(self.config.name, self.identity.node_id, self.endpoint,
                                    self.config.discovery_interfaces)
        except (OSError, ValueError) as exc:
            log.warning("cannot announce this node over mDNS: %s", exc)
            return None
        return advertiser, asyncio.create_task(asyncio.to_thread(advertiser.start))

    def _apply_limits(self) -> None:
        """What node.toml's [limits] asks of this process (``dllmd start`` hid the other GPUs before
        anything could start CUDA; here it is checked). The memory cap is the inference service's."""
        limits = self.config.limits
        try:
            hardware.check_gpu_limit(limits.gpus)
        except hardware.GpuLimitError as exc:
            raise StartupError(str(exc)) from None
        if limits.threads:
            torch.set_num_threads(limits.threads)

    def _kv_budget(self) -> int:
        """Memory for KV caches: node.toml's budget, else a quarter of what is free now; never more
        than the owner's cap."""
        budget = self.config.memory_budget_bytes
        if not budget:
            gpus = hardware.gpus()
            budget = (gpus[0]["memory_free"] if gpus else psutil.virtual_memory().available) // 4
        cap = self.config.limits.memory
        return min(budget, cap) if cap else budget

    # --- operations ---------------------------------------------------------------------------

    def _register(self, server: RpcServer) -> None:
        server.register(Operation(M.PING, self._ping))
        server.register(Operation(M.INFO, self._info))
        server.register(Operation(M.NODE_STATS, self._stats))
        server.register(Operation(M.ECHO, self._echo))
        server.register(Operation(M.KEYS_LIST, self._keys_list))
        server.register(Operation(M.KEYS_AUTHORIZE, self._keys_authorize))
        server.register(Operation(M.KEYS_REVOKE, self._keys_revoke))
        server.register(Operation(M.PEERS_PING, self._peers_ping))

    def _ping(self, call: Call) -> M.Pong:
        return M.Pong(pong=True, time=time.time())

    def _echo(self, call: Call):
        return {}, call.tensors

    async def _info(self, call: Call) -> M.Info:
        snapshot = await asyncio.to_thread(hardware.snapshot, self.home, self.speed)
        limits = self.config.limits
        return M.Info(
            node_id=self.identity.node_id, name=self.config.name, public_key=self.identity.public_key,
            version=__version__, protocol_version=PROTOCOL_VERSION, role=call.caller.role.value,
            endpoint=self.endpoint, uptime_s=round(time.time() - self.started_at, 3),
            rss_bytes=psutil.Process().memory_info().rss,
            hardware=M.Hardware(**{**snapshot, "gpus": [M.Gpu(**g) for g in snapshot["gpus"]]}),
            serving=self.inference.serving(prefix_stats=call.caller.role == Role.ADMIN), kv_budget_bytes=self.inference.sessions.memory_budget_bytes,
            limits=M.NodeLimits(memory_bytes=limits.memory, threads=limits.threads, gpus=limits.gpus),
            memory_used_bytes=self.inference.memory_used_bytes(),
            prefix_cache_limit_bytes=self.inference.prefix.limit_bytes, peer_rtts=self.links.remembered())

    def _stats(self, call: Call) -> M.NodeStats:
        return node_stats(self.config.name, self.metrics, self.inference, self.training,
                          prefix_stats=call.caller.role == Role.ADMIN)

    async def _peers_ping(self, call: Call) -> M.PeerRtts:
        a: M.PingPeersArgs = call.args
        return M.PeerRtts(await self.links.measure(a.peers, a.count, a.max_age_s))

    async def _keys_list(self, call: Call) -> M.KeyList:
        return M.KeyList([M.KeyEntry(k.public_key, k.role.value, k.name, _listed(k.models)) for k in self.keys.all()])

    async def _keys_authorize(self, call: Call) -> M.KeyEntry:
        try:
            entry = self.keys.authorize(call.args.public_key, call.args.role, call.args.name, call.args.models)
        except (ValueError, InvalidKey) as exc:
            raise HandlerError(ErrorCode.BAD_ARGS, str(exc)) from None
        log.info("%s authorized %s as %s", call.caller.name or call.caller.public_key[:12], entry.public_key[:12], entry.role.value)
        return M.KeyEntry(entry.public_key, entry.role.value, entry.name, _listed(entry.models))

    async def _keys_revoke(self, call: Call) -> M.Revoked:
        if call.args.public_key.lower() == call.caller.public_key:
            raise HandlerError(ErrorCode.CONFLICT, "refusing to revoke the key making this call; use another admin key")
        try:
            removed = self.keys.revoke(call.args.public_key)
        except InvalidKey as exc:
            raise HandlerError(ErrorCode.BAD_ARGS, str(exc)) from None
        if not removed:
            raise HandlerError(ErrorCode.NOT_FOUND, "that key is not authorized on this node")
        return M.Revoked(True)


def _listed(models: tuple[str, ...] | None) -> list[str] | None:
    return None if models is None else list(models)
