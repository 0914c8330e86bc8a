"""``dllmctl checkpoints``: a job's checkpoints, listed, shown, exported into the model store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from dllmctl.cli.common import JsonOpt, fail, human_bytes, local_model, locate_job, out, print_json, select_nodes

checkpoints_app = typer.Typer(help="Checkpoints of a job: list, show, export.", no_args_is_help=True)


@checkpoints_app.command("list")
def checkpoints_list(job: str, as_json: JsonOpt = False) -> None:
    """A job's checkpoints."""
    import asyncio

    from dllmd.net.messages import training as S
    from dllmctl.training.jobs import job_call

    user, node = locate_job(job)
    result = asyncio.run(job_call(user, node, S.CHECKPOINTS_LIST, {"job": job}))
    if as_json:
        print_json(result["checkpoints"])
        return
    table = Table("step", "loss", "size", "path")
    for c in result["checkpoints"]:
        table.add_row(str(c["step"]), f"{c['loss']:.4f}" if c.get("loss") is not None else "-", human_bytes(c["bytes"]),
                      c["path"])
    out.print(table)


@checkpoints_app.command("show")
def checkpoints_show(job: str, step: Annotated[Optional[int], typer.Option(help="Default: the latest.")] = None,
                     as_json: JsonOpt = False) -> None:
    """One checkpoint: its step, loss, files and where it lives."""
    import asyncio

    from dllmd.net.messages import training as S
    from dllmctl.training.jobs import job_call

    user, node = locate_job(job)
    result = asyncio.run(job_call(user, node, S.CHECKPOINTS_LIST, {"job": job}))
    chosen = [c for c in result["checkpoints"] if step is None or c["step"] == step]
    if not chosen:
        fail(f"job {job} has no checkpoint" + (f" at step {step}" if step is not None else ""))
    checkpoint = {**chosen[-1], "coordinator": node.name}
    if as_json:
        print_json(checkpoint)
        return
    for key, value in checkpoint.items():
        out.print(f"{key}: {value}")


@checkpoints_app.command("export")
def checkpoints_export(
    job: str,
    name: Annotated[str, typer.Option(help="Name of the fine-tuned model in the local store.")],
    step: Annotated[Optional[int], typer.Option(help="Default: the latest checkpoint.")] = None,
    directory: Annotated[Optional[Path], typer.Option("--dir", help="Also keep the transformers directory here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a checkpoint as a transformers model directory and import it into the model store."""
    import asyncio
    import tempfile

    from dllmd.net.client import CallError
    from dllmd.net.messages import training as S
    from dllmctl.models import local_store
    from dllmctl.models.importer import ModelImportError, import_model
    from dllmctl.training.export import export_checkpoint
    from dllmctl.training.jobs import TrainError, job_call

    user, node = locate_job(job)
    shown = asyncio.run(job_call(user, node, S.JOBS_SHOW, {"job": job}))
    base, _ = local_model(shown["spec"]["model"])
    with tempfile.TemporaryDirectory(prefix="dllm-export-") as tmp:
        target = directory or Path(tmp) / "model"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            registered = {n.name: n.public_key for n in select_nodes(None)}
            # Pinned, not told: the job's nodes, and those a resume moved its stages away from.
            names = shown["nodes"] + [n["name"] for n in shown["spec"].get("retired", [])]
            signers = [registered[name] for name in names if name in registered]
            exported = asyncio.run(export_checkpoint(user, node, job, step, base, target, signers))
            manifest = import_model(target, local_store(), user, name, force=True)
        except (TrainError, CallError, ModelImportError, OSError) as exc:
            fail(str(exc))
    report = {**exported, "model": manifest.name, "params": manifest.params,
              "directory": str(directory) if directory else None}
    if as_json:
        print_json(report)
        return
    out.print(f"exported step {exported['step']} of {job} as model {manifest.name} "
              f"({manifest.params / 1e6:.1f}M params); deploy it with 'dllmctl deploy {manifest.name}'")
