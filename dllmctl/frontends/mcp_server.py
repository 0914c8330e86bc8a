"""The cluster as MCP tools and resources, for agents (``dllmctl mcp``; stdio, the official SDK).

Tools: ``llm_inference_distributed`` (the code ``dllmctl infer`` runs: :mod:`dllmctl.generation`),
``llm_train_distributed`` (submits a detached job, data, pipeline or hybrid parallel, as ``dllmctl train
--detach``) and
``llm_data_shard`` (``dllmctl shard-data``). Resources: :mod:`dllmctl.views`, read live.

A parallelism that is not built is a tool error saying so, never a result made by something else.
Long tools send progress notifications (tokens generated; shard-data stages; bytes of the model
shipped, then replicas loading), coalesced so that a token-per-message stream never floods stdio.
stdout carries only the protocol: the SDK points fd 1 at stderr while it serves, so a stray print
anywhere (torch, tokenizers) cannot corrupt it, and logs go to stderr.
"""

import asyncio
import contextlib
import inspect
import json
import logging
import sys
import time
from collections import deque
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError

from dllmd import __version__
from dllmd.data import STRATEGIES, DataError
from dllmd.models.dtypes import TRAIN_DTYPES
from dllmd.models.store import MANIFEST, Manifest, ModelStoreError
from dllmd.net.client import CallError
from dllmd.net.identity import Identity
from dllmd.net.messages.training import PARALLELISMS_BUILT, STRATEGIES as FEDERATED_STRATEGIES
from dllmctl.frontends import views
from dllmctl.cluster.registry import NodeEntry, Registry, RegistryError
from dllmctl.data.push import PushError
from dllmctl.data.sharding import ShardProgress, ShardRequest, dataset_name, shard_and_push
from dllmctl.inference.generation import CLUSTER_ERRORS, GenerationError, GenerationRequest, prepare, run
from dllmctl.inference.text import MAX_STOP_CHARS, MAX_STOPS
from dllmd.net.pool import ConnectionPool
from dllmctl.data.records import dataset_records
from dllmctl.models import local_model
from dllmctl.models.layouts import deploy_parallel_layout
from dllmctl.placement.layout import PlanError
from dllmctl.placement.routing import RouteError
from dllmctl.paths import cluster_file
from dllmctl.training.jobs import (PARALLELISMS as TRAIN_PARALLELISMS, TrainError, federated_dataset, federated_options,
                                   eval_options, job_spec, pipeline_options, submit)

log = logging.getLogger("dllmctl.mcp")

PROGRESS_PERIOD_S = 0.25  # at most this often per tool call
RECENT_GENERATIONS = 50  # kept for llm://performance
JSON = "application/json"

INSTRUCTIONS = """\
dllm runs language models split by layers across ordinary machines. Read llm://models to see which
models the cluster can generate with (can_generate), llm://nodes for the machines, and call
llm_inference_distributed with one of them. To fine-tune: llm_data_shard a local directory or JSONL
file onto the nodes, then llm_train_distributed (returns a job id at once; follow it with
training://jobs/{job_id} and training://metrics/{job_id})."""


class Progress:
    """A tool's progress as the client sees it: the latest value, sent by one task at most every
    PROGRESS_PERIOD_S, only when it grew (MCP requires progress to increase). ``update`` runs on the
    event loop; ``update_threadsafe`` from worker threads."""

    def __init__(self, ctx: Context, total: float | None = None):
        self.ctx, self.total = ctx, total
        self.value, self.message = 0.0, ""
        self.sent: float | None = None
        self.loop = asyncio.get_running_loop()
        self.changed = asyncio.Event()
        self.task: asyncio.Task | None = None

    def update(self, value: float, message: str = "", total: float | None = None) -> None:
        self.value, self.message = value, message
        if total is not None:
            self.total = total
        self.changed.set()

    def update_threadsafe(self, value: float, message: str = "", total: float | None = None) -> None:
        self.loop.call_soon_threadsafe(self.update, value, message, total)

    async def _send(self) -> None:
        if self.sent is None or self.value > self.sent:
            self.sent = self.value
            with contextlib.suppress(Exception):  # a client that went away must not fail the tool
                await self.ctx.report_progress(self.value, self.total, self.message or None)

    async def _pump(self) -> None:
        while True:
            await self.changed.wait()
            self.changed.clear()
            await self._send()
            await asyncio.sleep(PROGRESS_PERIOD_S)

    async def __aenter__(self) -> "Progress":
        self.task = asyncio.create_task(self._pump())
        return self

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self._send()  # the last state, so the client sees where the tool ended


