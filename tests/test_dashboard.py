"""``dllmctl serve --dashboard`` in a real browser (Debian's chromium, driven by playwright) against
two real local daemons serving a tiny model, one of which has run a short training job (with an
alert event in its record): the page asks for the API key, refuses a wrong one without showing data,
shows which node holds which layers (what ``dllmctl nodes list`` says), the job with its loss chart
(what ``dllmctl metrics`` says) and its events (the alert highlighted), and its chat box streams the
answer the API gives non-streamed; the data endpoints take the key as /v1 does."""

from __future__ import annotations

import json
import re
import shutil
import urllib.error
import urllib.request
from email.message import Message

import pytest

from dllmd.train.jobs import JobStore
from tests.api_cluster import MODEL, _ok, serve_api, start_user_cluster, stop_user_cluster
from tests.conftest import run_cli

KEY = "sk-dash-0123456789abcdef"
MAX_TOKENS = 12
STEPS = 3
UI_TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two daemons with the tiny model deployed across them, a finished 3-step training job on the
    first, and the API with its dashboard on them; yields (server root URL, env, job name)."""
    root = tmp_path_factory.mktemp("dashboard")
    env = start_user_cluster(root, nodes=2)
    try:
        job = _train(root, env)
        with serve_api(root / "serve.log", env, KEY, "--dashboard") as v1:
            yield v1.removesuffix("/v1"), env, job
    finally:
        stop_user_cluster(root, env)


def _train(root, env: dict) -> str:
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 5}\n" * 3)
    _ok(run_cli("dllmctl", "shard-data", str(corpus), "-m", MODEL, "--strategy", "random", "--seq-len", "32",
                "--nodes", "local-1", "--name", "code", "--json", env=env))
    done = _ok(run_cli("dllmctl", "train", "-m", MODEL, "-d", "code", "--nodes", "local-1", "--max-steps", str(STEPS),
                       "--batch-size", "2", "--micro-batch-size", "2", "--follow", "--json", env=env, timeout=300))
    assert done["state"] == "done", done
    # An alert, recorded the way the coordinator's alert watcher records one: an event of the job,
    # kind alert.<code>, the alert's JSON as its message, in the coordinator's own job store.
    store = JobStore(root / "cluster" / "local-1" / "jobs.sqlite")
    store.event(done["job"], "alert.loss_diverged", json.dumps(
        {"code": "loss_diverged", "severity": "critical", "job": done["job"], "node": "local-1",
         "message": "loss rose 3x over 2 steps", "time": 0, "details": {}}))
    return done["job"]


def _get(url: str, key: str | None = KEY) -> tuple[int, Message, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read().decode()


def _code(body: str) -> str:
    return json.loads(body)["error"]["code"]


def test_data_endpoints_take_the_key_and_the_page_holds_none(served):
    base, env, job = served
    for path in ("/dashboard/api/snapshot", "/dashboard/api/jobs/job-1/metrics"):
        for key in (None, "sk-wrong"):
            status, _, body = _get(base + path, key)
            assert (status, _code(body)) == (401, "invalid_api_key"), (path, key)
            assert "local-" not in body  # no node name leaks with the refusal

    status, headers, page = _get(base + "/dashboard/", key=None)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in headers["Content-Security-Policy"] and KEY not in page
    for name in ("dashboard.js", "dashboard.css"):
        assert _get(f"{base}/dashboard/static/{name}", key=None)[0] == 200
    for path in ("/dashboard/static/..%2Fdata.py", "/dashboard/static/routes.py"):
        assert _get(base + path, key=None)[0] == 404

    status, _, body = _get(base + "/dashboard/api/snapshot")
    snapshot = json.loads(body)
    assert status == 200 and [n["name"] for n in snapshot["nodes"]] == ["local-1", "local-2"]
    assert snapshot["up"] == 2 and all(n["cpu_cores"] >= 1 and n["ram_total_bytes"] > 0 for n in snapshot["nodes"])
    assert [m["name"] for m in snapshot["models"]] == [MODEL] and snapshot["models"][0]["can_generate"]
    assert [(j["job"], j["state"], j["step"], j["coordinator"]) for j in snapshot["jobs"]] == [
        (job, "done", STEPS, "local-1")]
    assert {"submitted", "done"} <= {e["kind"] for e in snapshot["events"] if e["job"] == job}
    assert [e["kind"] for e in snapshot["events"] if e["alert"]] == ["alert.loss_diverged"]  # alert.* kinds only

    want = _ok(run_cli("dllmctl", "metrics", job, "--json", env=env))
    status, _, body = _get(f"{base}/dashboard/api/jobs/{job}/metrics")
    assert status == 200 and [(r["step"], r["loss"]) for r in json.loads(body)["metrics"]] == [
        (r["step"], r["loss"]) for r in want]
    later = json.loads(_get(f"{base}/dashboard/api/jobs/{job}/metrics?after_step={want[0]['step']}")[2])
    assert [r["step"] for r in later["metrics"]] == [r["step"] for r in want[1:]]

    # Hostile paths and parameters: a clear 4xx, and the server keeps serving.
    assert _code(_get(base + "/dashboard/api/jobs/" + "x" * 200 + "/metrics")[2]) == "invalid_value"
    for after in ("abc", "--5", "1e9", "-2", str(2**41)):
        assert _code(_get(f"{base}/dashboard/api/jobs/job-1/metrics?after_step={after}")[2]) == "invalid_value"
    status, _, body = _get(base + "/dashboard/api/jobs/job-nope/metrics")
    assert (status, _code(body)) == (404, "job_not_found")
    assert _get(base + "/dashboard/api/snapshot")[0] == 200


def _chromium():
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it in CI)")
    sync_api = pytest.importorskip("playwright.sync_api")
    return sync_api


def _non_streamed(base: str, content: str) -> str:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}],
                       "max_tokens": MAX_TOKENS, "temperature": 0}).encode()
    request = urllib.request.Request(base + "/v1/chat/completions", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def test_page_asks_for_the_key_shows_the_layers_and_streams_a_chat(served):
    sync_api = _chromium()
    base, env, job = served
    listed = _ok(run_cli("dllmctl", "nodes", "list", "--json", env=env))
    held = {row["name"]: ", ".join(f"{s['model']} {s['start']}-{s['end'] - 1}" for s in row["serving"])
            for row in listed}
    assert all(held.values())  # every node holds some layers of the tiny model
    want = _non_streamed(base, "Hello there")

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"))
        try:
            page = browser.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.goto(base + "/dashboard/")

            sync_api.expect(page.locator("#key-form")).to_be_visible()  # no key yet: it asks for one
            page.fill("#key-input", "sk-wrong")
            page.click("#key-form button")
            sync_api.expect(page.locator("#key-error")).to_contain_text("refused")
            sync_api.expect(page.locator("#main")).to_be_hidden()
            assert page.locator("#nodes tbody tr").count() == 0  # a wrong key shows no data
            assert page.evaluate("sessionStorage.getItem('dllm.dashboard.key')") is None

            page.fill("#key-input", KEY)
            page.click("#key-form button")
            for name, layers in held.items():
                sync_api.expect(page.locator(f"#nodes tr[data-node='{name}'] td.layers")).to_have_text(layers)
                sync_api.expect(page.locator(f"#nodes tr[data-node='{name}'] td.status-up")).to_have_text("up")
            sync_api.expect(page.locator(f"#layers svg[data-model='{MODEL}'] rect.held")).to_have_count(
                sum(s["end"] - s["start"] for row in listed for s in row["serving"]))
            assert page.evaluate("sessionStorage.getItem('dllm.dashboard.key')") == KEY  # kept for the tab

            sync_api.expect(page.locator(f"#jobs tr[data-job='{job}'].selected td").nth(1)).to_have_text("done")
            sync_api.expect(page.locator("#loss-chart circle")).to_have_count(STEPS)  # a point per step
            sync_api.expect(page.locator("#events li[data-kind='done']:not(.alert)")).to_contain_text(job)
            sync_api.expect(page.locator("#events li.alert.critical")).to_have_text(
                re.compile(r"critical .*alert\.loss_diverged on local-1: loss rose 3x over 2 steps$"))

            sync_api.expect(page.locator("#chat-model option")).to_have_text([MODEL])
            page.fill("#chat-max-tokens", str(MAX_TOKENS))
            page.fill("#chat-input", "Hello there")
            page.click("#chat-send")
            answer = page.locator(".message.assistant[data-done='true']")
            sync_api.expect(answer).to_have_count(1)
            assert answer.text_content() == want and want  # streamed, greedy: the non-streamed text
            assert page.locator("#chat-error").text_content() == ""
            # The nodes' 10 s token rate, polled every 3 s, shows the tokens just generated.
            sync_api.expect(page.locator("#total-rate")).not_to_have_text(re.compile(r"^0\.0 tokens/s"),
                                                                          timeout=UI_TIMEOUT_MS)
        finally:
            browser.close()


def test_without_a_key_a_loopback_server_shows_data_and_still_checks_the_host(user):
    """No key configured (loopback only): the data needs none; the page still refuses a foreign Host
    (DNS rebinding), and without --dashboard there is no page."""
    from starlette.testclient import TestClient

    from dllmctl.frontends.openai_api import make_app

    with TestClient(make_app(user, None, dashboard=True), base_url="http://localhost") as api:
        snapshot = api.get("/dashboard/api/snapshot").json()
        assert (snapshot["nodes"], snapshot["jobs"], snapshot["up"]) == ([], [], 0)  # nobody registered
        assert api.get("/dashboard").url.path == "/dashboard/"
        refused = api.get("/dashboard/", headers={"Host": "rebound.example"})
        assert (refused.status_code, refused.json()["error"]["code"]) == (421, "host_not_allowed")
    with TestClient(make_app(user, None), base_url="http://localhost") as api:
        assert api.get("/dashboard/").status_code == 404
        assert api.get("/dashboard/api/snapshot").status_code == 404
