"""One generation, as every front end runs it: ``dllmctl infer``, the OpenAI-compatible server
(:mod:`dllmctl.openai_api`) and the MCP tool (:mod:`dllmctl.mcp_server`).

All three call :func:`prepare` then :func:`run`, so the same request gives the same text by
construction: the same tokenization (the chat template unless ``raw``), the same route choice and
failover, the same seeded sampling and the same decoding. :func:`prepare` checks everything that
can be checked without the cluster (model, parallelism, prompt, context), so a front end can refuse
a bad request before any node is asked.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from transformers import PreTrainedTokenizerBase

from dllmd.net.codec import DEFAULT_BLOCK, CodecError, HopCodec
from dllmd.net.messages.inference import SamplingParams
from dllmd.models.store import ModelNotFound, ModelStoreError
from dllmd.net.client import CallError
from dllmd.net.identity import Identity
from dllmctl.cluster.registry import NodeEntry
from dllmctl.inference.failover import generate_with_failover
from dllmctl.inference.prefix import prefix_hashes, prefix_key
from dllmctl.inference.private import PrivateEnds, PrivateModeError, check_private_layers, load_private_ends
from dllmctl.inference.session import PARALLELISMS, Generation
from dllmd.net.pool import ConnectionPool
from dllmctl.models import local_store
from dllmctl.placement.routing import RouteError
from dllmctl.inference.stages import live_stages
from dllmctl.inference.defaults import SamplingDefaults, model_defaults
from dllmctl.inference.text import TextStream, check_stops
from dllmctl.inference.tokens import PromptError, encode_prompt, load_tokenizer, stop_ids

_running: set[asyncio.Task] = set()  # generations in flight, kept referenced until they finish

# What front ends let a caller name. A parallelism is served only by a layout of its own kind (a
# route through tensor-parallel groups for tensor and hybrid), never by something else behind the
# caller's back: without one deployed, the request fails naming the command that deploys it.
ALL_PARALLELISMS = PARALLELISMS
MAX_NEW_TOKENS = 100_000  # dllmctl infer's own bound
# Errors that mean the cluster could not serve the request now (nodes down, no route), not that the
# request was wrong.
CLUSTER_ERRORS = (RouteError, CallError)


class GenerationError(ValueError):
    """The request cannot run as asked (unknown model, unbuilt parallelism, prompt too long): the
    caller's mistake, with a message saying what to change. ``param`` names the field at fault and
    ``code`` the kind of fault, for front ends that report them (the OpenAI API does)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


class ModelNotInStore(GenerationError):
    pass


@dataclass(frozen=True)
class LocalModel:
    """What the client needs of a model to generate with it: the tokenizer and the layer count.
    The weights are on the nodes; the tokenizer lives only here, in the local store."""

    name: str
    directory: Path
    num_layers: int
    tokenizer: PreTrainedTokenizerBase
    stop_ids: frozenset[int]
    context: int | None  # max_position_embeddings; None when the config does not say
    hidden_size: int = 0  # what crosses each hop (0: the config does not say; the stages check)
    defaults: SamplingDefaults = SamplingDefaults()  # for what a request leaves unset

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


# Servers load a model's tokenizer once, not per request; a re-import (new manifest) reloads it.
_loaded: dict[str, tuple[int, LocalModel]] = {}


def load_model(name: str) -> LocalModel:
    """The model ``name`` from the local store (cached until its manifest changes)."""
    store = local_store()
    try:
        directory = store.path(name)
        manifest_file = directory / "manifest.json"
        stamp = manifest_file.stat().st_mtime_ns
    except ModelStoreError as exc:
        raise GenerationError(str(exc), "model") from None
    except FileNotFoundError:
        raise ModelNotInStore(f"no model {name!r} in the local store; import it with 'dllmctl model import' or "
                              f"'dllmctl model pull'", "model", "model_not_found") from None
    cached = _loaded.get(name)
    if cached and cached[0] == stamp:
        return cached[1]
    try:
        manifest = store.get(name)
        config = json.loads((directory / "config.json").read_text())
        tokenizer = load_tokenizer(directory)
    except ModelNotFound as exc:
        raise ModelNotInStore(str(exc), "model", "model_not_found") from None
    except (ModelStoreError, PromptError, OSError, ValueError) as exc:
        raise GenerationError(f"model {name!r} cannot be used: {exc}", "model") from None
    model = LocalModel(name, directory, manifest.num_layers, tokenizer, frozenset(stop_ids(tokenizer, directory)),
                       config.get("max_position_embeddings"), config.get("hidden_size", 0), model_defaults(directory))
    _loaded[name] = (stamp, model)
    return model


def check_parallelism(parallelism: str) -> None:
    if parallelism not in PARALLELISMS:
        raise GenerationError(f"unknown parallelism {parallelism!r}; choose one of {', '.join(PARALLELISMS)}",
                              "parallelism")


