"""An OpenAI-compatible HTTP API over the cluster (``dllmctl serve``): ``/v1/models``,
``/v1/chat/completions`` and ``/v1/completions``, streamed (server-sent events) or not.

Existing chat clients and SDKs point ``OPENAI_BASE_URL`` here and use the cluster unchanged. Every
completion goes through :mod:`dllmctl.generation`, the code ``dllmctl infer`` runs, so the text is
the one ``dllmctl infer`` prints for the same request (chat: the chat template; completions: the
prompt as is, like ``--raw``).

Requests are checked whole before any node is asked; what this server cannot honour (n > 1, stop
sequences, tools, penalties, logprobs, ...) is refused with a 400 naming the parameter, never
silently ignored. Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
Starlette and uvicorn are the mcp SDK's own dependencies (the ``api`` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dllmd.models.store import ModelStoreError
from dllmd.net.identity import Identity
from dllmctl.cluster.registry import Registry, RegistryError
from dllmctl.cluster.live import query_nodes
from dllmctl.placement.coverage import layer_coverage, uncovered
from dllmctl.inference.generation import CLUSTER_ERRORS, GenerationError, GenerationRequest, GenerationResult, ModelNotInStore, Prepared, load_model, prepare, run
from dllmd.net.pool import ConnectionPool
from dllmctl.models import local_store
from dllmctl.paths import cluster_file

log = logging.getLogger("dllmctl.serve")

MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default; dllmctl infer's is 0 (greedy): pass temperature 0 to match it


class ApiError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


# --- reading a request ---------------------------------------------------------------------------

# The parameters each endpoint accepts; any other is refused by name, as OpenAI does. Some are accepted
# only with the value that means "not used" (_refuse_unsupported).
COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stream", "stream_options", "n", "user", "stop",
          "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
          "top_k", "parallelism"}  # the last two are dllm's extensions (vLLM takes top_k too)
CHAT = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
                 "function_call", "parallel_tool_calls", "response_format", "store", "metadata"}
COMPLETIONS = COMMON | {"prompt", "echo", "suffix", "best_of"}
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
               dict: "an object"}


async def read_json(request: Request) -> dict:
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
        raise ApiError(400, "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
                            "using your HTTP library correctly. The OpenAI API expects a JSON payload.)") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_type")
    return body


def _typed(body: dict, name: str, kind: type | tuple, default: Any = None) -> Any:
    """``body[name]`` if it has the right JSON type (null means absent); a 400 naming it otherwise."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise _bad(f"Invalid type for '{name}': expected {_TYPE_NAMES.get(kinds[0], kinds[0].__name__)}, but got "
                   f"{_TYPE_NAMES.get(type(value), type(value).__name__)} instead.", name, "invalid_type")
    return value


