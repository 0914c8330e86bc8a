"""Differential privacy (DP-SGD) for data-parallel jobs: the accountant agrees with Opacus, each
example's gradient is its own and an outlier moves the clipped sum by at most the clip, and through
two real daemons a DP job ends with the weights of one-process DP training, reports epsilon
everywhere, stops at its budget, and refuses what is not built before any job exists."""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file

from dllmd.net.client import RemoteError, RpcClient
from dllmd.net.identity import Identity
from dllmd.net.messages import training as S
from dllmd.net.wire import ErrorCode
from dllmd.train import schedule
from dllmd.train.local import train_locally
from dllmd.train.model import load_causal_lm, parameters, row_targets
from dllmd.train.optim import OptimConfig
from dllmd.train.privacy.accountant import PrivacyAccountant
from dllmd.train.privacy.clipping import clip_factors, clipped_gradient_sum, per_example_gradients
from dllmd.train.privacy.noise import gaussian_noise
from dllmd.train.worker import ShardRows
from tests.conftest import cli_user_cluster, run_cli
from tests.test_cli_inference import _ok
from tests.test_train import LR, _corpus, _max_diff, _restart, _shards, _wait_exited
from tests.tiny_models import make_tiny_model, make_tokenizer

STEPS, BATCH, MICRO = 4, 6, 2
CLIP, NOISE, DELTA = 1.0, 1.0, 1e-5
NODES = "local-1,local-2"
DP = ("--dp-clip", str(CLIP), "--dp-noise-multiplier", str(NOISE))


def _opacus_epsilon(noise: float, rate: float, steps: int, delta: float) -> float:
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=noise, sample_rate=rate)
    return accountant.get_epsilon(delta=delta)


# --- without daemons ------------------------------------------------------------------------------

def test_the_accountant_spends_what_opacus_counts():
    for noise, rate, steps, delta in ((1.0, 0.01, 100, 1e-5), (0.6, 0.2, 7, 1e-6), (2.5, 1.0, 3, 1e-3)):
        accountant = PrivacyAccountant(noise, rate, delta)
        assert accountant.epsilon(steps) == pytest.approx(_opacus_epsilon(noise, rate, steps, delta), rel=1e-12)
        assert accountant.epsilon(0) == 0.0
    accountant = PrivacyAccountant(1.0, 0.05, 1e-5)
    budget = accountant.epsilon(40) * 1.0001
    within = accountant.steps_within(budget, 1000)
    assert within == 40 and accountant.epsilon(within) <= budget < accountant.epsilon(within + 1)
    assert accountant.steps_within(1e6, 25) == 25  # the limit binds before the budget
    for args, needle in (((0.0, 0.1, 1e-5), "noise multiplier"), ((-1.0, 0.1, 1e-5), "noise multiplier"),
                         ((1.0, 0.0, 1e-5), "sample rate"), ((1.0, 1.5, 1e-5), "sample rate"),
                         ((1.0, 0.1, 0.0), "delta"), ((1.0, 0.1, 1.0), "delta"), ((math.nan, 0.1, 1e-5), "noise")):
        with pytest.raises(ValueError, match=needle):
            PrivacyAccountant(*args)