class ShardTracker(ShardProgress):
    """shard-data's stages (reading, tokenizing, assigning, packing, one push per node) as one rising
    number: finished stages count 1 each, the running ones their fraction done."""

    def __init__(self, progress: Progress, stages: int):
        self.progress, self.stages = progress, stages
        self.done: dict[str, list] = {}  # stage -> [amount, total or None]

    def stage(self, what: str, total: int | None = None, unit: str = "items") -> None:
        self.done[what] = [0, total]
        self._emit(what)

    def advance(self, what: str, amount: int) -> None:
        if what in self.done:
            self.done[what][0] += amount
            self._emit(what)

    def _emit(self, what: str) -> None:
        last = next(reversed(self.done))
        value = sum(min(done / total, 1.0) if total else (0.0 if name == last else 1.0)
                    for name, (done, total) in self.done.items())
        done, total = self.done[what]
        self.progress.update_threadsafe(value, f"{what} {done}/{total}" if total else what, self.stages)


class TrainOptions(BaseModel):
    """``model_config`` as an object: the model and the job's optimizer settings (``dllmctl train``'s)."""

    model_config = ConfigDict(extra="forbid")
    name: Optional[str] = Field(None, min_length=1, max_length=128)
    model: Optional[str] = Field(None, min_length=1, max_length=128)
    lr: float = Field(1e-4, ge=0.0, le=10.0)
    max_steps: Optional[int] = Field(None, ge=1, le=100_000_000)
    micro_batch_size: int = Field(1, ge=1, le=65536)
    warmup_steps: int = Field(0, ge=0, le=100_000_000)
    grad_clip: float = Field(1.0, ge=0.0, le=1e9)
    weight_decay: float = Field(0.0, ge=0.0, le=10.0)
    checkpoint_every: int = Field(0, ge=0, le=100_000_000)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    dtype: Literal[TRAIN_DTYPES] = "float32"  # type: ignore[valid-type]
    backend: Literal["zmq", "torch"] = "zmq"
    seq_len: Optional[int] = Field(None, ge=8, le=1_048_576)  # fixed when sharding; checked, not changed
    # parallelism model / hybrid: the pipeline's shape
    schedule: Literal["gpipe", "1f1b"] = "1f1b"
    pp: Optional[int] = Field(None, ge=2, le=256)
    dp: Optional[int] = Field(None, ge=1, le=256)
    stage_layers: Optional[list[int]] = Field(None, min_length=2, max_length=256)
    recompute: bool = False
    balance: Literal["compute", "memory"] = "compute"
    shard_copies: int = Field(2, ge=1, le=16)
    # parallelism federated: the rounds (dllmctl train's --rounds, --local-steps, ...)
    rounds: Optional[int] = Field(None, ge=1, le=10_000_000)
    local_steps: int = Field(1, ge=1, le=1_000_000)
    clients_per_round: Optional[str] = Field(None, max_length=16, description="a count (3) or a fraction (0.5, 50%)")
    min_clients: int = Field(1, ge=1, le=256)
    round_timeout: float = Field(600.0, ge=0.1, le=86400.0)
    strategy: Literal[FEDERATED_STRATEGIES] = "fedavg"  # type: ignore[valid-type]
    server_lr: float = Field(1.0, ge=0.0, le=100.0)
    server_momentum: float = Field(0.9, ge=0.0, le=0.9999)
    proximal_mu: float = Field(0.0, ge=0.0, le=1e6)
    update_clip: float = Field(0.0, ge=0.0, le=1e9)
    secure_aggregation: bool = False
    # parallelism data: differential privacy (DP-SGD), as dllmctl train's --dp-* options
    dp_clip: float = Field(0.0, ge=0.0, le=1e9)
    dp_noise_multiplier: float = Field(0.0, ge=0.0, le=1e6)
    dp_delta: float = Field(1e-5, gt=0.0, lt=1.0)
    dp_epsilon_budget: float = Field(0.0, ge=0.0, le=1e6)
    # held-out evaluation, as dllmctl train's --eval-* options (checked by eval_options)
    eval_fraction: float | None = None
    eval_data: str | None = None
    eval_every: int | None = None


