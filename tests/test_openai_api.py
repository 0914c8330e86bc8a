"""``dllmctl serve``, the OpenAI-compatible API, driven by the official ``openai`` client against three
real local daemons serving a tiny model: the text equals what ``dllmctl infer`` prints for the same
request (chat and raw, greedy and seeded, streamed or not), usage counts are the tokenizer's, and bad
requests get OpenAI-shaped errors while the server keeps serving."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from email.message import Message

import pytest
import torch

from tests.api_cluster import MODEL, infer, serve_api, start_user_cluster, stop_user_cluster
from tests.tiny_models import make_tokenizer

openai = pytest.importorskip("openai")

KEY = "sk-test-0123456789abcdef"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    env = start_user_cluster(root)
    yield root, env
    stop_user_cluster(root, env)


@pytest.fixture(scope="module")
def served(cluster):
    """``dllmctl serve --port 0 --api-key KEY`` on the cluster, rates high enough for the tests' bursts;
    yields (base URL, env)."""
    root, env = cluster
    with serve_api(root / "serve.log", env, KEY, "--rate-limit", "1000/s", "--burst", "1000",
                "--allowed-host", "dllm.example") as base:
        yield base, env


@pytest.fixture(scope="module")
def strict(cluster):
    """A second server on the same cluster with tight limits: 3 requests a minute, 0.2 s a completion."""
    root, env = cluster
    with serve_api(root / "strict.log", env, KEY, "--rate-limit", "1/min", "--burst", "3", "--max-seconds", "0.2") as base:
        yield base


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0], api_key=KEY, max_retries=0, timeout=120)


def test_text_equals_dllmctl_infer(served, client):
    base, env = served
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL

    # Chat: the prompt goes through the chat template, as 'dllmctl infer' does without --raw.
    want = infer(env, "Hello there", "--max-new-tokens", "12", "--temperature", "0")
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello there"}],
                                          max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == want["text"] and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == want["prompt_tokens"] and chat.usage.completion_tokens == want["new_tokens"]
    assert chat.usage.total_tokens == want["prompt_tokens"] + want["new_tokens"]
    ended = want["token_ids"][-1] == make_tokenizer().eos_token_id
    assert chat.choices[0].finish_reason == ("stop" if ended else "length")

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want["new_tokens"]
    assert len({c.id for c in chunks}) == 1
    with ThreadPoolExecutor(3) as threads:  # concurrent requests share the server's connections and batch
        texts = list(threads.map(lambda _: client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=12,
            temperature=0).choices[0].message.content, range(3)))
    assert texts == [want["text"]] * 3

    # Completions: the prompt as is, like --raw; seeded sampling repeats exactly too.
    want = infer(env, "The quick brown fox", "--raw", "--max-new-tokens", "10", "--temperature", "0.9",
                 "--seed", "7")
    done = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=10, temperature=0.9,
                                     seed=7)
    assert done.choices[0].text == want["text"] and done.usage.prompt_tokens == want["prompt_tokens"]
    streamed = list(client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=10,
                                              temperature=0.9, seed=7, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want["text"]
    assert streamed[-1].choices[0].finish_reason == done.choices[0].finish_reason


def test_defaults_sample_reproducibly_penalties_and_stop_strings(cluster, served, client):
    """A new user's infer samples (the model's defaults, else 0.7/0.9/50) with seed 0, the same text every
    run; temperature 0 is the local model's greedy text; a repetition penalty is transformers' (greedy and
    penalized: generate's tokens); a stop string ends the text before it, through the CLI and the API alike."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _ = cluster
    _base, env = served
    prompt = ["The quick brown fox", "--raw", "--max-new-tokens", "12"]
    first, again = infer(env, *prompt), infer(env, *prompt)
    assert first["token_ids"] == again["token_ids"]
    assert {k: first["sampling"][k] for k in ("temperature", "top_p", "top_k", "seed")} == {
        "temperature": 0.7, "top_p": 0.9, "top_k": 50, "seed": 0}  # the tiny model sets no sampling defaults

    tokenizer = AutoTokenizer.from_pretrained(root / "src")
    model = AutoModelForCausalLM.from_pretrained(root / "src").eval()
    ids = tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]

    def local(**sampling) -> list[int]:
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id, **sampling)[0, ids.shape[1]:].tolist()

    def complete(**kwargs):
        return client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12, **kwargs)

    greedy, penalized = local(), local(repetition_penalty=1.5)
    assert first["token_ids"] != greedy != penalized
    assert complete(temperature=0).choices[0].text == tokenizer.decode(greedy, skip_special_tokens=True)
    got = complete(temperature=0, extra_body={"repetition_penalty": 1.5})  # vLLM's extension, as dllmctl's
    assert got.choices[0].text == tokenizer.decode(penalized, skip_special_tokens=True)
    assert got.usage.completion_tokens == len(penalized)

    text = first["text"]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = text[:text.index(stop)]
    stopped = infer(env, *prompt, f"--stop={stop}", "--stop=\u2603never")
    assert stopped["text"] == cut and stopped["finish_reason"] == "stop"
    assert stopped["token_ids"] == first["token_ids"][:len(stopped["token_ids"])]
    assert len(stopped["token_ids"]) < len(first["token_ids"])  # generation ended there, not at max tokens
    done = complete(seed=0, stop=stop)  # the API's defaults are the CLI's; without a seed it draws one
    assert done.choices[0].text == cut and done.choices[0].finish_reason == "stop"
    assert done.usage.completion_tokens == len(stopped["token_ids"])
    streamed = list(complete(seed=0, stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut and streamed[-1].choices[0].finish_reason == "stop"
    # OpenAI's additive penalties reach the sampler: a strong frequency penalty changes the greedy text.
    freq = complete(temperature=0, frequency_penalty=2.0, presence_penalty=1.0)
    assert freq.choices[0].text != tokenizer.decode(greedy, skip_special_tokens=True)


def test_errors_are_openai_shaped(served, client):
    base, _env = served
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=base, api_key="sk-wrong", max_retries=0).models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    assert _post(base, "/models", None, key=None, method="GET")[0] == 401  # no key at all

    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="ghost", messages=messages)
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    for kwargs, param, needle in (
            ({"n": 2}, "n", "only n=1"),
            ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 stop strings"),
            ({"frequency_penalty": 2.5}, "frequency_penalty", "between -2 and 2"),
            ({"temperature": 3}, "temperature", "between 0 and 2"),
            ({"max_tokens": 0}, "max_tokens", "at least 1"),
            ({"max_tokens": 1000}, "max_tokens", "exceeds the model's context"),
            ({"extra_body": {"parallelism": "diagonal"}}, "parallelism", "unknown parallelism"),
            ({"extra_body": {"bogus": 1}}, "bogus", "Unrecognized request argument"),
            ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools",
             "tool calls are not supported")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=messages, **kwargs)
        assert caught.value.status_code == 400 and caught.value.param == param and needle in caught.value.message, \
            (kwargs, caught.value.body)
    # No tensor-parallel layout is deployed: the API does not deploy one, it says how.
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MODEL, messages=messages, extra_body={"parallelism": "tensor"})
    assert caught.value.status_code == 503 and "--parallelism tensor" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1000, stream=True)
    assert caught.value.code == "context_length_exceeded"  # refused before the stream starts

    # Hostile bodies, straight over HTTP: every answer is a JSON error with the right status.
    for path, body, status, needle in (
            ("/chat/completions", b"{not json", 400, "could not parse the JSON"),
            ("/chat/completions", b"[1, 2]", 400, "must be a JSON object"),
            ("/chat/completions", b"[" * 100_000, 400, "could not parse the JSON"),
            ("/chat/completions", json.dumps({"messages": messages}).encode(), 400, "model parameter"),
            ("/chat/completions", json.dumps({"model": MODEL}).encode(), 400, "'messages'"),
            ("/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}).encode(),
             400, "not supported"),
            ("/chat/completions", json.dumps({"model": MODEL, "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}).encode(),
             400, "only text content"),
            ("/chat/completions", json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400, "expected an array"),
            ("/chat/completions", json.dumps({"model": MODEL, "messages": messages, "max_tokens": "5"}).encode(),
             400, "expected an integer"),
            ("/completions", json.dumps({"model": MODEL, "prompt": ["a", "b"]}).encode(), 400, "one text prompt"),
            ("/completions", json.dumps({"model": MODEL, "prompt": [1, 2, 3]}).encode(), 400, "one text prompt"),
            ("/completions", json.dumps({"model": 5, "prompt": "x"}).encode(), 400, "expected a string"),
            ("/nowhere", b"{}", 404, "Invalid URL")):
        got, error = _post(base, path, body)
        assert got == status and needle in error["message"], (path, body[:80], got, error)
        assert set(error) == {"message", "type", "param", "code"}
    assert _post(base, "/chat/completions", None, method="GET")[0] == 405
    status, error = _post_too_large(base, "/completions", b"x" * (1024 * 1024 + 1))  # 1 MiB by default
    assert status == 413 and "larger than" in error["message"] and set(error) == {"message", "type", "param", "code"}

    # Still serving after all that.
    again = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0)
    assert again.usage.completion_tokens >= 1


def _post(base: str, path: str, body: bytes | None, key: str | None = KEY, method: str = "POST",
          headers: dict | None = None) -> tuple[int, dict]:
    return _call(base, path, body, key, method, headers)[:2]


def _post_too_large(base: str, path: str, body: bytes) -> tuple[int, dict]:
    """POST a body the server refuses from its Content-Length alone: it answers 413 and closes without
    reading the rest, so the send may break off (EPIPE) while the answer is already there to read."""
    url = urllib.parse.urlsplit(base + path)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        connection.putrequest("POST", url.path)
        for name, value in (("Content-Type", "application/json"), ("Authorization", f"Bearer {KEY}"),
                            ("Content-Length", str(len(body)))):
            connection.putheader(name, value)
        connection.endheaders()
        try:
            connection.sock.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = connection.getresponse()
        return response.status, json.loads(response.read())["error"]
    finally:
        connection.close()


def _call(base: str, path: str, body: bytes | None, key: str | None = KEY, method: str = "POST",
          headers: dict | None = None) -> tuple[int, dict, Message]:
    request = urllib.request.Request(base + path, data=body, method=method,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())["error"], exc.headers  # names case-insensitive


def test_what_a_request_may_be(served):
    """Content type, Host, sizes: each refused in OpenAI's shape before any node is asked."""
    base, _env = served
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers, status, code in (({"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
                                  ({"Content-Type": "application/x-www-form-urlencoded"}, 415,
                                   "unsupported_media_type"),
                                  # DNS rebinding: a page on evil.example whose name now points here.
                                  ({"Host": "evil.example"}, 421, "host_not_allowed"),
                                  ({"Host": "evil.example:8000"}, 421, "host_not_allowed"),
                                  ({"Host": "localhost.evil.example"}, 421, "host_not_allowed")):
        got, error = _post(base, "/chat/completions", json.dumps(chat).encode(), headers=headers)
        assert got == status and error["code"] == code and set(error) == {"message", "type", "param", "code"}, \
            (headers, got, error)
    for host in ("localhost", "127.0.0.1:1", "DLLM.example", "[::1]:8000", "10.1.2.3"):  # names it is known by
        got, done = _post(base, "/completions", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode(),
                          headers={"Host": host, "Content-Type": "application/json; charset=utf-8"})
        assert got == 200 and done["usage"]["completion_tokens"] == 1, (host, done)
    for body, param, needle in (({**chat, "max_tokens": 5000}, "max_tokens", "at most 4096"),
                                ({**chat, "max_completion_tokens": 4097}, "max_completion_tokens", "at most 4096"),
                                ({**chat, "messages": chat["messages"] * 513}, "messages", "at most 512 messages")):
        got, error = _post(base, "/chat/completions", json.dumps(body).encode())
        assert got == 400 and error["param"] == param and needle in error["message"], (param, error)
    # A body declared over the limit is refused at its headers: the server answers without waiting
    # for bytes that were never sent (reading first would hang here).
    address = base.split("//", 1)[1].split("/", 1)[0]
    conn = http.client.HTTPConnection(address, timeout=10)
    conn.putrequest("POST", "/v1/chat/completions")
    for name, value in (("Content-Type", "application/json"), ("Authorization", f"Bearer {KEY}"),
                        ("Content-Length", str(2 * 1024 * 1024))):
        conn.putheader(name, value)
    conn.endheaders(b"{")
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    conn.close()


def test_rate_and_time_are_bounded(strict):
    """3 requests a minute per key (and per address without one), answered 429 with Retry-After;
    a completion, streamed or not, ends at --max-seconds."""
    client = openai.OpenAI(base_url=strict, api_key=KEY, max_retries=0, timeout=60)
    started = time.monotonic()
    try:  # 64 tokens in 0.2 s through three daemons: not on any machine we run on
        chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=64,
                                                temperature=0, stream=True))
        raise AssertionError(f"the stream was not cut: {len(chunks)} chunks")
    except openai.APIError as exc:  # 504 before the first token, or an error event after some
        assert (getattr(exc, "status_code", None) == 504 and exc.code == "timeout") or \
            (exc.body or {}).get("code") == "timeout", (exc, exc.body)
    assert time.monotonic() - started < 30
    for _ in range(2):  # the key's bucket: 3 in all
        assert _post(strict, "/completions", b"{}", headers={"Content-Type": "text/plain"})[0] == 415
    got, error, headers = _call(strict, "/completions", b"{}")
    assert got == 429 and error["code"] == "rate_limit_exceeded" and error["type"] == "requests", error
    assert 1 <= int(headers["Retry-After"]) <= 60
    # Wrong keys are counted by address, apart from the key's holders: guessing is limited too.
    assert [_post(strict, "/models", None, key="sk-guess", method="GET")[0] for _ in range(4)] == [401, 401, 401, 429]


def test_no_key_no_listening_beyond_this_machine(cluster):
    _root, env = cluster
    bare = {k: v for k, v in os.environ.items() if k != "DLLM_API_KEY"}
    done = subprocess.run([sys.executable, "-m", "dllmctl", "serve", "--host", "0.0.0.0", "--port", "0"],
                          env={**bare, **env}, capture_output=True, text=True, timeout=60)
    said = " ".join(done.stderr.split())
    assert done.returncode != 0 and "refusing to listen on 0.0.0.0 without --api-key" in said, said
    assert "Traceback" not in done.stderr and "listening on http" not in said


def test_stream_deltas_join_to_the_final_text():
    """Byte-level BPE splits an emoji over several tokens: no delta may carry a half character."""
    from dllmctl.inference.text import TextStream

    tokenizer = make_tokenizer()
    text = "Robots 🤖 dream of électricité — 電気羊? Hello!"
    ids = tokenizer(text)["input_ids"]
    stream = TextStream(tokenizer)
    deltas = [stream.push(token) for token in ids] + [stream.finish()]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in d for d in deltas)
    assert len(ids) > len([d for d in deltas if d])  # some tokens were held back until their character completed
