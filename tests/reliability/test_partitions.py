"""Partitions: a link cut between two stages mid-generation, with a replica elsewhere, gives the
fault-free tokens.

Each daemon runs in a network namespace of its own (``ip netns``), with its own address on a veth
pair to this namespace, which routes between them; the test process is the client. Cutting the link
between two nodes is a blackhole route to each other in both namespaces: both stay reachable from the
client, only they cannot reach each other (what a broken switch port or a firewall does). Needs root
and network namespaces; skipped with the reason where the kernel refuses.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dllmctl.cluster.registry import NodeEntry
from dllmctl.inference.failover import generate_with_failover
from dllmctl.inference.session import Generation
from dllmctl.inference.stages import live_stages
from dllmctl.models.deploy import deploy
from dllmctl.models.importer import import_model
from dllmctl.placement.layout import Span
from dllmd.models.store import ModelStore
from dllmd.net.identity import Identity
from dllmd.net.keys import AuthorizedKeys, Role
from dllmd.net.messages.inference import SamplingParams
from dllmd.net.pool import ConnectionPool
from tests.conftest import make_home, start_daemon
from tests.tiny_models import make_tiny_model

NODES = 3
FORWARDING = Path("/proc/sys/net/ipv4/ip_forward")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _address(i: int) -> str:
    return f"10.77.{i}.2"


class Namespaces:
    """``count`` namespaces ``<tag>-i``, each with ``10.77.i.2`` on a veth to this namespace (``.1``)."""

    def __init__(self, count: int):
        self.tag = f"dllm{os.getpid() % 100000}"
        self.names = [f"{self.tag}-{i}" for i in range(1, count + 1)]
        self.forwarding = FORWARDING.read_text().strip()

    def __enter__(self) -> "Namespaces":
        try:
            FORWARDING.write_text("1")
            for i, ns in enumerate(self.names, 1):
                outer, inner = f"{self.tag}o{i}", f"{self.tag}i{i}"
                _ip("netns", "add", ns)
                _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                _ip("link", "set", inner, "netns", ns)
                _ip("addr", "add", f"10.77.{i}.1/24", "dev", outer)
                _ip("link", "set", outer, "up")
                for args in (("addr", "add", f"{_address(i)}/24", "dev", inner), ("link", "set", inner, "up"),
                             ("link", "set", "lo", "up"), ("route", "add", "default", "via", f"10.77.{i}.1")):
                    _ip("-n", ns, *args)
        except (OSError, subprocess.CalledProcessError) as exc:
            self.__exit__()
            detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else exc
            pytest.skip(f"network namespaces are not available here ({detail}); the partition tests need root")
        return self

    def prefix(self, i: int) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.names[i - 1])

    def cut(self, a: int, b: int) -> None:
        """No packet between nodes a and b, either way; both still reach (and are reached by) the rest."""
        _ip("-n", self.names[a - 1], "route", "add", "blackhole", f"{_address(b)}/32")
        _ip("-n", self.names[b - 1], "route", "add", "blackhole", f"{_address(a)}/32")

    def __exit__(self, *exc) -> None:
        for i, ns in enumerate(self.names, 1):
            # The pair goes with its outer end now: a namespace's own teardown is lazy, and a veth it
            # left behind would keep this subnet's route from the next run's.
            subprocess.run(["ip", "link", "del", f"{self.tag}o{i}"], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        try:
            FORWARDING.write_text(self.forwarding)
        except OSError:
            pass


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory):
    """Three daemons in their own namespaces serving a tiny llama: n1 layers 0-2, n2 and n3 each 2-5."""
    root = tmp_path_factory.mktemp("partitions")
    user = Identity.generate()
    with Namespaces(NODES) as namespaces:
        homes = {i: root / f"n{i}" for i in range(1, NODES + 1)}
        ids = {i: make_home(home, f"n{i}", listen=f"tcp://{_address(i)}:0") for i, home in homes.items()}
        for i, home in homes.items():
            keys = AuthorizedKeys(home / "authorized_keys.toml")
            keys.authorize(user.public_key, Role.ADMIN, "user")
            for j, other in ids.items():
                if j != i:
                    keys.authorize(other.public_key, Role.PEER, f"n{j}")
        daemons = {i: start_daemon(home, prefix=namespaces.prefix(i)) for i, home in homes.items()}
        try:
            nodes = {f"n{i}": NodeEntry(f"n{i}", d.address, d.public_key) for i, d in daemons.items()}
            source = make_tiny_model("llama", root / "src")
            store = ModelStore(root / "models")
            import_model(source, store, user, name="tiny")
            spans = [Span("n1", 0, 2, True, False), Span("n2", 2, 5, False, True), Span("n3", 2, 5, False, True)]
            asyncio.run(deploy(user, nodes, store.root / "tiny", spans))
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
            yield {"user": user, "nodes": nodes, "namespaces": namespaces, "model": model}
        finally:
            for daemon in daemons.values():
                daemon.stop()


def test_a_link_cut_between_two_stages_mid_generation_gives_the_fault_free_tokens(partitioned, report_figures,
                                                                                  monkeypatch, tmp_path):
    from dllmctl.alerts import recent

    monkeypatch.setenv("DLLM_DATA_DIR", str(tmp_path / "data"))  # where this client keeps its serving alerts
    user, nodes, model = partitioned["user"], list(partitioned["nodes"].values()), partitioned["model"]
    prompt, new_tokens = [9, 8, 7, 6, 5, 4], 12
    ids = torch.tensor([prompt])
    want = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, eos_token_id=None)[0, len(prompt):].tolist()
    result, cut, times = Generation(prompt_tokens=len(prompt)), [], []

    def on_token(_token: int) -> None:
        if len(result.token_ids) == 4 and not cut:
            first, second = (int(stage["node"][1:]) for stage in result.routes[-1])
            partitioned["namespaces"].cut(first, second)
            cut.append(f"n{second}")
            times.append(time.perf_counter())
        elif cut and len(times) == 1:
            times.append(time.perf_counter())  # the first token after the cut

    async def go() -> None:
        async with ConnectionPool(user) as pool:
            await generate_with_failover(pool, lambda: live_stages(user, nodes, "tiny"), "tiny", 5, prompt,
                                         new_tokens, set(), SamplingParams(), on_token=on_token, result=result)

    asyncio.run(go())
    assert cut, "the link was never cut"
    assert result.token_ids == want
    assert result.failovers, "the cut went unnoticed"
    assert cut[0] not in [stage["node"] for stage in result.routes[-1]]  # around the cut, through the replica
    # The stage before the cut says so when its push goes unanswered (PUSH_TIMEOUT_S), not the client's
    # 60 s step timeout, and blames the node behind the cut only (it alone holds the first layers).
    stall = times[1] - times[0]
    assert result.failovers[0]["suspects"] == cut and stall < 40, (stall, result.failovers)  # not the 60 s timeout
    # The client that generated keeps the serving alert (dllmctl alerts, llm://alerts).
    assert [(a.code, a.node) for a in recent()] == [("node_lost", cut[0])]
    report_figures(f"partition: a link cut between two stages mid-generation: same tokens, failed over in "
                   f"{stall:.1f} s (cut to next token) around {cut[0]}")
