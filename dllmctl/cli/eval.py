"""``dllmctl eval``: measure what a deployed model predicts (perplexity of a held-out text).

The work is :mod:`dllmctl.inference.perplexity`'s; this module is flags and printing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dllmctl.cli.common import ActivationBlockOpt, ActivationsOpt, JsonOpt, fail, load_registry, load_user, out, print_json

app = typer.Typer(help="Measure a deployed model's quality.", no_args_is_help=True)


@app.command("perplexity")
def perplexity_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Model name (see 'dllmctl model list').")],
    text: Annotated[Path, typer.Option("--text", help="A UTF-8 text file to score (held out from training).",
                                       exists=True, dir_okay=False, readable=True)],
    window: Annotated[int, typer.Option(min=2, max=512, help="Tokens per scoring window.")] = 256,
    stride: Annotated[int, typer.Option(min=1, max=511, help="Tokens between window starts; each token is "
                                                             "scored once, with up to window - stride of context.")] = 128,
    max_tokens: Annotated[Optional[int], typer.Option(min=2, help="Score only the text's first tokens.")] = None,
    parallelism: Annotated[str, typer.Option(help="Which deployed layout to run through (as for infer).")
                           ] = "pipeline",
    reference: Annotated[Optional[str], typer.Option(help=(
        "Also score the text with this deployed model (e.g. the unquantized one) and report how often "
        "the two predict the same next token (the reference's hidden states travel exact, fp32; MODEL "
        "itself as the reference measures what --activations changes)."))] = None,
    activations: ActivationsOpt = "fp32",
    activation_block: ActivationBlockOpt = 64,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity of TEXT through the nodes serving MODEL, in sliding windows."""
    import asyncio

    from dllmctl.cli.common import StageProgress
    from dllmctl.inference.generation import CLUSTER_ERRORS, GenerationError, check_parallelism
    from dllmctl.inference.perplexity import PerplexityRequest, agreement, perplexity
    from dllmd.net.codec import CodecError, HopCodec

    try:
        content = text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {text} as UTF-8 text: {exc}")
    names = [model] + ([reference] if reference else [])
    progress = StageProgress(transient=as_json)
    results, error = [], None
    try:
        hops = HopCodec(activations, activation_block)
    except CodecError as exc:
        fail(str(exc))
    try:
        check_parallelism(parallelism)
        user, nodes = load_user(), load_registry().select(None)
        for index, name in enumerate(names):
            # The reference is scored with exact hops: --reference MODEL itself measures --activations alone.
            request = PerplexityRequest(name, content, window, stride, max_tokens, parallelism,
                                        hops if index == 0 else HopCodec())
            results.append(asyncio.run(perplexity(user, nodes, request,
                                                  lambda done, total, n=name: progress(n, done, total))))
        same = agreement(*results) if reference else None
    except (GenerationError, *CLUSTER_ERRORS) as exc:
        error = str(exc)
    except ValueError as exc:  # the two models' tokenizers cut the text differently
        error = f"{model} and {reference} cannot be compared: {exc}"
    finally:
        progress.stop()
    if error is not None:
        fail(error)
    doc = results[0].to_dict()
    if reference:
        doc["reference"] = results[1].to_dict()
        doc["perplexity_ratio"] = round(results[0].perplexity / results[1].perplexity, 4)
        doc["top1_agreement"] = round(same, 4)
    if as_json:
        print_json(doc)
        return
    for result in results:
        out.print(f"{result.model}: perplexity [bold]{result.perplexity:.3f}[/bold] over {result.scored} tokens "
                  f"({result.windows} windows of {window}, stride {stride})")
    if reference:
        out.print(f"{model} / {reference}: perplexity x{doc['perplexity_ratio']}, same next token at "
                  f"{same:.1%} of positions")
