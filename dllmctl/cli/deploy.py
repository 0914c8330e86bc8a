"""``dllmctl deploy`` / ``undeploy``: put a model's layer spans on the nodes of a plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from dllmctl.cli.common import (DtypeOpt, JsonOpt, LayoutOpt, PrivateLayersOpt, PrivateOpt, ReplicasOpt, ThroughputOpt,
                                TpOpt, fail,
                                load_registry, load_user,
                                local_model, out, print_deployed, print_json, select_nodes)


def deploy_command(
    model: Annotated[str, typer.Argument(help="Model name in the local store.")],
    plan: Annotated[Optional[Path], typer.Option("--plan", help="Plan JSON from 'dllmctl plan --json'.")] = None,
    parallelism: LayoutOpt = "pipeline",
    tp: TpOpt = None,
    replicas: ReplicasOpt = 1,
    dtype: DtypeOpt = "",
    private: PrivateOpt = False,
    private_layers: PrivateLayersOpt = 1,
    throughput: ThroughputOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Send each node the tensors of its span (encrypted, resumable) and load them; tensor-parallel
    groups are then linked."""
    import asyncio

    from dllmd.net.client import CallError
    from dllmctl.models.layouts import plan_for
    from dllmctl.cli.common import transfer_progress
    from dllmctl.models.deploy import bytes_to_send, deploy
    from dllmctl.placement.layout import Layout, PlanError

    user, registry = load_user(), load_registry()
    directory, manifest = local_model(model)
    if plan is not None and throughput:
        fail("--throughput plans a layout; --plan deploys one from a file: use one or the other")
    try:
        if plan is not None:
            try:
                doc = json.loads(plan.read_text())
            except (OSError, ValueError) as exc:
                raise PlanError(f"cannot read plan {plan}: {exc}") from None
            layout = Layout.from_json(doc, model, manifest.num_layers)
            if layout.groups():
                from dllmctl.models.layouts import tensor_shape
                from dllmctl.placement.tensor import check_covers

                check_covers(layout.groups(), tensor_shape(directory, manifest))
        else:
            layout = asyncio.run(plan_for(user, registry.select(None), directory, manifest, parallelism, tp, replicas,
                                          private_layers if private else 0, throughput))
    except PlanError as exc:
        fail(str(exc) if plan is None else f"{plan}: {exc}")
    spans = layout.spans
    nodes = {n.name: n for n in select_nodes(",".join(sorted({s.node for s in spans})), registry)}
    with transfer_progress(as_json) as progress:
        tasks = {s.node: progress.add_task(f"{s.node} [{s.start}-{s.end})" + (f" {s.group}#{s.tensor_slice.rank}"
                                                                              if s.tensor_slice else ""),
                                           total=bytes_to_send(manifest, s))
                 for s in spans}
        try:
            reports = asyncio.run(deploy(user, nodes, directory, spans,
                                         lambda node, n: progress.advance(tasks[node], n), dtype))
        except CallError as exc:
            fail(f"deploy failed: {exc}")
    if as_json:
        print_json(reports)
    else:
        print_deployed(reports)


def undeploy_command(
    model: str,
    remove_files: Annotated[bool, typer.Option("--remove-files", help="Also delete the files from the nodes.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Stop serving a model on every registered node."""
    import asyncio

    from dllmctl.models.deploy import undeploy

    outcome = asyncio.run(undeploy(load_user(), select_nodes(None), model, remove_files))
    if as_json:
        print_json(outcome)
        return
    for node, what in outcome.items():
        out.print(f"{node}: {what}")