def train_options(config: str | dict) -> tuple[str, TrainOptions]:
    """The model name and options from ``model_config`` (a name, or an object); ToolError if invalid."""
    if isinstance(config, str):
        config = {"name": config}
    try:
        options = TrainOptions.model_validate(config)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'model_config'}: {e['msg']}"
                             for e in exc.errors())
        raise ToolError(f"invalid model_config: {problems} (fields: {', '.join(TrainOptions.model_fields)})") from None
    if options.name and options.model and options.name != options.model:
        raise ToolError("model_config names two models ('name' and 'model'); give one")
    name = options.name or options.model
    if not name:
        raise ToolError("model_config must name a model in the local store: a string, or {\"name\": ...}")
    return name, options


class ClusterTools:
    """The state the tools share: who we are, one connection pool, the generations run so far."""

    def __init__(self, user: Identity):
        self.user = user
        self._pool: ConnectionPool | None = None
        self.assigned: dict[str, int] = {}
        self.recent: deque[dict] = deque(maxlen=RECENT_GENERATIONS)

    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None:  # created inside the running loop its connections belong to
            self._pool = ConnectionPool(self.user)
        return self._pool

    @staticmethod
    def nodes(names: list[str] | None = None) -> list[NodeEntry]:
        """Registered nodes (re-read per call: nodes added meanwhile count), or the named ones."""
        try:
            return Registry(cluster_file()).select(names or None)
        except RegistryError as exc:
            raise ToolError(str(exc)) from None

    # --- tools -------------------------------------------------------------------------------

    async def infer(self, prompt: str, model_name: str, parallelism: str, nodes: list[str] | None,
                    max_new_tokens: int, raw: bool, system: str | None, ctx: Context,
                    **sampling: Any) -> dict[str, Any]:
        """``sampling``: GenerationRequest's sampling fields (temperature, ..., seed, stop)."""
        request = GenerationRequest(model=model_name, prompt=prompt, raw=raw, system=system,
                                    max_new_tokens=max_new_tokens, parallelism=parallelism, **sampling)
        try:
            prepared = prepare(request)
        except GenerationError as exc:
            raise ToolError(str(exc)) from None
        targets = self.nodes(nodes)
        count = [0]
        async with Progress(ctx, total=prepared.max_new_tokens) as progress:
            def token(_id: int) -> None:
                count[0] += 1
                progress.update(count[0], f"{count[0]} tokens")

            try:
                result = await run(self.user, targets, prepared, pool=self.pool, assigned=self.assigned,
                                   on_token=token)
            except RouteError as exc:
                if parallelism not in ("tensor", "hybrid"):
                    raise ToolError(f"the cluster could not serve this: {exc}") from None
                # No such layout is live: plan one over the free nodes and deploy it, then generate.
                progress.update(0, f"deploying a {parallelism} layout of {model_name}")
                await self._deploy_layout(model_name, parallelism, targets)
                try:
                    result = await run(self.user, targets, prepared, pool=self.pool, assigned=self.assigned,
                                       on_token=token)
                except CLUSTER_ERRORS as exc:
                    raise ToolError(f"the cluster could not serve this: {exc}") from None
            except CLUSTER_ERRORS as exc:
                raise ToolError(f"the cluster could not serve this: {exc}") from None
        g = result.generation
        rate = round(result.completion_tokens / g.seconds, 3) if g.seconds else None
        self.recent.append({"time": time.time(), "model": model_name, "parallelism": parallelism,
                            "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                            "seconds": round(g.seconds, 4), "first_token_s": round(g.first_token_s, 4),
                            "tokens_per_second": rate, "route": g.routes[-1], "failovers": len(g.failovers)})
        return {"text": result.text, "model": model_name, "parallelism": parallelism,
                "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                "finish_reason": result.finish_reason, "token_ids": result.token_ids, "seed": result.seed,
                "seconds": round(g.seconds, 4),
                "tokens_per_second": rate, "route": g.routes[-1], "failovers": g.failovers}

    async def _deploy_layout(self, model_name: str, parallelism: str, targets: list[NodeEntry]) -> None:
        try:
            directory, manifest = local_model(model_name)
            await deploy_parallel_layout(self.user, targets, directory, manifest, parallelism)
        except (PlanError, CallError, ModelStoreError) as exc:
            raise ToolError(f"no {parallelism} layout of {model_name} is deployed, and none could be: {exc}") from None

    async def shard(self, data_uri: str, model_name: str, shard_strategy: str, nodes: list[str] | None,
                    name: str | None, seq_len: int, replicas: int, seed: int, field: str, local_only: bool,
                    ctx: Context) -> dict[str, Any]:
        targets = self.nodes(nodes)
        try:
            directory = _model_dir(model_name)
            request = ShardRequest(uri=data_uri, model=model_name, model_dir=directory, strategy=shard_strategy,
                                   name=dataset_name(data_uri, name), seq_len=seq_len, replicas=replicas, seed=seed,
                                   field=field, local_only=local_only)
        except DataError as exc:
            raise ToolError(str(exc)) from None
        async with Progress(ctx) as progress:
            tracker = ShardTracker(progress, stages=1 if local_only else 4 + len(targets))
            try:
                # shard_and_push is synchronous (it runs its own event loop): a thread keeps this
                # server answering meanwhile.
                report = await asyncio.to_thread(shard_and_push, self.user, targets, request, tracker)
            except (DataError, PushError, CallError, OSError) as exc:
                raise ToolError(str(exc)) from None
        dataset_records().save(report)
        skipped = report.pop("skipped")
        return {**report, "skipped_count": len(skipped), "skipped": skipped[:20]}

    async def train(self, model_config: str | dict, training_data: str, parallelism: str, nodes: list[str] | None,
                    epochs: int | None, batch_size: int, ctx: Context) -> dict[str, Any]:
        if parallelism not in PARALLELISMS_BUILT:
            raise ToolError(f"parallelism {parallelism!r} is not built yet; {', '.join(PARALLELISMS_BUILT)} are")
        model, options = train_options(model_config)
        if epochs is not None and options.max_steps is not None:
            raise ToolError("give epochs or model_config.max_steps, not both")
        try:
            if parallelism == "federated":
                if not nodes:
                    raise ToolError("a federated job needs nodes (the first coordinates; every node with rows of "
                                    "the dataset is a client)")
                dataset = {**federated_dataset(training_data, model), "seq_len": options.seq_len}
            else:
                dataset = dataset_records().load(training_data)
        except DataError as exc:
            raise ToolError(str(exc)) from None
        if options.seq_len is not None and options.seq_len != dataset["seq_len"]:
            raise ToolError(f"dataset {training_data} was packed into sequences of {dataset['seq_len']} tokens, not "
                            f"{options.seq_len}; re-shard it with seq_len {options.seq_len} or drop seq_len")
        directory = _model_dir(model)
        targets = self.nodes(nodes or [row["node"] for row in dataset["nodes"]])
        try:
            if parallelism == "federated":
                pipeline = federated_options(targets, options.rounds, options.local_steps, options.clients_per_round,
                                             options.min_clients, options.round_timeout, options.strategy,
                                             options.server_lr, options.server_momentum, options.proximal_mu,
                                             options.update_clip, options.secure_aggregation, options.dp_clip)
            else:
                pipeline = await pipeline_options(self.user, targets, directory, dataset, parallelism, options.dp,
                                                  options.pp, options.schedule, options.micro_batch_size, batch_size,
                                                  options.stage_layers, options.recompute, options.balance)
            pipeline.update(eval_options(options.eval_fraction, options.eval_data, options.eval_every, model,
                                         parallelism))
            spec = job_spec(model, dataset, targets, batch_size=batch_size, micro_batch_size=options.micro_batch_size,
                            epochs=epochs or (0 if options.max_steps else 1), max_steps=options.max_steps or 0,
                            lr=options.lr, warmup_steps=options.warmup_steps, grad_clip=options.grad_clip,
                            weight_decay=options.weight_decay, checkpoint_every=options.checkpoint_every,
                            seed=options.seed, dtype=options.dtype, backend=options.backend,
                            shard_copies=options.shard_copies, dp_clip=options.dp_clip, dp_noise_multiplier=options.dp_noise_multiplier,
                            dp_delta=options.dp_delta, dp_epsilon_budget=options.dp_epsilon_budget, **pipeline)
        except TrainError as exc:
            raise ToolError(str(exc)) from None
        to_ship = Manifest.from_bytes((directory / MANIFEST).read_bytes()).total_bytes * len(targets)
        shipped = [0]
        stages = ("checking nodes", "sending the model", "loading replicas")
        async with Progress(ctx, total=len(stages)) as progress:
            def stage(what: str) -> None:
                progress.update(stages.index(what) if what in stages else progress.value, what)

            def sent(_node: str, amount: int) -> None:
                shipped[0] += amount
                progress.update(1 + min(shipped[0] / to_ship, 1.0) if to_ship else 1,
                                f"sending the model: {shipped[0]}/{to_ship} bytes")

            try:
                result = await submit(self.user, targets, directory, spec, progress=sent, stage=stage)
            except (TrainError, CallError, OSError) as exc:
                raise ToolError(f"the job was not started: {exc}") from None
            progress.update(len(stages), "submitted")
        return {**result, "model": model, "dataset": training_data, "nodes": [n.name for n in targets],
                "parallelism": parallelism, "follow": f"training://jobs/{result['job']}"}


