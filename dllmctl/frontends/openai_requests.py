"""The requests ``dllmctl serve`` takes, read and checked before any node is asked: the body (JSON,
``Content-Type: application/json``, within ``--max-body-bytes``) and each endpoint's parameters as a
pydantic model (``ChatRequest``, ``CompletionRequest``), and errors in OpenAI's shape (``ApiError``)."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Annotated, Any, Callable

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError
from starlette.requests import Request
from starlette.responses import JSONResponse

from dllmctl.frontends.serve_limits import ServeLimits
from dllmctl.inference.generation import GenerationRequest
from dllmctl.inference.text import check_stops


class ApiError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


# --- reading a request ---------------------------------------------------------------------------

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


async def read_json(request: Request, max_bytes: int) -> dict:
    """The body as a JSON object: declared ``application/json``, refused (413) as soon as it is
    known to be over ``max_bytes`` (its Content-Length, else the bytes counted so far)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {media_type or 'none'!r}",
                       code="unsupported_media_type")
    too_large = ApiError(413, f"the request body is larger than {max_bytes} bytes (dllmctl serve --max-body-bytes)",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
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


def _stops(stop: Any) -> list[str]:
    """OpenAI's ``stop``: a string or an array of up to 4."""
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list):
        raise _refusal("invalid_type", "stop must be a string or an array of strings")
    problem = check_stops(stops)
    if problem:
        raise _refusal("invalid_value", problem)
    return stops


Penalty = Annotated[float, _check(lambda v: -2.0 <= v <= 2.0, lambda v: f"must be between -2 and 2, got {v}")]


class _Completion(_Body):
    """What both endpoints take (``top_k``, ``repetition_penalty`` and ``parallelism`` are dllm's; vLLM
    takes the first two too). Sampling left unset is the model's default (dllmctl.inference.defaults),
    as with dllmctl infer."""
    model: Annotated[str, _check(bool, "you must provide a model parameter", "missing_required_parameter")]
    max_tokens: MaxTokens | None = None
    temperature: Annotated[float, _check(lambda t: 0.0 <= t <= 2.0,
                                         lambda t: f"temperature must be between 0 and 2, got {t}")] | None = None
    top_p: Annotated[float, _check(lambda p: 0.0 < p <= 1.0,
                                   lambda p: f"top_p must be greater than 0 and at most 1, got {p}")] | None = None
    top_k: Annotated[int, _check(lambda k: 0 <= k <= 1_000_000, "top_k must be between 0 (no limit) and "
                                                                "1000000")] | None = None
    repetition_penalty: Annotated[float, _check(lambda v: 0.01 <= v <= 100.0,
                                                lambda v: f"must be between 0.01 and 100, got {v}")] | None = None
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    stop: Annotated[Any, AfterValidator(_stops)] = []
    seed: Annotated[int, _check(lambda s: 0 <= s < 2**63, "seed must be between 0 and 2**63 - 1")] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: Annotated[int, _check(lambda n: n == 1, "only n=1 is supported: this server generates one choice per request",
                             "unsupported_value")] = 1
    user: str | None = None  # accepted, ignored
    parallelism: str = "pipeline"
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
        return bad_request(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if kind in ("missing", "too_short"):
        return bad_request(_REQUIRED.get(param, f"you must provide {param}"), param, "missing_required_parameter")
    if kind in _EXPECTED:
        got = _JSON_TYPES.get(type(error["input"]), type(error["input"]).__name__)
        return bad_request(f"Invalid type for '{param}': expected {_EXPECTED[kind]}, but got {got} instead.", param,
                    "invalid_type")
    return bad_request(f"{param}: {error['msg']}" if len(loc) > 1 else error["msg"], param,
                kind if kind in _CODES else "invalid_value")


@dataclass
class Parsed:
    request: GenerationRequest
    stream: bool
    include_usage: bool


def parse(body: dict, chat: bool, limits: ServeLimits = ServeLimits()) -> Parsed:
    """The request as :mod:`dllmctl.generation` takes it; a 400 for anything it cannot honour or
    that is over this server's ``limits``."""
    try:
        r = (ChatRequest if chat else CompletionRequest).model_validate(body)
    except ValidationError as exc:
        raise _error(exc) from None
    options = r.stream_options
    if options is not None and options.model_fields_set and not r.stream:
        raise bad_request("stream_options are only allowed when stream is true", "stream_options")
    if chat and len(r.messages) > limits.max_messages:
        raise bad_request(f"at most {limits.max_messages} messages per request (dllmctl serve --max-messages), got "
                   f"{len(r.messages)}", "messages")
    max_tokens = r.max_completion_tokens if chat and r.max_completion_tokens is not None else r.max_tokens
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise bad_request(f"max_tokens must be at most {limits.max_tokens} on this server (dllmctl serve --max-tokens), "
                   f"got {max_tokens}", "max_completion_tokens" if chat and r.max_completion_tokens is not None else "max_tokens")
    # Without a seed, sampling differs per request, as clients of OpenAI expect; with one it repeats.
    seed = secrets.randbelow(2**31) if r.seed is None else r.seed
    request = GenerationRequest(model=r.model, max_new_tokens=max_tokens, temperature=r.temperature, top_p=r.top_p,
                                top_k=r.top_k, repetition_penalty=r.repetition_penalty,
                                frequency_penalty=r.frequency_penalty, presence_penalty=r.presence_penalty,
                                stop=r.stop, seed=seed, parallelism=r.parallelism)
    if chat:
        request.messages = [{"role": CHAT_ROLES[m.role], "content": m.content} for m in r.messages]
    else:
        request.prompt, request.raw = r.prompt, True
    return Parsed(request, r.stream, bool(options and options.include_usage))
