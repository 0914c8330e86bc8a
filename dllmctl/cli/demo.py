"""``dllmctl demo``: the main job on an embedded default, for a newcomer's first minutes.

Starts a local 3-node cluster (unless it runs), pulls SmolLM2-135M-Instruct if the store lacks it,
shows the layout, deploys it and streams the answer to a prompt through the three daemons.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from dllmctl.cli.common import (fail, load_registry, load_user, out, print_deployed, print_generation_footer, print_layout,
                                print_nodes)

DEMO_NODES = 3
DEMO_MODEL = "smollm2-135m-instruct"
DEMO_PROMPT = "Generate a story about a robot"


def _ensure_cluster() -> None:
    from dllmctl.cluster import local as local_cluster
    from dllmctl.cluster.registry import RegistryError

    user = load_user()
    directory = local_cluster.default_dir()
    running = [n for n in local_cluster.load_state(directory) if n.process()]
    if len(running) >= DEMO_NODES:
        return
    registry = load_registry()
    if running:
        local_cluster.down(directory, registry)
    try:
        with out.status(f"starting {DEMO_NODES} local daemons..."):
            local_cluster.up(DEMO_NODES, directory, user, registry, remember=True)
    except (local_cluster.LocalClusterError, RegistryError) as exc:
        fail(str(exc))


def demo(
    prompt: Annotated[str, typer.Argument(help="What to ask the model.")] = DEMO_PROMPT,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=4096)] = 200,
) -> None:
    """Start a local 3-node cluster, pull SmolLM2-135M-Instruct, deploy it across the nodes and
    stream an answer through them."""
    import asyncio

    from dllmd.models.store import ModelStoreError
    from dllmd.net.client import CallError
    from dllmctl.cli.common import StageProgress, transfer_progress
    from dllmctl.cluster.live import query_nodes
    from dllmctl.inference.generation import CLUSTER_ERRORS, GenerationError, GenerationRequest, prepare, run
    from dllmctl.models import local_store
    from dllmctl.models.deploy import bytes_to_send, deploy
    from dllmctl.models.importer import ModelImportError, pull_model
    from dllmctl.models.layouts import plan_on_live_nodes
    from dllmctl.paths import cache_dir
    from dllmctl.placement.layout import PlanError

    _ensure_cluster()
    user, registry = load_user(), load_registry()
    entries = registry.select(None)
    print_nodes(asyncio.run(query_nodes(user, entries, 5.0)))
    store = local_store()
    if not store.exists(DEMO_MODEL):
        progress = StageProgress(transient=False)
        try:
            pull_model(DEMO_MODEL, store, user, cache_dir(), progress)
        except (ModelImportError, ModelStoreError, OSError) as exc:
            fail(str(exc))
        finally:
            progress.stop()
    directory, manifest = store.path(DEMO_MODEL), store.get(DEMO_MODEL)
    out.rule("layout")
    try:
        layout = asyncio.run(plan_on_live_nodes(user, entries, manifest, 1))
    except PlanError as exc:
        fail(str(exc))
    print_layout(layout.to_json())
    out.rule("deploy")
    with transfer_progress(False) as bar:
        tasks = {s.node: bar.add_task(f"{s.node} [{s.start}-{s.end})", total=bytes_to_send(manifest, s))
                 for s in layout.spans}
        try:
            reports = asyncio.run(deploy(user, {e.name: e for e in entries}, directory, layout.spans,
                                         lambda node, n: bar.advance(tasks[node], n)))
        except CallError as exc:
            fail(f"deploy failed: {exc}")
    print_deployed(reports)
    out.rule(f"prompt: {prompt}")
    try:
        prepared = prepare(GenerationRequest(model=DEMO_MODEL, prompt=prompt, max_new_tokens=max_new_tokens))
        result = asyncio.run(run(user, entries, prepared, on_text=lambda d: (sys.stdout.write(d), sys.stdout.flush())))
    except GenerationError as exc:
        fail(str(exc))
    except CLUSTER_ERRORS as exc:
        fail(str(exc))
    sys.stdout.write("\n")
    print_generation_footer(result)
    out.print("stop the cluster with 'dllmctl cluster down'")
