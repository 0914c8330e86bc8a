"""What the reliability tests share: a tiny llama served by local daemons registered in the test user's
own files (so that in-process front ends and `dllmctl` subprocesses both find them), and the figures
each test reports, printed in the suite's summary."""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_model

MODEL = "tiny"
_FIGURES: list[str] = []


@contextmanager
def serving_cluster(user, root: Path, nodes: int, context: int = 512):
    """``nodes`` daemons serving the tiny llama's 5 layers split evenly; yields (user, node entries)."""
    from dllmctl.cluster import local as local_cluster
    from dllmctl.cluster.registry import Registry
    from dllmctl.models.deploy import deploy
    from dllmctl.models.importer import import_model
    from dllmctl.paths import cluster_file, model_store_root
    from dllmctl.placement.layout import Span
    from dllmd.models.store import ModelStore

    registry = Registry(cluster_file())
    local_cluster.up(nodes, root / "daemons", user, registry)
    try:
        store = ModelStore(model_store_root())
        import_model(make_tiny_model("llama", root / "src", max_position_embeddings=context), store, user, name=MODEL)
        cuts = [5 * i // nodes for i in range(nodes + 1)]
        spans = [Span(f"local-{i + 1}", a, b, a == 0, b == 5) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
        asyncio.run(deploy(user, registry.nodes, store.root / MODEL, spans))
        yield user, list(registry.nodes.values())
    finally:
        local_cluster.down(root / "daemons", registry)


@pytest.fixture(scope="session")
def report_figures():
    """``report_figures("soak: ...")`` adds a line to the suite's closing summary."""
    return _FIGURES.append


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("reliability figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
