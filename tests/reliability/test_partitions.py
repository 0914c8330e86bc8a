"""Partitions: a link cut between two stages mid-generation, with a replica elsewhere, gives the
fault-free tokens; a link cut between two training workers mid-job drops one of them, as a dead node
would be, and the job ends with the weights of one process.

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
        self.cuts: set[tuple[int, int]] = set()

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
        self.cuts.add((a, b))

    def heal(self) -> None:
        """Every cut link mended."""
        for a, b in self.cuts:
            for x, y in ((a, b), (b, a)):
                subprocess.run(["ip", "-n", self.names[x - 1], "route", "del", "blackhole", f"{_address(y)}/32"],
                               capture_output=True)
        self.cuts.clear()

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
            yield {"user": user, "nodes": nodes, "namespaces": namespaces, "model": model, "source": source,
                   "store": store, "root": root}
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


def test_a_link_cut_between_two_training_workers_drops_one_and_the_job_ends_with_one_process_weights(
        partitioned, report_figures):
    """Data parallelism on n1 (the coordinator), n2, n3; the n2-n3 link (ring neighbours) cut after
    step 3. Every node still answers the coordinator, so the stalled step is found by its deadline,
    the nodes ping each other (train.probe), the pair that cannot is reported (link_lost) and n3 is
    dropped; its shard moves to a spare holder and the job finishes on n1 and n2."""
    from safetensors.torch import load_file

    from dllmctl.data.sharding import ShardRequest, shard_and_push
    from dllmctl.training.jobs import job_call, job_metrics, job_spec, submit
    from dllmd.data.shards import read_shard
    from dllmd.net.messages import training as S
    from dllmd.train.local import train_locally
    from dllmd.train.optim import OptimConfig
    from dllmd.train.worker import ShardRows
    from tests.test_train import _corpus, _max_diff

    user, namespaces, root = partitioned["user"], partitioned["namespaces"], partitioned["root"]
    namespaces.heal()  # the generation test above cut a link of its own
    entries = list(partitioned["nodes"].values())
    model_dir = partitioned["store"].root / "tiny"
    dataset = shard_and_push(user, entries, ShardRequest(uri=str(_corpus(root / "repo")), model="tiny",
                                                         model_dir=model_dir, strategy="random", name="three",
                                                         seq_len=32))
    steps, batch, micro, lr = 40, 6, 2, 1e-4  # enough that the poll below sees step 3 before the end
    spec = job_spec("tiny", dataset, entries, batch_size=batch, micro_batch_size=micro, epochs=0, max_steps=steps,
                    lr=lr, checkpoint_every=0)
    job = asyncio.run(submit(user, entries, model_dir, spec))["job"]
    coordinator, cut_at, started = entries[0], None, time.monotonic()
    while (shown := asyncio.run(job_call(user, coordinator, S.JOBS_SHOW, {"job": job})))["state"] in ("queued",
                                                                                                      "running"):
        assert time.monotonic() - started < 300, shown
        if cut_at is None and shown["step"] >= 3:
            namespaces.cut(2, 3)
            cut_at = time.time()  # the events' clock
        time.sleep(0.2)
    assert cut_at is not None, "the job ended before the link was cut"
    assert shown["state"] == "done" and shown["step"] == steps, shown
    link_lost = [e for e in shown["events"] if e["kind"] == "link_lost"]
    assert [e["message"] for e in link_lost] == ["n2 and n3 cannot reach each other"]
    recovered = next(e for e in shown["events"] if e["kind"] == "shard_moved")["time"]
    metrics = asyncio.run(job_metrics(user, coordinator, job))["metrics"]
    assert sorted(metrics[-1]["nodes"]) == ["n1", "n2"]
    shards = {}
    for i, entry in enumerate(entries, 1):
        tokens, meta = read_shard(root / f"n{i}" / "datasets" / "three" / "shard.safetensors")
        shards[entry.public_key] = ShardRows(tokens, int(meta["tokens"]))
    weights = load_file(str(root / "n1" / "jobs" / job / "checkpoints" / f"step-{steps:06d}" / "model.safetensors"))
    assert _max_diff(weights, train_locally(model_dir, shards, steps, batch, micro, OptimConfig(lr=lr))) <= 1e-5
    namespaces.heal()
    report_figures(f"partition: a link cut between two training workers: n3 dropped and its shard moved "
                   f"{recovered - cut_at:.1f} s after the cut, weights equal one process's")