@dataclass
class GenerationRequest:
    """A prompt (a user message, or plain text with ``raw``) or a list of chat ``messages``."""

    model: str
    prompt: str | None = None
    messages: list[dict] | None = None  # [{"role", "content": str}], through the chat template
    raw: bool = False
    system: str | None = None
    max_new_tokens: int | None = 128  # None: as many as the model's context leaves
    # Sampling; None: the model's default (dllmctl.inference.defaults). Temperature 0 is greedy and exact.
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # 0: no limit
    repetition_penalty: float | None = None  # transformers' (multiplicative, prompt and output; 1: off)
    frequency_penalty: float = 0.0  # OpenAI's (additive, over the output)
    presence_penalty: float = 0.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)  # strings that end the text (not included in it)
    parallelism: str = "pipeline"
    activations: str = "fp32"  # how hidden states travel between stages: fp32 (exact), fp16, int8
    activation_block: int = DEFAULT_BLOCK  # int8's values per scale
    prefix_cache: bool = True  # let the stages reuse (and keep) this client's cached prompt prefixes
    # Private mode: the client runs the embeddings, layers [0, private_layers) and the head itself, so
    # the nodes see hidden states only (0: the ordinary mode). Needs a private deployment.
    private_layers: int = 0
    # Relayed: every request to every stage goes through these nodes (names, in order), sealed in one
    # layer per relay, so the stages see the last relay's key and not this client's.
    relays: list[str] = field(default_factory=list)


@dataclass
class Prepared:
    model: LocalModel
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    parallelism: str
    hops: HopCodec = HopCodec()
    prefix_cache: bool = True
    private_layers: int = 0
    relays: list[str] = field(default_factory=list)
    stop: tuple[str, ...] = ()


def private_ends(model: LocalModel, layers: int) -> PrivateEnds:
    """The client's ends of ``model`` for private mode, loaded once per model, manifest and K."""
    key = (model.name, str(model.directory), layers)
    cached = _private.get(key)
    if cached is None or cached[0] is not model:
        _private[key] = cached = (model, load_private_ends(local_store(), model.name, model.directory, layers))
    return cached[1]


_private: dict[tuple[str, str, int], tuple[LocalModel, PrivateEnds]] = {}


def prepare(request: GenerationRequest) -> Prepared:
    """Everything that can be refused before the cluster is asked; raises GenerationError."""
    check_parallelism(request.parallelism)
    if request.max_new_tokens is not None and not 1 <= request.max_new_tokens <= MAX_NEW_TOKENS:
        raise GenerationError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}", "max_new_tokens")
    problem = check_stops(request.stop)
    if problem:
        raise GenerationError(problem, "stop")
    model = load_model(request.model)
    sampling = _sampling(request, model.defaults)
    try:
        if request.messages is not None:
            if request.raw:
                raise PromptError("messages go through the chat template; raw applies to a plain prompt")
            ids = encode_prompt(model.tokenizer, "", system=request.system, history=request.messages)
        else:
            ids = encode_prompt(model.tokenizer, request.prompt or "", raw=request.raw, system=request.system)
    except PromptError as exc:
        raise GenerationError(str(exc), "messages" if request.messages is not None else "prompt") from None
    except Exception as exc:  # a chat template that chokes on the messages (jinja raises its own errors)
        raise GenerationError(f"the chat template of {model.name} refused these messages: {exc}",
                              "messages") from None
    room = model.context - len(ids) if model.context else MAX_NEW_TOKENS
    wanted = request.max_new_tokens if request.max_new_tokens is not None else min(room, MAX_NEW_TOKENS)
    if wanted > room or wanted < 1:
        raise GenerationError(f"prompt ({len(ids)} tokens) + max_new_tokens {max(wanted, 1)} exceeds the model's "
                              f"context of {model.context} tokens; shorten the prompt or lower max_new_tokens",
                              "max_new_tokens", "context_length_exceeded")
    try:
        hops = HopCodec(request.activations, request.activation_block)
        hops.check_width(model.hidden_size)
    except CodecError as exc:
        raise GenerationError(str(exc), "activations") from None
    if request.private_layers:
        if request.parallelism not in ("pipeline", "model"):
            raise GenerationError("private mode runs over pipeline or model parallelism", "parallelism")
        try:
            check_private_layers(request.private_layers, model.num_layers)
        except PrivateModeError as exc:
            raise GenerationError(str(exc), "private_layers") from None
    # The prefix cache would let stages start where the client's own layers have no cache.
    if request.relays and len(set(request.relays)) != len(request.relays):
        raise GenerationError("--relays names a node twice", "relays")
    # The prefix cache would let stages start where the client's own layers have no cache; behind relays
    # it would key everyone who shares the last relay together.
    return Prepared(model, ids, wanted, sampling, request.parallelism, hops,
                    request.prefix_cache and not request.private_layers and not request.relays,
                    request.private_layers, list(request.relays), tuple(request.stop))


