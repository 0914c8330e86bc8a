"""``dllmctl infer``: generate text through the nodes that serve a model, streaming tokens."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Annotated, Optional

import typer

from dllmctl.cli.common import JsonOpt, err, fail, load_registry, load_user, print_json
from dllmctl.cli.deploy import model_dir
from dllmctl.failover import generate_with_failover
from dllmctl.inference import PARALLELISMS, ClientPool
from dllmctl.routing import RouteError, live_stages
from dllmctl.tokens import PromptError, encode_prompt, load_tokenizer, stop_ids
from dllmd.inference.sampling import SamplingParams
from dllmd.net.client import CallError


def infer_command(
    prompt: Annotated[str, typer.Argument(help="The prompt (a user message unless --raw).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model name (see 'dllmctl model list').")],
    max_new_tokens: Annotated[int, typer.Option(min=1, max=100_000)] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, max=100.0, help="0 means greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    top_k: Annotated[int, typer.Option(min=0)] = 0,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    raw: Annotated[bool, typer.Option("--raw", help="Tokenize the prompt as is, without the chat template.")] = False,
    system: Annotated[Optional[str], typer.Option(help="A system message (chat models).")] = None,
    parallelism: Annotated[str, typer.Option(
        help="pipeline: prompt in chunks that overlap across stages, decode batched with other sessions; "
             "model: one piece, never batched.")] = "pipeline",
    as_json: JsonOpt = False,
) -> None:
    """Generate text through the distributed model; tokens stream as they come."""
    if parallelism not in PARALLELISMS:
        fail(f"--parallelism must be one of {', '.join(PARALLELISMS)}")
    user, registry = load_user(), load_registry()
    directory = model_dir(model)
    manifest = json.loads((directory / "manifest.json").read_text())
    tokenizer = load_tokenizer(directory)
    try:
        prompt_ids = encode_prompt(tokenizer, prompt, raw=raw, system=system)
        limit = json.loads((directory / "config.json").read_text()).get("max_position_embeddings")
        if limit and len(prompt_ids) + max_new_tokens > limit:
            raise PromptError(f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens {max_new_tokens} exceeds the "
                              f"model's context of {limit} tokens; shorten the prompt or lower --max-new-tokens")
    except PromptError as exc:
        fail(str(exc))
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    printed = [""]

    def show(_token: int, generated: list[int]) -> None:
        if as_json:
            return
        text = tokenizer.decode(generated, skip_special_tokens=True)
        sys.stdout.write(text[len(printed[0]):])
        sys.stdout.flush()
        printed[0] = text

    async def run():
        nodes = registry.select(None)
        generated: list[int] = []
        async with ClientPool(user) as pool:
            return await generate_with_failover(
                pool, lambda: live_stages(user, nodes, model), model, manifest["num_layers"], prompt_ids,
                max_new_tokens, stop_ids(tokenizer, directory), sampling, parallelism=parallelism,
                on_token=lambda t: (generated.append(t), show(t, generated)))

    try:
        result = asyncio.run(run())
    except (RouteError, CallError) as exc:
        fail(str(exc))
    route = result.routes[-1]
    text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    if as_json:
        print_json({"text": text, "token_ids": result.token_ids, "prompt_tokens": result.prompt_tokens,
                    "new_tokens": len(result.token_ids), "seconds": round(result.seconds, 4),
                    "tokens_per_second": round(len(result.token_ids) / result.seconds, 3) if result.seconds else None,
                    "route": route, "failovers": result.failovers})
        return
    sys.stdout.write("\n")
    rate = len(result.token_ids) / result.seconds if result.seconds else 0
    err.print(f"[dim]{len(result.token_ids)} tokens in {result.seconds:.2f}s ({rate:.1f} tok/s) via "
              + " -> ".join(f"{s['node']}[{s['start']}-{s['end']})" for s in route) + "[/dim]")
    for failover in result.failovers:
        err.print(f"[yellow]failover at token {failover['step']}: {failover['error']}[/yellow]")
