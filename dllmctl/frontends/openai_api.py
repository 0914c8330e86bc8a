"""An OpenAI-compatible HTTP API over the cluster (``dllmctl serve``): ``/v1/models``,
``/v1/chat/completions`` and ``/v1/completions``, streamed (server-sent events) or not.

Existing chat clients and SDKs point ``OPENAI_BASE_URL`` here and use the cluster unchanged. Every
completion goes through :mod:`dllmctl.generation`, the code ``dllmctl infer`` runs, so the text is
the one ``dllmctl infer`` prints for the same request (chat: the chat template; completions: the
prompt as is, like ``--raw``).

Requests are checked whole before any node is asked; what this server cannot honour (n > 1, stop
sequences, tools, penalties, logprobs, ...) is refused with a 400 naming the parameter, never
silently ignored. Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
Each endpoint's body is a pydantic model (``ChatRequest``, ``CompletionRequest``). Starlette, uvicorn
and pydantic are the mcp SDK's own dependencies (the ``api`` extra).
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
from typing import Annotated, Any, AsyncIterator, Callable

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError
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

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


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


# Each endpoint's parameters as a pydantic model: strict JSON types (a bool is not an integer, a
# string is not a number), null the same as absent, any other parameter refused by name, as OpenAI
# does. A failed check raises PydanticCustomError(code, message): the ApiError's code and message.

def _refusal(code: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(code, "{message}", {"message": message})


def _check(ok: Callable[[Any], bool], message: str | Callable[[Any], str], code: str = "invalid_value"):
    def check(value: Any) -> Any:
        if not ok(value):
            raise _refusal(code, message(value) if callable(message) else message)
        return value
    return AfterValidator(check)


def _unused(*values: Any, why: str):
    """A parameter accepted only with a value that means "not used": same type and value (False is not 0)."""
    return _check(lambda v: any(type(v) is type(u) and v == u for u in values), why, "unsupported_parameter")


def _text(content: Any) -> str:
    """A message's text: a string, or text parts (joined by newlines); images and audio are refused."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise _refusal("unsupported_value", "only text content parts are supported")
        return "\n".join(p["text"] for p in content)
    raise _refusal("invalid_type", "must be a string or an array of text parts")


def _one_prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # one prompt in a list, as some clients send it
    if isinstance(prompt, list):
        raise _refusal("unsupported_value", "only one text prompt per request is supported (no batches, no token "
                                            "arrays)")
    if not isinstance(prompt, str) or not prompt:
        raise _refusal("missing_required_parameter", "'prompt' must be a non-empty string")
    return prompt


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class _Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # a client's "name" and the like change nothing

    role: Annotated[Any, _check(lambda r: isinstance(r, str) and r in CHAT_ROLES,
                                lambda r: f"{r!r} is not supported; use one of {', '.join(CHAT_ROLES)} (tool and "
                                          f"function messages are not supported)")]
    content: Annotated[Any, AfterValidator(_text)]


class _StreamOptions(_Body):
    include_usage: bool = False


MaxTokens = Annotated[int, _check(lambda n: n >= 1, lambda n: f"max_tokens must be at least 1, got {n}")]


class _Completion(_Body):
    """What both endpoints take (``top_k`` and ``parallelism`` are dllm's; vLLM takes top_k too)."""
    model: Annotated[str, _check(bool, "you must provide a model parameter", "missing_required_parameter")]
    max_tokens: MaxTokens | None = None
    temperature: Annotated[float, _check(lambda t: 0.0 <= t <= 2.0,
                                         lambda t: f"temperature must be between 0 and 2, got {t}")] = DEFAULT_TEMPERATURE
    top_p: Annotated[float, _check(lambda p: 0.0 < p <= 1.0,
                                   lambda p: f"top_p must be greater than 0 and at most 1, got {p}")] = 1.0
    top_k: Annotated[int, _check(lambda k: k >= 0, "top_k must be 0 (no limit) or more")] = 0
    seed: Annotated[int, _check(lambda s: 0 <= s < 2**63, "seed must be between 0 and 2**63 - 1")] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: Annotated[int, _check(lambda n: n == 1, "only n=1 is supported: this server generates one choice per request",
                             "unsupported_value")] = 1
    user: str | None = None  # accepted, ignored
    parallelism: str = "pipeline"
    stop: Annotated[Any, _unused([], "", why="stop sequences are not supported; generation ends at the model's "
                                             "end-of-sequence token or max_tokens")] = None
    presence_penalty: Annotated[Any, _unused(0, 0.0, why="presence_penalty is not supported (only 0)")] = None
    frequency_penalty: Annotated[Any, _unused(0, 0.0, why="frequency_penalty is not supported (only 0)")] = None
    logit_bias: Annotated[Any, _unused({}, why="logit_bias is not supported")] = None
    logprobs: Annotated[Any, _unused(False, 0, why="logprobs are not supported")] = None


