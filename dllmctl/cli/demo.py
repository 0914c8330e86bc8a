"""``dllmctl demo``: the main job on an embedded default, for a newcomer's first minutes.

Starts a local 3-node cluster (unless it runs), pulls SmolLM2-135M-Instruct if the store lacks it,
shows the layout, deploys it and streams the answer to a prompt through the three daemons.
"""

from __future__ import annotations

from typing import Annotated

import typer

from dllmctl import local_cluster
from dllmctl.cli.common import fail, load_registry, load_user, out
from dllmctl.cli.nodes import list_nodes
from dllmctl.cluster import RegistryError
from dllmctl.paths import local_clusters_dir, model_store_root

DEMO_NODES = 3
DEMO_MODEL = "smollm2-135m-instruct"
DEMO_PROMPT = "Generate a story about a robot"


def _ensure_cluster() -> None:
    user = load_user()
    directory = local_clusters_dir() / "local"
    running = [n for n in local_cluster.load_state(directory) if n.process()]
    if len(running) >= DEMO_NODES:
        return
    registry = load_registry()
    if running:
        local_cluster.down(directory, registry)
    try:
        with out.status(f"starting {DEMO_NODES} local daemons..."):
            local_cluster.up(DEMO_NODES, directory, user, registry)
    except (local_cluster.LocalClusterError, RegistryError) as exc:
        fail(str(exc))


def demo(
    prompt: Annotated[str, typer.Argument(help="What to ask the model.")] = DEMO_PROMPT,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=4096)] = 200,
) -> None:
    """Start a local 3-node cluster, pull SmolLM2-135M-Instruct, deploy it across the nodes and
    stream an answer through them."""
    from dllmctl.cli.deploy import deploy_command
    from dllmctl.cli.infer import infer_command
    from dllmctl.cli.model import pull
    from dllmctl.cli.plan import plan_command

    _ensure_cluster()
    list_nodes(as_json=False, timeout=5.0)
    if not (model_store_root() / DEMO_MODEL / "manifest.json").exists():
        pull(DEMO_MODEL)
    out.rule("layout")
    plan_command(DEMO_MODEL, None, 1, False)
    out.rule("deploy")
    deploy_command(DEMO_MODEL, None, "", False)
    out.rule(f"prompt: {prompt}")
    infer_command(prompt, DEMO_MODEL, max_new_tokens=max_new_tokens)
    out.print("stop the cluster with 'dllmctl cluster down'")