def test_noise_is_one_seeded_draw_and_poisson_batches_are_what_the_accountant_assumes():
    a = gaussian_noise(100_000, 0.5, seed=7, step=3)
    assert a.dtype == torch.float32 and torch.equal(a, gaussian_noise(100_000, 0.5, seed=7, step=3))
    assert not torch.equal(a, gaussian_noise(100_000, 0.5, seed=7, step=4))
    assert not torch.equal(a, gaussian_noise(100_000, 0.5, seed=7, step=3, salt=1))
    assert float(a.std()) == pytest.approx(0.5, rel=0.02) and abs(float(a.mean())) < 0.01

    rows = {"b": 300, "a": 700}
    first = schedule.poisson_batch(rows, 0.01, seed=5, step=0)
    assert first == schedule.poisson_batch(dict(reversed(rows.items())), 0.01, seed=5, step=0)  # not by holder
    sizes = [len(schedule.poisson_batch(rows, 0.01, seed=5, step=s)) for s in range(400)]
    assert len(set(sizes)) > 5  # the batch size varies
    assert [] in [schedule.poisson_batch({"a": 20}, 0.05, 5, s) for s in range(20)]  # and can be empty
    assert sum(sizes) / len(sizes) == pytest.approx(10, rel=0.1)  # q x rows on average
    share_a = sum(r.shard == "a" for s in range(400) for r in schedule.poisson_batch(rows, 0.01, 5, s))
    assert share_a / sum(sizes) == pytest.approx(0.7, abs=0.05)  # every row alike, whatever its shard


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> torch.nn.Module:
    return load_causal_lm(tiny_dir, sorted(tiny_dir.glob("*.safetensors")))


def _rows(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = make_tokenizer()
    tokens = torch.tensor([tokenizer(t * 8)["input_ids"][:32] for t in texts], dtype=torch.int32)
    offsets = torch.arange(len(texts)) * 32
    return tokens, row_targets(tokens, offsets, torch.full_like(offsets, 10**6))


def _outlier(model: torch.nn.Module, first: int) -> torch.Tensor:
    """A planted row: after its first token, each token is the one the model finds least likely."""
    tokens = [first]
    with torch.no_grad():
        for _ in range(31):
            tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmin()))
    return torch.tensor([tokens], dtype=torch.int32)


def test_each_example_gets_its_own_gradient_and_an_outlier_moves_the_sum_by_at_most_the_clip(tiny):
    tokens, labels = _rows(["def f1(x):\n    return x + 1\n", "The quick brown fox. ", "Hello! 42 = ( ) "])
    grads, totals, counts = per_example_gradients(tiny, tokens, labels)
    for i in range(len(tokens)):  # each is the gradient of that example's mean token loss, alone
        tiny.zero_grad()
        logits = tiny(input_ids=tokens[i:i + 1].long()).logits[0]
        torch.nn.functional.cross_entropy(logits, labels[i], ignore_index=-100).backward()
        assert max(float((grads[n][i] - p.grad).abs().max()) for n, p in parameters(tiny)) <= 1e-5
    assert counts.tolist() == [31, 31, 31]

    outlier = _outlier(tiny, int(tokens[0, 0]))
    outlier_labels = row_targets(outlier, torch.zeros(1, dtype=torch.long), torch.tensor([10**6]))
    raw = float(clip_factors(per_example_gradients(tiny, outlier, outlier_labels)[0], CLIP)[0])

    def moved(clip: float) -> float:
        """How far adding the outlier (in a micro-batch of its own choosing) moves the clipped sum."""
        def summed(batches) -> torch.Tensor:
            clipped_gradient_sum(tiny, batches, clip)
            return torch.cat([p.grad.reshape(-1) for _, p in parameters(tiny)])

        without = summed([(tokens, labels)])
        with_outlier = summed([(tokens[:2], labels[:2]), (torch.cat([outlier, tokens[2:]]),
                                                          torch.cat([outlier_labels, labels[2:]]))])
        return float(torch.linalg.vector_norm(with_outlier - without))

    clip = raw / 100  # the outlier's gradient is a hundred times what the clip lets through
    print(f"outlier gradient norm {raw:.3g}, clip {clip:.3g}: the clipped sum moved by {moved(clip):.3g}")
    assert clip * 0.99 <= moved(clip) <= clip * (1 + 1e-4)
    assert moved(1e9) == pytest.approx(raw, rel=1e-4)  # unclipped, it moves the sum by all of its gradient