def _refuse_unsupported(body: dict, allowed: set[str]) -> None:
    for name in body:
        if name not in allowed:
            raise _bad(f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")
    unsupported = {
        # name: (values that mean "not used", why it is refused otherwise)
        "stop": ((None, [], ""), "stop sequences are not supported; generation ends at the model's end-of-sequence "
                                 "token or max_tokens"),
        "presence_penalty": ((None, 0, 0.0), "presence_penalty is not supported (only 0)"),
        "frequency_penalty": ((None, 0, 0.0), "frequency_penalty is not supported (only 0)"),
        "logit_bias": ((None, {}), "logit_bias is not supported"),
        "logprobs": ((None, False, 0), "logprobs are not supported"),
        "top_logprobs": ((None, 0), "top_logprobs are not supported"),
        "tools": ((None, []), "tool calls are not supported"),
        "tool_choice": ((None, "none"), "tool calls are not supported"),
        "functions": ((None, []), "function calls are not supported"),
        "function_call": ((None, "none"), "function calls are not supported"),
        "echo": ((None, False), "echo is not supported"),
        "suffix": ((None, ""), "suffix (insertion) is not supported"),
        "best_of": ((None, 1), "best_of is not supported (only 1)"),
        "store": ((None, False), "stored completions are not supported"),
    }
    for name, (unused, why) in unsupported.items():
        # Same type and value: False is not 0 here, and 0 is not 0.0 unless both are listed.
        if name in body and not any(type(body[name]) is type(u) and body[name] == u for u in unused):
            raise _bad(why, name, "unsupported_parameter")
    format_ = body.get("response_format")
    if format_ is not None and format_ != {"type": "text"}:
        raise _bad("only response_format {\"type\": \"text\"} is supported", "response_format",
                   "unsupported_parameter")


@dataclass
class Parsed:
    request: GenerationRequest
    stream: bool
    include_usage: bool


def parse(body: dict, chat: bool) -> Parsed:
    """The request as :mod:`dllmctl.generation` takes it; a 400 for anything it cannot honour."""
    _refuse_unsupported(body, CHAT if chat else COMPLETIONS)
    model = _typed(body, "model", str)
    if not model:
        raise _bad("you must provide a model parameter", "model", "missing_required_parameter")
    n = _typed(body, "n", int, 1)
    if n != 1:
        raise _bad("only n=1 is supported: this server generates one choice per request", "n",
                   "unsupported_value")
    max_tokens = _typed(body, "max_tokens", int)
    if chat:
        max_tokens = _typed(body, "max_completion_tokens", int, max_tokens)
    if max_tokens is not None and max_tokens < 1:
        raise _bad(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    temperature = _typed(body, "temperature", float, DEFAULT_TEMPERATURE)
    if not 0.0 <= temperature <= 2.0:
        raise _bad(f"temperature must be between 0 and 2, got {temperature}", "temperature")
    top_p = _typed(body, "top_p", float, 1.0)
    if not 0.0 < top_p <= 1.0:
        raise _bad(f"top_p must be greater than 0 and at most 1, got {top_p}", "top_p")
    top_k = _typed(body, "top_k", int, 0)
    if top_k < 0:
        raise _bad("top_k must be 0 (no limit) or more", "top_k")
    # Without a seed, sampling differs per request, as clients of OpenAI expect; with one it repeats.
    seed = _typed(body, "seed", int, secrets.randbelow(2**31))
    if not 0 <= seed < 2**63:
        raise _bad("seed must be between 0 and 2**63 - 1", "seed")
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, {})
    if options and not stream:
        raise _bad("stream_options are only allowed when stream is true", "stream_options")
    if set(options) - {"include_usage"}:
        raise _bad(f"unknown stream_options: {', '.join(sorted(set(options) - {'include_usage'}))}",
                   "stream_options", "unknown_parameter")
    include_usage = _typed(options, "include_usage", bool, False)
    _typed(body, "user", str)
    parallelism = _typed(body, "parallelism", str, "pipeline")
    request = GenerationRequest(model=model, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, parallelism=parallelism)
    if chat:
        request.messages = _messages(body)
    else:
        request.prompt, request.raw = _prompt(body), True
    return Parsed(request, stream, include_usage)


def _messages(body: dict) -> list[dict]:
    messages = _typed(body, "messages", list)
    if not messages:
        raise _bad("'messages' must be a non-empty array", "messages", "missing_required_parameter")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object with 'role' and 'content'", where, "invalid_type")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise _bad(f"{where}.role {role!r} is not supported; use one of {', '.join(CHAT_ROLES)} (tool and "
                       f"function messages are not supported)", f"{where}.role")
        out.append({"role": CHAT_ROLES[role], "content": _content(message.get("content"), f"{where}.content")})
    return out


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or text parts (joined by newlines); images and audio are refused."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{where}: only text content parts are supported", where, "unsupported_value")
            texts.append(part["text"])
        return "\n".join(texts)
    raise _bad(f"{where} must be a string or an array of text parts", where, "invalid_type")


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # one prompt in a list, as some clients send it
    if isinstance(prompt, list):
        raise _bad("only one text prompt per request is supported (no batches, no token arrays)", "prompt",
                   "unsupported_value")
    if not isinstance(prompt, str) or not prompt:
        raise _bad("'prompt' must be a non-empty string", "prompt", "missing_required_parameter")
    return prompt