def _sampling(request: GenerationRequest, defaults: SamplingDefaults) -> SamplingParams:
    """The request's sampling, the model's defaults for what it leaves unset. The daemon checks these
    too, but only once the session opens; say it before."""
    def given(value, default):
        return default if value is None else value

    s = SamplingParams(temperature=given(request.temperature, defaults.temperature),
                       top_p=given(request.top_p, defaults.top_p), top_k=given(request.top_k, defaults.top_k),
                       seed=request.seed, repetition_penalty=given(request.repetition_penalty,
                                                                    defaults.repetition_penalty),
                       frequency_penalty=request.frequency_penalty, presence_penalty=request.presence_penalty)
    for ok, param, message in ((0.0 <= s.temperature <= 100.0, "temperature", "between 0 and 100 (0: greedy)"),
                               (0.0 < s.top_p <= 1.0, "top_p", "greater than 0 and at most 1"),
                               (0 <= s.top_k <= 1_000_000, "top_k", "between 0 (no limit) and 1000000"),
                               (0 <= s.seed < 2**63, "seed", "between 0 and 2**63 - 1"),
                               (0.01 <= s.repetition_penalty <= 100.0, "repetition_penalty",
                                "between 0.01 and 100 (1: off; above 1 discourages repeats)"),
                               (-2.0 <= s.frequency_penalty <= 2.0, "frequency_penalty", "between -2 and 2"),
                               (-2.0 <= s.presence_penalty <= 2.0, "presence_penalty", "between -2 and 2")):
        if not ok:
            raise GenerationError(f"{param} must be {message}", param)
    return s


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids, the stop id (or the tokens of a stop string) included
    prompt_tokens: int
    finish_reason: str  # "stop": a stop id or stop string ended it; "length": max_new_tokens reached
    generation: Generation  # timings, routes, failovers
    seed: int = 0  # what reproduces the run

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


async def run(user: Identity, nodes: list[NodeEntry], prepared: Prepared,
              on_text: Callable[[str], None] | None = None, pool: ConnectionPool | None = None,
              assigned: dict[str, int] | None = None,
              on_token: Callable[[int], None] | None = None) -> GenerationResult:
    """Generate through the live spans of ``nodes``. ``on_text`` hears text deltas as they decode,
    ``on_token`` every token id; ``pool`` and ``assigned`` let a server share connections and spread
    concurrent requests over replicas. Raises RouteError / CallError (CLUSTER_ERRORS) when the
    cluster cannot serve it."""
    model = prepared.model
    stream = TextStream(model.tokenizer, prepared.stop)
    watch = on_text is not None or bool(prepared.stop)  # the text is decoded as it grows only when needed

    def arrived(token: int) -> None:
        if on_token is not None:
            on_token(token)
        if watch:
            delta = stream.push(token)
            if delta and on_text is not None:
                on_text(delta)

    own_pool = pool is None
    pool = pool or ConnectionPool(user)
    prefix = prefix_hashes(prepared.prompt_ids, prefix_key(user)) if prepared.prefix_cache else []
    private = private_ends(model, prepared.private_layers) if prepared.private_layers else None
    by_name = {n.name: n for n in nodes}
    unknown = [r for r in prepared.relays if r not in by_name]
    if unknown:
        raise GenerationError(f"--relays names unknown node(s) {', '.join(unknown)}", "relays")
    task = asyncio.ensure_future(generate_with_failover(
        pool, lambda: live_stages(user, nodes, model.name), model.name, model.num_layers, prepared.prompt_ids,
        prepared.max_new_tokens, set(model.stop_ids), prepared.sampling, parallelism=prepared.parallelism,
        on_token=arrived, assigned=assigned, hops=prepared.hops, prefix=prefix, private=private,
        relays=[by_name[r] for r in prepared.relays], stop_when=lambda: stream.stopped))
    _running.add(task)
    task.add_done_callback(_running.discard)
    if own_pool:
        task.add_done_callback(lambda _: pool.close())
    try:
        generation = await asyncio.shield(task)
    except asyncio.CancelledError:
        # The caller went away (an HTTP client disconnected, an MCP call was cancelled). Under anyio
        # (Starlette, the MCP SDK) cancellation is delivered again at every await, which would also
        # cancel the session's own cleanup and leave its KV caches on the nodes until their TTL; so
        # the generation runs in a task of its own, cancelled here once, and closes its sessions.
        task.cancel()
        raise
    ids = generation.token_ids
    if watch:
        tail = stream.finish()
        if tail and on_text is not None:
            on_text(tail)
        text = stream.sent
    else:
        text = model.tokenizer.decode(ids, skip_special_tokens=True)
    stopped = stream.stopped or bool(ids and ids[-1] in model.stop_ids)
    return GenerationResult(text=text, token_ids=list(ids), prompt_tokens=len(prepared.prompt_ids),
                            finish_reason="stop" if stopped else "length", generation=generation,
                            seed=prepared.sampling.seed)


async def generate(user: Identity, nodes: list[NodeEntry], request: GenerationRequest,
                   on_text: Callable[[str], None] | None = None, pool: ConnectionPool | None = None) -> GenerationResult:
    """:func:`prepare` then :func:`run`."""
    return await run(user, nodes, prepare(request), on_text=on_text, pool=pool)