def test_a_step_whose_poisson_batch_is_empty_adds_noise_alone(tiny_dir):
    tokens = torch.randint(0, 300, (20, 32), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    rows = {"a": ShardRows(tokens, 20 * 32)}
    seed = next(s for s in range(1, 100) if not schedule.poisson_batch({"a": 20}, 1 / 20, s, 0))  # step 0 is empty
    seen = []
    plan = S.PrivacyPlan(clip=CLIP, noise_multiplier=NOISE, expected_batch_size=1, seed=seed)
    weights = train_locally(tiny_dir, rows, 1, 1, 1, OptimConfig(lr=LR), privacy=plan,
                            on_step=lambda step, m: seen.append(m))
    assert seen[0]["rows"] == 0 and seen[0]["tokens"] == 0 and seen[0]["loss"] is None
    before = load_causal_lm(tiny_dir, sorted(tiny_dir.glob("*.safetensors")))
    moved = [float((weights[n] - p).abs().max()) for n, p in parameters(before)]
    assert all(math.isfinite(m) for m in moved) and min(moved) > 0  # the noise moved every weight


# --- through two daemons --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two daemons, a user, the tiny Llama and a dataset sharded over both."""
    root = tmp_path_factory.mktemp("dp")
    with cli_user_cluster(root, 2) as cluster:
        _ok(run_cli("dllmctl", "model", "import", str(make_tiny_model("llama", root / "src")), "--name", "tiny",
                    "--json"))
        _ok(run_cli("dllmctl", "shard-data", str(_corpus(root / "repo")), "-m", "tiny", "--strategy", "random",
                    "--seq-len", "32", "--nodes", NODES, "--name", "two", "--json"))
        yield cluster


def _train(*extra: str, steps: int = STEPS, batch: int = BATCH, micro: int = MICRO) -> dict:
    return _ok(run_cli("dllmctl", "train", "-m", "tiny", "-d", "two", "--nodes", NODES, "--max-steps", str(steps),
                       "--batch-size", str(batch), "--micro-batch-size", str(micro), "--lr", str(LR), "--json", *extra,
                       timeout=300))


def _stored_spec(cluster: Path, job: str) -> dict:
    """The job as its coordinator stored it, secret DP seed included (``jobs show`` never shows it)."""
    with sqlite3.connect(cluster / "local-1" / "jobs.sqlite") as db:
        return json.loads(db.execute("SELECT spec FROM jobs WHERE id = ?", (job,)).fetchone()[0])


def _checkpoint_state(cluster: Path, job: str, step: int) -> dict:
    return json.loads((cluster / "local-1" / "jobs" / job / "checkpoints" / f"step-{step:06d}" / "state.json")
                      .read_text())


def _nodes(cluster: Path) -> list[dict]:
    return json.loads((cluster / "cluster.json").read_text())["nodes"]


def _dataset(cluster: Path) -> dict:
    return _shards(cluster, {n["name"]: n["public_key"] for n in _nodes(cluster)}, "two")


def _rate(job: dict) -> float:
    return BATCH / sum(s["rows"] for s in job["spec"]["shards"])


def _local_dp_training(cluster: Path, job: str, steps: int) -> tuple[dict, list[int]]:
    """One-process DP training with the job's secret seed: its weights and each step's Poisson batch size."""
    plan = S.PrivacyPlan(clip=CLIP, noise_multiplier=NOISE, expected_batch_size=BATCH,
                         seed=_stored_spec(cluster, job)["dp_seed"])
    rows = []
    weights = train_locally(cluster.parent / "data" / "models" / "tiny", _dataset(cluster), steps, BATCH, MICRO,
                            OptimConfig(lr=LR), privacy=plan, on_step=lambda step, m: rows.append(m["rows"]))
    return weights, rows


def _export(job: str, directory: Path) -> dict:
    _ok(run_cli("dllmctl", "checkpoints", "export", job, "--name", directory.name, "--dir", str(directory), "--json"))
    return load_file(str(directory / "model.safetensors"))


def _epsilons(job: dict, steps: int) -> list[float]:
    """What Opacus counts after each of ``steps`` steps at the job's sampling rate."""
    return [_opacus_epsilon(NOISE, _rate(job), step + 1, DELTA) for step in range(steps)]


def test_a_dp_job_on_two_nodes_equals_one_process_dp_training(cluster, tmp_path):
    for backend in ("zmq", "torch"):
        job = _train(*DP, "--backend", backend)
        assert job["state"] == "done" and job["step"] == STEPS, job
        assert "dp_seed" not in job["spec"]
        privacy = job["privacy"]
        assert privacy["steps"] == STEPS and privacy["delta"] == DELTA
        assert privacy["sample_rate"] == pytest.approx(_rate(job))
        assert privacy["epsilon"] == pytest.approx(_epsilons(job, STEPS)[-1], rel=1e-9)
        metrics = _ok(run_cli("dllmctl", "metrics", job["job"], "--json"))
        assert [m["epsilon"] for m in metrics] == pytest.approx(_epsilons(job, STEPS), rel=1e-9)
        assert {m["delta"] for m in metrics} == {DELTA}
        assert _checkpoint_state(cluster, job["job"], STEPS)["privacy"]["epsilon"] == pytest.approx(privacy["epsilon"])
        reference, rows = _local_dp_training(cluster, job["job"], STEPS)
        assert rows == [m["rows"] for m in metrics]  # the same Poisson batches
        assert _max_diff(_export(job["job"], tmp_path / f"private-{backend}"), reference) <= 1e-5, backend

    table = run_cli("dllmctl", "metrics", job["job"], env={"COLUMNS": "200"})
    assert table.returncode == 0 and "epsilon" in table.stdout
    shown = run_cli("dllmctl", "jobs", "show", job["job"], env={"COLUMNS": "200"})
    wanted = f"epsilon {privacy['epsilon']:.4g} spent at delta 1e-05 after {STEPS} steps"
    assert wanted in " ".join(shown.stdout.split())


def test_a_resumed_dp_job_continues_the_accounting_and_ends_with_one_process_weights(cluster, tmp_path):
    steps = 6
    coordinator = _restart(cluster, "local-1", failpoints="jobs.step@3=exit")  # dies as it starts step 3
    job = _train(*DP, "--checkpoint-every", "2", "--detach", steps=steps)["job"]
    _wait_exited(coordinator)
    _restart(cluster, "local-1")  # disarmed; the restart marks the job interrupted
    shown = _ok(run_cli("dllmctl", "jobs", "show", job, "--json"))
    assert shown["state"] == "interrupted" and shown["step"] == 3 and shown["privacy"]["steps"] == 3, shown
    resumed = _ok(run_cli("dllmctl", "jobs", "resume", job, "--follow", "--json", timeout=300))
    assert resumed["state"] == "done" and resumed["step"] == steps
    assert any(e["kind"] == "resumed" and e["message"] == "from step 2" for e in resumed["events"])
    metrics = _ok(run_cli("dllmctl", "metrics", job, "--json"))
    assert [m["step"] for m in metrics] == list(range(steps))
    assert [m["epsilon"] for m in metrics] == pytest.approx(_epsilons(resumed, steps), rel=1e-9)
    assert resumed["privacy"]["epsilon"] == pytest.approx(_epsilons(resumed, steps)[-1], rel=1e-9)
    reference, rows = _local_dp_training(cluster, job, steps)
    assert rows == [m["rows"] for m in metrics]
    assert _max_diff(_export(job, tmp_path / "resumed"), reference) <= 1e-5


def test_a_budget_ends_the_job_before_the_step_that_would_exceed_it(cluster):
    # One row per step on average: most steps leave a worker without rows, some the whole batch.
    rate = 1 / sum(shard.tokens.shape[0] for shard in _dataset(cluster).values())
    spent = [_opacus_epsilon(NOISE, rate, n, DELTA) for n in (8, 9)]
    budget = (spent[0] + spent[1]) / 2  # eight steps fit, the ninth would not
    job = _train(*DP, "--dp-epsilon-budget", f"{budget:.9g}", steps=20, batch=1, micro=1)
    assert job["state"] == "done" and job["step"] == 8 and job["total_steps"] == 20, job
    event = next(e for e in job["events"] if e["kind"] == "privacy_budget")
    assert "in 8 steps" in event["message"] and "over the budget" in event["message"]
    assert job["privacy"]["epsilon"] == pytest.approx(spent[0]) and spent[0] <= budget
    assert [c["step"] for c in job["checkpoints"]] == [8]
    state = _checkpoint_state(cluster, job["job"], 8)
    assert state["privacy"]["steps"] == 8 and state["privacy"]["epsilon"] == pytest.approx(spent[0])
    metrics = _ok(run_cli("dllmctl", "metrics", job["job"], "--json"))
    assert len(metrics) == 8 and min(n["rows"] for m in metrics for n in m["nodes"].values()) == 0


def test_what_is_not_built_or_not_private_is_refused_before_a_job_exists(cluster):
    before = _ok(run_cli("dllmctl", "jobs", "list", "--json"))
    for args, needle in (
            ([*DP, "--parallelism", "model"], "differential privacy is built for --parallelism data and federated"),
            ([*DP, "--dtype", "bfloat16"], "differential privacy runs in --dtype float32 only"),
            (["--dp-clip", "1"], "clipping without noise is not differential privacy"),
            (["--dp-noise-multiplier", "1"], "--dp-noise-multiplier needs --dp-clip"),
            (["--dp-clip", "1", "--dp-noise-multiplier", "-1"], "--dp-noise-multiplier must be a positive number"),
            (["--dp-clip", "-0.5", "--dp-noise-multiplier", "1"], "--dp-clip must be a positive number"),
            ([*DP, "--dp-delta", "1"], "--dp-delta must be between 0 and 1"),
            ([*DP, "--dp-delta", "0"], "--dp-delta must be between 0 and 1"),
            ([*DP, "--dp-delta", "nan"], "--dp-delta must be between 0 and 1"),
            (["--dp-epsilon-budget", "3"], "--dp-epsilon-budget needs differential privacy"),
            ([*DP, "--dp-epsilon-budget", "0.0001"], "--dp-epsilon-budget allows no step")):
        done = run_cli("dllmctl", "train", "-m", "tiny", "-d", "two", "--nodes", NODES, "--max-steps", "2", *args)
        message = " ".join(done.stderr.split())
        assert done.returncode == 1 and needle in message and "Traceback" not in done.stderr, (args, message)

    # A client that skips dllmctl's checks meets the coordinator's: the same words, code bad_args.
    nodes = [S.NodeRef(n["name"], n["address"], n["public_key"]) for n in _nodes(cluster)]
    shards = [S.ShardRef(id=n.public_key, node=n.name, rows=10) for n in nodes]
    user = Identity.load(cluster.parent / "config" / "identity")

    async def submit(spec: S.JobSpec) -> None:
        async with RpcClient(user, nodes[0].address, nodes[0].public_key) as client:
            await client.invoke(S.JOBS_SUBMIT, spec, timeout=30)

    for extra, needle in (({"parallelism": "model", "stages": [S.StageSpan(0, 3), S.StageSpan(3, 5)]},
                           "differential privacy is built for --parallelism data and federated"),
                          ({"dtype": "bfloat16"}, "differential privacy runs in --dtype float32 only"),
                          ({"dp_noise_multiplier": 0.0}, "clipping without noise")):
        spec = S.JobSpec(model="tiny", dataset="two", nodes=nodes, shards=shards, max_steps=2, batch_size=2,
                         **{"dp_clip": CLIP, "dp_noise_multiplier": NOISE, **extra})
        with pytest.raises(RemoteError) as refused:
            asyncio.run(submit(spec))
        assert refused.value.code == ErrorCode.BAD_ARGS and needle in str(refused.value), str(refused.value)
    assert _ok(run_cli("dllmctl", "jobs", "list", "--json")) == before
