"""``dllmctl demo``: the main job on an embedded default, for a newcomer's first minute."""

from __future__ import annotations

from dllmctl import local_cluster
from dllmctl.cli.common import fail, load_registry, load_user, out
from dllmctl.cli.nodes import list_nodes
from dllmctl.cluster import RegistryError
from dllmctl.paths import local_clusters_dir

DEMO_NODES = 3

def demo() -> None:
    """Start a local 3-node cluster (unless it runs already) and show it live."""
    user = load_user()
    directory = local_clusters_dir() / "local"
    running = [n for n in local_cluster.load_state(directory) if n.process()]
    if len(running) < DEMO_NODES:
        registry = load_registry()
        if running:
            local_cluster.down(directory, registry)
        try:
            with out.status(f"starting {DEMO_NODES} local daemons..."):
                local_cluster.up(DEMO_NODES, directory, user, registry)
        except (local_cluster.LocalClusterError, RegistryError) as exc:
            fail(str(exc))
    list_nodes(as_json=False, timeout=5.0)
    out.print("stop the cluster with 'dllmctl cluster down'")