def _model_dir(name: str):
    try:
        return local_model(name)[0]
    except ModelStoreError as exc:
        raise ToolError(str(exc)) from None


def build_server(user: Identity) -> MCPServer:
    """The MCP server: three tools, the resources of :mod:`dllmctl.views`, for ``user``."""
    server = MCPServer("dllm", instructions=INSTRUCTIONS, version=__version__)
    tools = ClusterTools(user)
    _add_tools(server, tools)
    _add_resources(server, tools)
    return server


def _add_tools(server: MCPServer, tools: ClusterTools) -> None:
    NodesArg = Annotated[Optional[list[str]], Field(
        description="Registered node names to use (llm://nodes); default: all registered nodes")]

    async def llm_inference_distributed(
        prompt: Annotated[str, Field(description="The prompt: a user message through the model's chat template, "
                                                 "or plain text with raw=true", min_length=1)],
        model_name: Annotated[str, Field(description="A model the cluster serves (llm://models, can_generate)")],
        parallelism: Annotated[Literal["model", "tensor", "pipeline", "hybrid"], Field(
            description="How the model is split: 'pipeline' (layer spans; prompt chunks overlap across stages, "
                        "decode batched with other sessions) or 'model' (layer spans, one piece, never batched). "
                        "'tensor': one tensor-parallel group holds every layer; 'hybrid': a chain of such groups. "
                        "Without such a layout deployed, one is planned over the free nodes and deployed "
                        "first")] = "pipeline",
        nodes: NodesArg = None,
        max_new_tokens: Annotated[int, Field(ge=1, le=100_000)] = 128,
        temperature: Annotated[Optional[float], Field(ge=0.0, le=100.0, description=(
            "0: greedy (exact). Default: the model's generation_config.json, else 0.7"))] = None,
        top_p: Annotated[Optional[float], Field(gt=0.0, le=1.0, description="Default: the model's, else 0.9")] = None,
        top_k: Annotated[Optional[int], Field(ge=0, le=1_000_000, description=(
            "0: no limit. Default: the model's, else 50"))] = None,
        repetition_penalty: Annotated[Optional[float], Field(ge=0.01, le=100.0, description=(
            "transformers': logits of tokens already in the prompt or output divided by it (above 1 discourages "
            "repeats). Default: the model's, else 1 (off)"))] = None,
        frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0, description=(
            "OpenAI's: subtracted from a token's logit once per time it was generated"))] = 0.0,
        presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0, description=(
            "OpenAI's: subtracted from the logit of every token generated at least once"))] = 0.0,
        stop: Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]], Field(
            max_length=MAX_STOPS, description="Strings that end the text (not included in it)")] = [],
        seed: Annotated[int, Field(ge=0, le=2**63 - 1, description="Seeds sampling: the same seed, the same "
                                                                    "text")] = 0,
        raw: Annotated[bool, Field(description="Tokenize the prompt as is, without the chat template")] = False,
        system: Annotated[Optional[str], Field(description="A system message (chat template)")] = None,
        ctx: Context = None,
    ) -> dict[str, Any]:
        """Generate text with a model split across the cluster's nodes (what 'dllmctl infer' prints)."""
        return await tools.infer(prompt, model_name, parallelism, nodes, max_new_tokens, raw, system, ctx,
                                 temperature=temperature, top_p=top_p, top_k=top_k,
                                 repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                                 presence_penalty=presence_penalty, stop=list(stop), seed=seed)

    async def llm_data_shard(
        data_uri: Annotated[str, Field(description="A directory (code repository), a .jsonl or a text file on this "
                                                   "machine (file:// URIs too); with local_only: a path on every "
                                                   "node, under that node's data_roots")],
        model_name: Annotated[str, Field(description="The model whose tokenizer to use (the one you will train)")],
        shard_strategy: Annotated[Literal[STRATEGIES], Field(  # type: ignore[valid-type]
            description="round_robin, hash (sha256 of the sample id), random (seeded, balanced by tokens), "
                        "semantic (similar samples together), dht (rendezvous hashing, with replicas)")] = "round_robin",
        nodes: NodesArg = None,
        name: Annotated[Optional[str], Field(description="Dataset name (default: from the path)")] = None,
        seq_len: Annotated[int, Field(ge=8, le=1_048_576, description="Tokens per packed sequence")] = 2048,
        replicas: Annotated[int, Field(ge=1, le=16, description="Copies of each sample (dht only)")] = 1,
        seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0,
        field: Annotated[str, Field(description="The text field of JSONL records", min_length=1)] = "text",
        local_only: Annotated[bool, Field(description="Every node shards data_uri on its own disk; the data never "
                                                      "leaves it")] = False,
        ctx: Context = None,
    ) -> dict[str, Any]:
        """Tokenize, pack and place training data on the nodes, all or nothing (what 'dllmctl shard-data' does)."""
        return await tools.shard(data_uri, model_name, shard_strategy, nodes, name, seq_len, replicas, seed, field,
                                 local_only, ctx)

    # The parameter is called model_config on the wire (the design's schema), but pydantic reserves that
    # name on the arguments model the SDK builds; so the schema is taken from a stub whose parameter
    # carries it as an alias, and the SDK passes arguments to the real function by their aliases.
    def _train_schema(
        config: Annotated[str | dict[str, Any], Field(
            alias="model_config",
            description="The model to fine-tune: a model name in the local store, or an object {\"name\", and "
                        "optionally \"lr\", \"max_steps\", \"micro_batch_size\", \"warmup_steps\", \"grad_clip\", "
                        "\"weight_decay\", \"checkpoint_every\", \"seed\", \"dtype\" (float32|bfloat16), \"backend\" "
                        "(zmq|torch), \"shard_copies\" (spare copies of each shard, default 2), \"seq_len\" (must equal the dataset's); for parallelism model or hybrid also "
                        "\"schedule\" (1f1b|gpipe), \"pp\" (stages), \"dp\" (replicas, hybrid), \"stage_layers\" "
                        "(layers per stage, default planned), \"recompute\", \"balance\" (compute|memory: what planned "
                        "stages even out); for parallelism federated \"rounds\" "
                        "(required), \"local_steps\", \"clients_per_round\" (a count or a fraction), "
                        "\"min_clients\", \"round_timeout\" (s), \"strategy\" (fedavg|fedavgm|fedadam), "
                        "\"server_lr\", \"server_momentum\", \"proximal_mu\" (FedProx), \"update_clip\", "
                        "\"secure_aggregation\"; differential privacy (data: DP-SGD, per example; federated: per "
                        "client): \"dp_clip\" (gradient or update norm bound), \"dp_noise_multiplier\", "
                        "\"dp_delta\" (default 1e-5), \"dp_epsilon_budget\" (0: none); held-out evaluation "
                        "(training://metrics: eval_loss, eval_perplexity, eval_accuracy): \"eval_fraction\" (0-0.5 "
                        "of every shard, never trained on) or \"eval_data\" (another dataset), \"eval_every\"}")],
        training_data: Annotated[str, Field(description="A dataset placed with llm_data_shard (training://data_shards)")],
        parallelism: Annotated[Literal[TRAIN_PARALLELISMS], Field(  # type: ignore[valid-type]
            description="'data' (a full replica per node, gradients all-reduced over an encrypted ring); "
                        "'model' (a pipeline: each node holds a span of the layers, activations flow between them); "
                        "'hybrid' (dp replicas of a pp-stage pipeline); 'federated' (rounds: each node "
                        "trains on its own rows, which never leave it, and sends back only its weight update)")] = "data",
        nodes: Annotated[Optional[list[str]], Field(
            description="Node names; the first coordinates (default: the nodes holding the dataset)")] = None,
        epochs: Annotated[Optional[int], Field(ge=1, le=100_000, description="Default: 1, unless max_steps")] = None,
        batch_size: Annotated[int, Field(ge=1, le=1_000_000, description="Sequences per global step")] = 8,
        ctx: Context = None,
    ) -> dict[str, Any]:
        ...

    async def llm_train_distributed(model_config, training_data, parallelism="data", nodes=None, epochs=None,
                                    batch_size=8, ctx=None):
        """Fine-tune a model on a sharded dataset across the nodes; returns the job id at once (the job runs
        detached: follow training://jobs/{job_id})."""
        return await tools.train(model_config, training_data, parallelism, nodes, epochs, batch_size, ctx)

    llm_train_distributed.__signature__ = inspect.signature(_train_schema)
    llm_train_distributed.__annotations__ = _train_schema.__annotations__

    for fn in (llm_inference_distributed, llm_train_distributed, llm_data_shard):
        server.add_tool(fn, name=fn.__name__, description=inspect.getdoc(fn))


