"""``dllmctl infer``: generate text through the nodes that serve a model, streaming tokens.

The work is :mod:`dllmctl.generation`'s, shared with ``dllmctl serve`` and ``dllmctl mcp`` so that
all three give the same text for the same request; this module is flags and printing.
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from dllmctl.cli.common import (ActivationBlockOpt, ActivationsOpt, JsonOpt, PrivateLayersOpt, PrivateOpt, TpOpt, fail, load_registry, load_user, local_model, print_generation_footer,
                                print_json)


def infer_command(
    prompt: Annotated[str, typer.Argument(help="The prompt (a user message unless --raw).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model name (see 'dllmctl model list').")],
    max_new_tokens: Annotated[int, typer.Option(min=1, max=100_000)] = 128,
    temperature: Annotated[Optional[float], typer.Option(
        min=0.0, max=100.0, help="0: greedy (exact). Default: the model's generation_config.json, else 0.7.",
        show_default=False)] = None,
    top_p: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Default: the model's, else 0.9.",
                                                   show_default=False)] = None,
    top_k: Annotated[Optional[int], typer.Option(min=0, help="0: no limit. Default: the model's, else 50.",
                                                 show_default=False)] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option(
        min=0.01, max=100.0, help="As transformers': logits of tokens already in the prompt or output divided by "
                                  "it (above 1 discourages repeats; 1: off). Default: the model's, else 1.",
        show_default=False)] = None,
    stop: Annotated[Optional[list[str]], typer.Option(
        "--stop", help="End the text before this string (repeatable, at most 4).")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seeds sampling: the same seed gives the same text.")] = 0,
    raw: Annotated[bool, typer.Option("--raw", help="Tokenize the prompt as is, without the chat template.")] = False,
    system: Annotated[Optional[str], typer.Option(help="A system message (chat models).")] = None,
    parallelism: Annotated[str, typer.Option(
        help="pipeline: prompt in chunks that overlap across stages, decode batched with other sessions; "
             "model: one piece, never batched; tensor: through a tensor-parallel group; hybrid: through a "
             "chain of groups.")] = "pipeline",
    deploy: Annotated[bool, typer.Option("--deploy", help=(
        "With tensor or hybrid: when no such layout serves the model, plan one over the free nodes and "
        "deploy it first."))] = False,
    tp: TpOpt = None,
    activations: ActivationsOpt = "fp32",
    activation_block: ActivationBlockOpt = 64,
    prefix_cache: Annotated[bool, typer.Option(
        "--prefix-cache/--no-prefix-cache",
        help="Let the stages start from your earlier prompts' cached blocks (and cache this one's).")] = True,
    private: PrivateOpt = False,
    private_layers: PrivateLayersOpt = 1,
    relays: Annotated[Optional[str], typer.Option(help="Comma-separated relay nodes (relay = true in their "
                                                       "node.toml) every request goes through, sealed per relay: "
                                                       "the stages see the last relay, not you.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate text through the distributed model; tokens stream as they come."""

    from dllmctl.inference.generation import CLUSTER_ERRORS, GenerationError, GenerationRequest, prepare, run

    request = GenerationRequest(model=model, prompt=prompt, raw=raw, system=system, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, top_k=top_k,
                                repetition_penalty=repetition_penalty, stop=list(stop or []), seed=seed,
                                parallelism=parallelism,
                                activations=activations, activation_block=activation_block,
                                prefix_cache=prefix_cache, private_layers=private_layers if private else 0,
                                relays=[r.strip() for r in relays.split(",") if r.strip()] if relays else [])
    try:
        prepared = prepare(request)
    except GenerationError as exc:
        fail(str(exc))
    user, registry = load_user(), load_registry()

    def show(delta: str) -> None:
        if not as_json:
            sys.stdout.write(delta)
            sys.stdout.flush()

    from dllmd.net.schema import to_wire
    from dllmctl.placement.routing import RouteError

    try:
        try:
            result = _interruptible(run(user, registry.select(None), prepared, on_text=show))
        except RouteError:
            if not (deploy and parallelism in ("tensor", "hybrid")):
                raise
            _deploy_layout(user, registry.select(None), model, parallelism, tp, as_json)
            result = _interruptible(run(user, registry.select(None), prepared, on_text=show))
    except CLUSTER_ERRORS as exc:
        fail(str(exc))
    generation = result.generation
    route = generation.routes[-1]
    if as_json:
        print_json({"text": result.text, "token_ids": result.token_ids, "prompt_tokens": result.prompt_tokens,
                    "finish_reason": result.finish_reason, "sampling": to_wire(prepared.sampling),
                    "new_tokens": result.completion_tokens, "seconds": round(generation.seconds, 4),
                    "tokens_per_second": round(result.completion_tokens / generation.seconds, 3)
                    if generation.seconds else None,
                    "ttft_ms": round(generation.time_to_first_token_s * 1000, 2),
                    "cached_tokens": generation.cached_tokens, "route": route, "failovers": generation.failovers})
        return
    sys.stdout.write("\n")
    print_generation_footer(result)


def _deploy_layout(user, entries, model: str, parallelism: str, tp, quiet: bool) -> None:
    """Plan a tensor or hybrid layout over the free nodes and deploy it, with a progress bar per node."""
    import asyncio

    from dllmd.net.client import CallError
    from dllmctl.models.layouts import plan_for
    from dllmctl.cli.common import transfer_progress
    from dllmctl.models.deploy import bytes_to_send, deploy
    from dllmctl.placement.layout import PlanError

    directory, manifest = local_model(model)
    try:
        layout = asyncio.run(plan_for(user, entries, directory, manifest, parallelism, tp, 1))
    except PlanError as exc:
        fail(f"no {parallelism} layout of {model} is deployed, and none could be: {exc}")
    by_name = {e.name: e for e in entries}
    with transfer_progress(quiet) as progress:
        tasks = {s.node: progress.add_task(f"{s.node} {s.group}#{s.tensor_slice.rank}", total=bytes_to_send(manifest, s))
                 for s in layout.spans}
        try:
            asyncio.run(deploy(user, by_name, directory, layout.spans, lambda node, n: progress.advance(tasks[node], n)))
        except CallError as exc:
            fail(f"deploying the {parallelism} layout failed: {exc}")


def _interruptible(work):
    """``asyncio.run(work)``, where Ctrl+C cancels it until it ends and then raises KeyboardInterrupt.
    asyncio.run cancels once, and Python 3.11's wait_for loses a cancellation that lands as its inner
    call completes: a generation then ran to its end, Ctrl+C ignored (seen under load in CI)."""
    import asyncio
    import signal

    interrupted = []

    async def main():
        loop, task = asyncio.get_running_loop(), asyncio.current_task()

        def cancel() -> None:
            if not task.done():
                task.cancel()
                loop.call_later(0.5, cancel)  # once more, in case that cancellation was lost

        def on_sigint() -> None:
            interrupted.append(True)
            cancel()

        loop.add_signal_handler(signal.SIGINT, on_sigint)
        try:
            return await work
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