# --- the server ----------------------------------------------------------------------------------

class Api:
    """The handlers, sharing one connection pool (and replica load counts) across requests."""

    def __init__(self, user: Identity, api_key: str | None):
        self.user = user
        self.api_key = api_key.encode() if api_key else None
        self._pool: ConnectionPool | None = None
        self.assigned: dict[str, int] = {}  # node -> sessions running there, so requests spread over replicas
        self.background: set[asyncio.Task] = set()  # streaming generations, referenced until they end

    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None:  # created inside the running loop: its connections are bound to it
            self._pool = ConnectionPool(self.user)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip().encode() if header[:7].lower() == "bearer " else b""
        if not hmac.compare_digest(given, self.api_key):  # constant time: the key cannot be guessed bytewise
            raise ApiError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")

    @staticmethod
    def nodes():
        """The registry as it is now: nodes added while the server runs are used at once."""
        try:
            return Registry(cluster_file()).select(None)
        except RegistryError as exc:
            raise ApiError(500, f"the cluster registry is unreadable: {exc}", type="server_error") from None

    async def served_models(self) -> list[dict]:
        """Models in the local store whose every layer a node that is up serves now."""
        spans: dict[str, list[tuple[int, int]]] = {}
        for row in await query_nodes(self.user, self.nodes()):
            if row["status"] == "up":
                for span in row["serving"]:
                    spans.setdefault(span["model"], []).append((span["start"], span["end"]))
        store, models = local_store(), []
        for name, ranges in sorted(spans.items()):
            try:
                manifest = store.get(name)
            except ModelStoreError:
                continue  # served, but without its tokenizer here this client cannot use it
            if not uncovered(layer_coverage(manifest.num_layers, ranges)):
                models.append({"id": name, "object": "model", "created": int(manifest.created), "owned_by": "dllm"})
        return models

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": await self.served_models()})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        for model in await self.served_models():
            if model["id"] == name:
                return JSONResponse(model)
        raise _model_not_found(name)

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, chat: bool) -> Response:
        parsed = parse(await read_json(request), chat)
        # Rendering the chat template and tokenizing a prompt of megabytes takes a while: not on the
        # event loop, which serves every other request's stream.
        prepared = await asyncio.to_thread(_prepare, parsed.request, chat)
        shape = Shape(chat, parsed.request.model, parsed.include_usage)
        if not parsed.stream:
            try:
                result = await run(self.user, self.nodes(), prepared, pool=self.pool, assigned=self.assigned)
            except CLUSTER_ERRORS as exc:
                raise _unavailable(exc) from None
            return JSONResponse(shape.whole(result))
        return await self._stream(prepared, shape)

    async def _stream(self, prepared: Prepared, shape: "Shape") -> Response:
        """Start generating, and answer only once the first text (or an error) is there: a cluster
        that cannot serve gets a proper error status, not a 200 with an error inside the stream."""
        events: asyncio.Queue = asyncio.Queue()

        async def work() -> None:
            try:
                result = await run(self.user, self.nodes(), prepared, on_text=lambda d: events.put_nowait(("text", d)),
                                   pool=self.pool, assigned=self.assigned)
                events.put_nowait(("done", result))
            except CLUSTER_ERRORS as exc:
                events.put_nowait(("error", _unavailable(exc)))
            except ApiError as exc:
                events.put_nowait(("error", exc))
            except Exception as exc:  # never a dead stream without a word
                log.exception("generation failed")
                events.put_nowait(("error", ApiError(500, f"internal error: {exc}", type="server_error")))

        task = asyncio.create_task(work())
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        first = await events.get()
        if first[0] == "error":
            await task
            return first[1].response()

        async def sse() -> AsyncIterator[str]:
            try:
                yield _event(shape.chunk(role=True))
                event = first
                while True:
                    kind, value = event
                    if kind == "text":
                        yield _event(shape.chunk(text=value))
                    elif kind == "done":
                        yield _event(shape.chunk(finish_reason=value.finish_reason))
                        if shape.include_usage:
                            yield _event(shape.usage_chunk(value))
                        break
                    else:  # failed mid-stream: OpenAI's clients raise on an event carrying "error"
                        yield _event(value.body())
                        break
                    event = await events.get()
                yield "data: [DONE]\n\n"
            finally:
                if not task.done():
                    # The client went away: stop generating (run() closes the sessions on the nodes).
                    # Not awaited: this generator is being cancelled, and anyio would cancel the wait too.
                    task.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _prepare(request: GenerationRequest, chat: bool) -> Prepared:
    try:
        model = load_model(request.model)
        if chat and not model.has_chat_template:
            raise _bad(f"model {request.model!r} has no chat template; use /v1/completions with a plain prompt",
                       "model", "unsupported_value")
        return prepare(request)
    except ModelNotInStore:
        raise _model_not_found(request.model) from None
    except GenerationError as exc:  # generation's names are dllmctl infer's; the API says max_tokens
        param = "max_tokens" if exc.param == "max_new_tokens" else exc.param
        raise _bad(str(exc).replace("max_new_tokens", "max_tokens"), param, exc.code) from None