def _add_resources(server: MCPServer, tools: ClusterTools) -> None:
    def dump(data: Any) -> str:
        return json.dumps(data, indent=1, default=str)

    async def guarded(make):
        """Expected failures (a job nobody has, a node down) as resource errors with their message."""
        try:
            return dump(await make)
        except ToolError as exc:
            raise ResourceError(str(exc)) from None
        except (TrainError, DataError) as exc:
            raise ResourceNotFoundError(str(exc)) from None
        except CLUSTER_ERRORS as exc:
            raise ResourceError(f"the cluster could not answer: {exc}") from None

    records = dataset_records

    def add(uri: str, description: str, fn) -> None:
        server.resource(uri, mime_type=JSON, description=description)(fn)

    async def models() -> str:
        return await guarded(views.models_view(tools.user, tools.nodes()))

    async def nodes() -> str:
        return await guarded(views.nodes_view(tools.user, tools.nodes()))

    async def performance() -> str:
        return await guarded(views.performance_view(tools.user, tools.nodes(), list(tools.recent)))

    async def jobs() -> str:
        return await guarded(views.jobs_view(tools.user, tools.nodes()))

    async def job(job_id: str) -> str:
        return await guarded(views.job_view(tools.user, tools.nodes(), job_id))

    async def data_shards() -> str:
        return await guarded(views.data_shards_view(tools.user, tools.nodes(), records()))

    async def data_shard(dataset: str) -> str:
        return await guarded(views.data_shards_view(tools.user, tools.nodes(), records(), dataset))

    async def checkpoints() -> str:
        return await guarded(views.checkpoints_view(tools.user, tools.nodes()))

    async def job_checkpoints(job_id: str) -> str:
        return await guarded(views.checkpoints_view(tools.user, tools.nodes(), job_id))

    async def metrics() -> str:
        return await guarded(views.metrics_view(tools.user, tools.nodes()))

    async def job_metrics(job_id: str) -> str:
        return await guarded(views.metrics_view(tools.user, tools.nodes(), job_id))

    async def serving_alerts() -> str:
        return dump(views.serving_alerts_view())

    add("llm://models", "Models in the local store and on the nodes: spans per node, layer coverage, can_generate",
        models)
    add("llm://nodes", "Every registered node asked now: status, latency, hardware, served spans", nodes)
    add("llm://performance", "Measured figures only: node GFLOP/s and latency, span pass times, this server's "
                             "generations, recent training throughput", performance)
    add("training://jobs", "Training jobs on every reachable coordinator", jobs)
    add("training://jobs/{job_id}", "One job: state, spec, events, last metrics, checkpoints", job)
    add("training://data_shards", "Datasets placed by this client, each shard checked on its node", data_shards)
    add("training://data_shards/{dataset}", "One dataset's shards", data_shard)
    add("training://checkpoints", "Checkpoints of the newest jobs", checkpoints)
    add("training://checkpoints/{job_id}", "One job's checkpoints", job_checkpoints)
    add("training://metrics", "The latest step, latest held-out evaluation and alerts of the newest jobs", metrics)
    add("training://metrics/{job_id}", "Every step of one job: loss, lr, grad norm, tokens/s, times, held-out "
                                       "eval_loss/eval_perplexity/eval_accuracy, and the job's alerts", job_metrics)
    add("llm://alerts", "Serving alerts of this client: stages inference failover dropped", serving_alerts)


def serve_stdio(user: Identity) -> None:
    """Serve on stdin/stdout until the client closes them."""
    import anyio

    # Plain one-line logs on stderr (MCP hosts keep them in a log file). Configured before the SDK
    # would install its own (rich, wrapped at 80 columns when stderr is not a terminal).
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    anyio.run(build_server(user).run_stdio_async)