class ChatRequest(_Completion):
    messages: Annotated[list[_Message], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    top_logprobs: Annotated[Any, _unused(0, why="top_logprobs are not supported")] = None
    tools: Annotated[Any, _unused([], why="tool calls are not supported")] = None
    tool_choice: Annotated[Any, _unused("none", why="tool calls are not supported")] = None
    functions: Annotated[Any, _unused([], why="function calls are not supported")] = None
    function_call: Annotated[Any, _unused("none", why="function calls are not supported")] = None
    parallel_tool_calls: Any = None
    response_format: Annotated[Any, _check(lambda f: f == {"type": "text"},
                                           'only response_format {"type": "text"} is supported',
                                           "unsupported_parameter")] = None
    store: Annotated[Any, _unused(False, why="stored completions are not supported")] = None
    metadata: Any = None


class CompletionRequest(_Completion):
    prompt: Annotated[Any, AfterValidator(_one_prompt)]
    echo: Annotated[Any, _unused(False, why="echo is not supported")] = None
    suffix: Annotated[Any, _unused("", why="suffix (insertion) is not supported")] = None
    best_of: Annotated[Any, _unused(1, why="best_of is not supported (only 1)")] = None


_REQUIRED = {"model": "you must provide a model parameter", "messages": "'messages' must be a non-empty array",
             "prompt": "'prompt' must be a non-empty string"}
_EXPECTED = {"int_type": "an integer", "float_type": "a number", "string_type": "a string", "bool_type": "a boolean",
             "list_type": "an array", "dict_type": "an object", "model_type": "an object"}
_JSON_TYPES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
               dict: "an object", type(None): "null"}
_CODES = {"invalid_value", "invalid_type", "unsupported_value", "unsupported_parameter", "missing_required_parameter"}


def _error(exc: ValidationError) -> ApiError:
    """The first thing wrong with a request (an unknown parameter before all else), in OpenAI's terms."""
    errors = exc.errors(include_url=False)
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    kind, loc = error["type"], error["loc"]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" if i else str(p) for i, p in enumerate(loc))
    if kind == "extra_forbidden":
        return _bad(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if kind in ("missing", "too_short"):
        return _bad(_REQUIRED.get(param, f"you must provide {param}"), param, "missing_required_parameter")
    if kind in _EXPECTED:
        got = _JSON_TYPES.get(type(error["input"]), type(error["input"]).__name__)
        return _bad(f"Invalid type for '{param}': expected {_EXPECTED[kind]}, but got {got} instead.", param,
                    "invalid_type")
    return _bad(f"{param}: {error['msg']}" if len(loc) > 1 else error["msg"], param,
                kind if kind in _CODES else "invalid_value")


@dataclass
class Parsed:
    request: GenerationRequest
    stream: bool
    include_usage: bool


def parse(body: dict, chat: bool) -> Parsed:
    """The request as :mod:`dllmctl.generation` takes it; a 400 for anything it cannot honour."""
    try:
        r = (ChatRequest if chat else CompletionRequest).model_validate(body)
    except ValidationError as exc:
        raise _error(exc) from None
    options = r.stream_options
    if options is not None and options.model_fields_set and not r.stream:
        raise _bad("stream_options are only allowed when stream is true", "stream_options")
    max_tokens = r.max_completion_tokens if chat and r.max_completion_tokens is not None else r.max_tokens
    # Without a seed, sampling differs per request, as clients of OpenAI expect; with one it repeats.
    seed = secrets.randbelow(2**31) if r.seed is None else r.seed
    request = GenerationRequest(model=r.model, max_new_tokens=max_tokens, temperature=r.temperature, top_p=r.top_p,
                                top_k=r.top_k, seed=seed, parallelism=r.parallelism)
    if chat:
        request.messages = [{"role": CHAT_ROLES[m.role], "content": m.content} for m in r.messages]
    else:
        request.prompt, request.raw = r.prompt, True
    return Parsed(request, r.stream, bool(options and options.include_usage))


# --- the server ----------------------------------------------------------------------------------

class Api:
    """The handlers, sharing one connection pool (and replica load counts) across requests."""

    def __init__(self, user: Identity, api_key: str | None, private_layers: int = 0):
        self.user = user
        self.private_layers = private_layers  # every request in private mode (dllmctl serve --private)
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
        parsed.request.private_layers = self.private_layers
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


def make_app(user: Identity, api_key: str | None = None, private_layers: int = 0) -> Starlette:
    api = Api(user, api_key, private_layers)

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