def _model_not_found(name: str) -> ApiError:
    return ApiError(404, f"The model '{name}' does not exist or is not in this client's model store "
                         f"(GET /v1/models lists the models the cluster serves)", param="model",
                    code="model_not_found")


def _unavailable(exc: Exception) -> ApiError:
    return ApiError(503, f"the cluster cannot serve this request now: {exc}", type="server_error",
                    code="cluster_unavailable")


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


class Shape:
    """OpenAI's response objects for one request (chat completion or text completion)."""

    def __init__(self, chat: bool, model: str, include_usage: bool):
        self.chat, self.model, self.include_usage = chat, model, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def _head(self, stream: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if stream and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    @staticmethod
    def usage(result: GenerationResult) -> dict:
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens}

    def whole(self, result: GenerationResult) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                      "finish_reason": result.finish_reason}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
        return {**self._head(False), "choices": [choice], "usage": self.usage(result)}

    def chunk(self, text: str = "", role: bool = False, finish_reason: str | None = None) -> dict:
        if self.chat:
            delta: dict = {"role": "assistant", "content": ""} if role else {"content": text} if text else {}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        chunk = {**self._head(True), "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI: every chunk but the last carries usage null
        return chunk

    def usage_chunk(self, result: GenerationResult) -> dict:
        return {**self._head(True), "choices": [], "usage": self.usage(result)}


def make_app(user: Identity, api_key: str | None = None) -> Starlette:
    api = Api(user, api_key)

    def guarded(handler):
        async def endpoint(request: Request) -> Response:
            try:
                api.check_key(request)
                return await handler(request)
            except ApiError as exc:
                return exc.response()
            except Exception as exc:  # whatever goes wrong, the answer is an OpenAI-shaped 500, not a crash
                log.exception("%s %s failed", request.method, request.url.path)
                return ApiError(500, f"internal error: {exc}", type="server_error").response()
        return endpoint

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"Invalid URL ({request.method} {request.url.path})",
                   405: f"Method {request.method} not allowed for {request.url.path}"}.get(exc.status_code, exc.detail)
        return ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None).response()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        api.close()

    routes = [Route("/v1/models", guarded(api.list_models), methods=["GET"]),
              Route("/v1/models/{model:path}", guarded(api.get_model), methods=["GET"]),
              Route("/v1/chat/completions", guarded(api.chat_completions), methods=["POST"]),
              Route("/v1/completions", guarded(api.completions), methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
