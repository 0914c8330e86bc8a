"""Nothing of a prompt on disk: generate with a unique marker prompt through two daemons logging at
debug level (ordinary mode, private mode, and the OpenAI-compatible API), then search every file of
every node (logs, homes, state) and of the client (its DLLM_* config, data and cache dirs) for the
marker, for the prompt's and the reply's token ids as text lists and as raw int32/int64 bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from tests.conftest import cli_user_cluster, run_cli
from tests.test_cli_inference import _ok
from tests.tiny_models import make_tiny_model

MARKER = "XylophoneQuokka9137 secret ledger"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("nothing-on-disk")
    with cli_user_cluster(root, 2, "--verbose"):
        yield root


def _needles(prompt_ids: list[int], reply_ids: list[int]) -> dict[str, bytes]:
    needles = {"marker": MARKER.encode(), "marker word": MARKER.split()[0].encode()}
    for label, ids in (("prompt", prompt_ids), ("reply", reply_ids)):
        ids = ids[:4]
        needles[f"{label} ids as text"] = ("[" + ", ".join(map(str, ids))).encode()
        needles[f"{label} ids as text, no spaces"] = ("[" + ",".join(map(str, ids))).encode()
        for dtype in (torch.int32, torch.int64):
            needles[f"{label} ids as {dtype}"] = torch.tensor(ids, dtype=dtype).numpy().tobytes()
    return needles


def _search(root: Path, needles: dict[str, bytes]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and "src-" not in path.parts[-2]:
            data = path.read_bytes()
            found += [f"{label} in {path.relative_to(root)}" for label, needle in needles.items() if needle in data]
    return found


def test_no_log_home_or_state_file_holds_the_prompt_or_its_tokens(root):
    source = make_tiny_model("llama", root / "src-llama")
    for name, private in (("tiny", []), ("tiny-private", ["--private"])):
        _ok(run_cli("dllmctl", "model", "import", str(source), "--name", name, "--json"))
        _ok(run_cli("dllmctl", "deploy", name, *private, "--json"))
    prompt_ids = AutoTokenizer.from_pretrained(source)(MARKER)["input_ids"]
    assert len(prompt_ids) >= 4

    plain = _ok(run_cli("dllmctl", "infer", MARKER, "-m", "tiny", "--raw", "--max-new-tokens", "8",
                        "--temperature", "0", "--json"))
    private = _ok(run_cli("dllmctl", "infer", MARKER, "-m", "tiny-private", "--private", "--raw",
                          "--max-new-tokens", "8", "--temperature", "0", "--json"))
    assert private["token_ids"] == plain["token_ids"] and private["prompt_tokens"] == len(prompt_ids)
    assert all(r["start"] >= 1 for r in private["route"])

    from starlette.testclient import TestClient

    from dllmctl.frontends.openai_api import make_app
    from dllmctl.paths import identity_path
    from dllmd.net.identity import Identity

    with TestClient(make_app(Identity.load(identity_path())), base_url="http://localhost") as api:
        reply = api.post("/v1/completions", json={"model": "tiny", "prompt": MARKER, "max_tokens": 8,
                                                  "temperature": 0})
    assert reply.status_code == 200, reply.text

    needles = _needles(prompt_ids, plain["token_ids"])
    planted = root / "c" / "planted.bin"  # the search finds what it looks for
    planted.write_bytes(b"x" + needles["prompt ids as torch.int64"])
    assert _search(root, needles) == ["prompt ids as torch.int64 in c/planted.bin"]
    planted.unlink()
    leaks = _search(root, needles)
    assert not leaks, leaks
    logs = list(root.rglob("dllmd.log"))
    assert len(logs) == 2 and all("DEBUG" in p.read_text() for p in logs)  # the daemons did log verbosely
