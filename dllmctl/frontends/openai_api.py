"""An OpenAI-compatible HTTP API over the cluster (``dllmctl serve``): ``/v1/models``,
``/v1/chat/completions`` and ``/v1/completions``, streamed (server-sent events) or not.

Existing chat clients and SDKs point ``OPENAI_BASE_URL`` here and use the cluster unchanged. Every
completion goes through :mod:`dllmctl.generation`, the code ``dllmctl infer`` runs, so the text is
the one ``dllmctl infer`` prints for the same request (chat: the chat template; completions: the
prompt as is, like ``--raw``).

Requests are checked whole before any node is asked; what this server cannot honour (n > 1, tools,
logit_bias, logprobs, ...) is refused with a 400 naming the parameter, never silently ignored.
Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``. Stop strings and the
penalties are honoured (:mod:`dllmctl.inference.text`, :mod:`dllmd.inference.sampling`).
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
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dllmd.models.store import ModelStoreError
from dllmd.net.identity import Identity
from dllmctl.cluster.registry import Registry, RegistryError
from dllmctl.cluster.live import query_nodes
from dllmctl.frontends.openai_requests import ApiError, bad_request, parse, read_json
from dllmctl.frontends.serve_limits import LOOPBACK_NAMES, RateLimiter, ServeLimits, host_allowed, retry_after
from dllmctl.placement.coverage import layer_coverage, uncovered
from dllmctl.inference.generation import CLUSTER_ERRORS, GenerationError, GenerationRequest, GenerationResult, ModelNotInStore, Prepared, load_model, prepare, run
from dllmd.net.pool import ConnectionPool
from dllmctl.models import local_store
from dllmctl.paths import cluster_file

log = logging.getLogger("dllmctl.serve")

# --- the server ----------------------------------------------------------------------------------

class Api:
    """The handlers, sharing one connection pool (and replica load counts) across requests."""

    def __init__(self, user: Identity, api_key: str | None, limits: ServeLimits, hosts: frozenset[str],
                 private_layers: int = 0):
        self.user = user
        self.private_layers = private_layers  # every request in private mode (dllmctl serve --private)
        self.api_key = api_key.encode() if api_key else None
        self.limits, self.hosts = limits, hosts
        self.rates = RateLimiter(limits.rate, limits.burst)
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

    def admit(self, request: Request, need_key: bool = True) -> None:
        """Before a request is read: a Host this server is known by (a page on another site that
        rebinds its name to this address carries that name), the caller's rate, then its key
        (``need_key`` false: the dashboard's static page, which holds no data)."""
        if not host_allowed(request.headers.get("host"), self.hosts):
            raise ApiError(421, f"this server does not answer to the host {request.headers.get('host')!r}; "
                                f"start it with --allowed-host NAME to use that name", code="host_not_allowed")
        keyed = self._key_matches(request)
        # The key's holders share one bucket; anyone else (no key configured, or a wrong one) is
        # counted by address, so guessing keys is rate limited too.
        caller = "key" if keyed else f"address {request.client.host if request.client else '?'}"
        wait = self.rates.take(caller)
        if wait:
            raise ApiError(429, f"Rate limit reached: at most {self.limits.rate:g} requests/s (burst "
                                f"{self.limits.burst}) per {'API key' if keyed else 'client address'}; retry in "
                                f"{wait:.1f} s", type="requests", code="rate_limit_exceeded",
                           headers={"Retry-After": retry_after(wait)})
        if need_key and self.api_key is not None and not keyed:
            raise ApiError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")

    def _key_matches(self, request: Request) -> bool:
        if self.api_key is None:
            return False
        header = request.headers.get("authorization", "")
        given = header[7:].strip().encode() if header[:7].lower() == "bearer " else b""
        return hmac.compare_digest(given, self.api_key)  # constant time: the key cannot be guessed bytewise

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
        deadline = time.monotonic() + self.limits.max_seconds
        parsed = parse(await read_json(request, self.limits.max_body_bytes), chat, self.limits)
        parsed.request.private_layers = self.private_layers
        # Rendering the chat template and tokenizing a prompt of megabytes takes a while: not on the
        # event loop, which serves every other request's stream.
        prepared = await asyncio.to_thread(_prepare, parsed.request, chat)
        # Without max_tokens, generation would run to the end of the context: this server's bound instead.
        prepared.max_new_tokens = min(prepared.max_new_tokens, self.limits.max_tokens)
        shape = Shape(chat, parsed.request.model, parsed.include_usage)
        if not parsed.stream:
            try:
                result = await asyncio.wait_for(run(self.user, self.nodes(), prepared, pool=self.pool,
                                                    assigned=self.assigned), deadline - time.monotonic())
            except CLUSTER_ERRORS as exc:
                raise _unavailable(exc) from None
            except asyncio.TimeoutError:
                raise self._too_long() from None
            return JSONResponse(shape.whole(result))
        return await self._stream(prepared, shape, deadline)

    def _too_long(self) -> ApiError:
        return ApiError(504, f"the completion ran past this server's {self.limits.max_seconds:g} s "
                             f"(dllmctl serve --max-seconds); ask for fewer max_tokens", type="server_error",
                        code="timeout")

    async def _stream(self, prepared: Prepared, shape: "Shape", deadline: float) -> Response:
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

        async def next_event() -> tuple:
            """The next event, or a timeout error at the deadline: a stream is bounded in time too."""
            try:
                return await asyncio.wait_for(events.get(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                task.cancel()  # run() closes its sessions on the nodes
                return "error", self._too_long()

        task = asyncio.create_task(work())
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        first = await next_event()
        if first[0] == "error":
            await asyncio.wait([task])  # ended or cancelled; wait() does not raise the latter
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
                    event = await next_event()
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
            raise bad_request(f"model {request.model!r} has no chat template; use /v1/completions with a plain prompt",
                       "model", "unsupported_value")
        return prepare(request)
    except ModelNotInStore:
        raise _model_not_found(request.model) from None
    except GenerationError as exc:  # generation's names are dllmctl infer's; the API says max_tokens
        param = "max_tokens" if exc.param == "max_new_tokens" else exc.param
        raise bad_request(str(exc).replace("max_new_tokens", "max_tokens"), param, exc.code) from None


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


def make_app(user: Identity, api_key: str | None = None, limits: ServeLimits = ServeLimits(),
             hosts: frozenset[str] = LOOPBACK_NAMES, private_layers: int = 0, dashboard: bool = False) -> Starlette:
    """The app: ``hosts`` are the names it answers to (IP literals always; see serve_limits); with
    ``private_layers`` every request runs in private mode; ``dashboard`` adds the web page and its
    data endpoints (:mod:`dllmctl.frontends.dashboard`)."""
    api = Api(user, api_key, limits, hosts, private_layers)

    def guarded(handler, need_key: bool = True):
        async def endpoint(request: Request) -> Response:
            try:
                api.admit(request, need_key)
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
    if dashboard:
        from dllmctl.frontends.dashboard.routes import dashboard_routes

        routes += dashboard_routes(api, guarded)
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
