"""The user's path through the CLI: import, plan, deploy, infer — including the real SmolLM2 split over
three daemons by compute (the head counted), token-identical to transformers' generate; and tensor
parallelism through plan, deploy and infer."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import run_cli
from tests.tiny_models import make_tiny_model


def _ok(done):
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def cluster3(user_env, user, tmp_path):
    _ok(run_cli("dllmctl", "cluster", "up", "--local", "3", "--dir", str(tmp_path / "c"), "--json"))
    yield tmp_path / "c"
    run_cli("dllmctl", "cluster", "down", "--dir", str(tmp_path / "c"))


def test_tiny_model_through_the_cli(cluster3, tmp_path):
    source = make_tiny_model("mistral", tmp_path / "src")
    _ok(run_cli("dllmctl", "model", "import", str(source), "--name", "tiny", "--json"))
    plan = _ok(run_cli("dllmctl", "plan", "tiny", "--json"))
    assert plan["model"] == "tiny" and [s["node"] for s in plan["spans"]] == ["local-1", "local-2", "local-3"]
    assert plan["spans"][0]["embed"] and plan["spans"][-1]["head"] and plan["spans"][-1]["end"] == 7
    # Deploy an uneven plan of our own.
    plan["spans"] = [{**s, "start": a, "end": b, "embed": a == 0, "head": b == 7}
                     for s, (a, b) in zip(plan["spans"], [(0, 1), (1, 5), (5, 7)])]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    reports = _ok(run_cli("dllmctl", "deploy", "tiny", "--plan", str(tmp_path / "plan.json"), "--json"))
    assert sorted((r["node"], r["start"], r["end"]) for r in reports) == [("local-1", 0, 1), ("local-2", 1, 5),
                                                                          ("local-3", 5, 7)]
    again = _ok(run_cli("dllmctl", "deploy", "tiny", "--plan", str(tmp_path / "plan.json"), "--json"))
    assert all(r["bytes_sent"] == 0 for r in again)  # nodes already hold their files
    rows = _ok(run_cli("dllmctl", "nodes", "list", "--json"))
    assert sorted((s["start"], s["end"]) for r in rows for s in r["serving"]) == [(0, 1), (1, 5), (5, 7)]

    result = _ok(run_cli("dllmctl", "infer", "The quick brown fox", "-m", "tiny", "--raw", "--max-new-tokens", "12",
                         "--temperature", "0", "--json"))
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    ids = tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    want = model.generate(ids, max_new_tokens=12, do_sample=False,
                          eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
    assert result["token_ids"] == want
    assert result["prompt_tokens"] == ids.shape[1] and result["new_tokens"] == len(want)
    assert [r["node"] for r in result["route"]] == ["local-1", "local-2", "local-3"]
    assert set(result) == {"text", "token_ids", "prompt_tokens", "new_tokens", "seconds", "tokens_per_second", "route",
                           "failovers", "ttft_ms", "cached_tokens", "finish_reason", "sampling"}
    assert result["sampling"]["temperature"] == 0 and result["sampling"]["seed"] == 0
    assert result["ttft_ms"] > 0 and result["cached_tokens"] == 0
    assert result["failovers"] == []

    chat = run_cli("dllmctl", "infer", "Hello!", "-m", "tiny", "--max-new-tokens", "5")
    assert chat.returncode == 0, chat.stderr

    # Bad input: clear errors, no tracebacks, and the cluster keeps serving.
    for args, needle in ((["infer", "hi", "-m", "ghost"], "no model 'ghost'"),
                         (["infer", "hi " * 400, "-m", "tiny", "--raw"], "exceeds the model's context"),
                         (["infer", "hi", "-m", "tiny", "--max-new-tokens", "0"], "Usage"),
                         (["deploy", "tiny", "--plan", str(tmp_path / "nope.json")], "cannot read plan")):
        done = run_cli("dllmctl", *args)
        assert done.returncode != 0 and needle in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)

    # A node down: the error names what to do.
    state = json.loads((cluster3 / "cluster.json").read_text())["nodes"]
    os.kill(state[1]["pid"], signal.SIGKILL)
    down = run_cli("dllmctl", "infer", "hi", "-m", "tiny", "--raw")
    assert down.returncode == 1 and "layers 1-4 of" in down.stderr and "Traceback" not in down.stderr
    ok = _ok(run_cli("dllmctl", "undeploy", "tiny", "--json"))
    assert ok["local-1"] == "unloaded" and ok["local-2"].startswith("error")


def test_smollm2_three_nodes_matches_local_generate(cluster3, smollm2_gguf, user_env, tmp_path):
    env = {"DLLM_CACHE_DIR": str(smollm2_gguf.parent.parent)}  # reuse the downloaded package
    pulled = _ok(run_cli("dllmctl", "model", "pull", "smollm2-135m-instruct", "--json", env=env))
    assert pulled["layers"] == 30 and pulled["family"] == "llama"
    plan = _ok(run_cli("dllmctl", "plan", "smollm2-135m-instruct", "--json"))
    spans = [(s["start"], s["end"]) for s in plan["spans"]]
    assert len(spans) == 3 and spans[0][0] == 0 and spans[-1][1] == 30 and all(
        a[1] == b[0] for a, b in zip(spans, spans[1:]))
    # The last stage also runs the head (the tied 113 MB matrix): it gets fewer layers, and the modelled
    # time per token of every stage is within 15% of the mean.
    assert spans[-1][1] - spans[-1][0] < min(b - a for a, b in spans[:-1])
    times = [s["expected_ms"] for s in plan["spans"]]
    assert max(times) <= 1.15 * sum(times) / 3, times
    _ok(run_cli("dllmctl", "deploy", "smollm2-135m-instruct", "--json"))
    result = _ok(run_cli("dllmctl", "infer", "Generate a story about a robot", "-m", "smollm2-135m-instruct",
                         "--max-new-tokens", "24", "--temperature", "0", "--json"))
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Generate a story about a robot"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert result["prompt_tokens"] == len(prompt)
    want = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    assert result["token_ids"] == want
    assert "robot" in result["text"].lower() or len(result["text"]) > 20


def test_tensor_parallel_through_the_cli(cluster3, tmp_path):
    """plan / deploy / infer with --parallelism tensor and hybrid: groups, slices and expected times in the
    plan, a clear error before anything is deployed, --deploy, and a refusal naming the counts that work."""
    source = make_tiny_model("qwen2", tmp_path / "src", hidden_size=96, num_attention_heads=12, num_key_value_heads=6)
    _ok(run_cli("dllmctl", "model", "import", str(source), "--name", "tp", "--json"))
    plan = _ok(run_cli("dllmctl", "plan", "tp", "--parallelism", "tensor", "--tp", "3", "--json"))
    slices = [s["tensor_slice"] for s in plan["spans"]]
    assert [s["rank"] for s in slices] == [0, 1, 2] and len({s["group"] for s in slices}) == 1
    assert slices[-1]["kv_hi"] == 6 and all(s["expected_ms"] > 0 for s in plan["spans"])
    refused = run_cli("dllmctl", "plan", "tp", "--parallelism", "tensor", "--tp", "7")
    assert refused.returncode != 0 and "1 to 6 members" in " ".join(refused.stderr.split())

    prompt = ["The quick brown fox", "-m", "tp", "--raw", "--max-new-tokens", "8", "--temperature", "0", "--json"]
    missing = run_cli("dllmctl", "infer", *prompt, "--parallelism", "tensor")
    assert missing.returncode != 0 and "dllmctl deploy tp --parallelism tensor" in " ".join(missing.stderr.split())
    result = _ok(run_cli("dllmctl", "infer", *prompt, "--parallelism", "tensor", "--deploy", "--tp", "2"))
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    ids = tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    want = model.generate(ids, max_new_tokens=8, do_sample=False,
                          eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
    assert result["token_ids"] == want and len(result["route"]) == 1
    rows = _ok(run_cli("dllmctl", "nodes", "list", "--json"))
    members = sorted(s["tensor_slice"]["rank"] for r in rows for s in r["serving"] if s.get("tensor_slice"))
    assert members == [0, 1]
    other = run_cli("dllmctl", "bench", "infer", "-m", "tp", "--parallelism", "tensor", "--tp", "3")
    said = " ".join(other.stderr.split())  # the benchmark runs what is deployed: another group size is refused
    assert other.returncode != 0 and "groups have 2 members" in said and "--parallelism tensor --tp 3" in said
    # The third node is free, but a hybrid layout needs two groups: refused, the tensor layout untouched.
    hybrid = run_cli("dllmctl", "deploy", "tp", "--parallelism", "hybrid", "--tp", "2")
    assert hybrid.returncode != 0 and "already serve tp" in " ".join(hybrid.stderr.split())
    again = _ok(run_cli("dllmctl", "infer", *prompt, "--parallelism", "tensor"))
    assert again["token_ids"] == want
