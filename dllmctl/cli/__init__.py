"""``dllmctl``: one typer sub-app per noun."""

from __future__ import annotations

import typer

from dllmd import __version__
from dllmd.net.identity import Identity
from dllmctl.cli import api, bench, cluster, data, deploy, infer, model, nodes, train
from dllmctl.cli.demo import demo
from dllmctl.cli.common import JsonOpt, out, print_json
from dllmctl.paths import identity_path

app = typer.Typer(help="dllmctl: drive a dllm cluster (distributed LLM inference and training).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(nodes.app, name="nodes")
app.add_typer(cluster.app, name="cluster")
app.add_typer(bench.app, name="bench")
app.add_typer(model.app, name="model")
app.add_typer(data.app, name="data")
app.command()(demo)
app.command("deploy")(deploy.deploy_command)
app.command("undeploy")(deploy.undeploy_command)
app.command("infer")(infer.infer_command)
app.command("shard-data")(data.shard_data_command)
app.command("train")(train.train_command)
app.command("metrics")(train.metrics_command)
app.add_typer(train.jobs_app, name="jobs")
app.add_typer(train.checkpoints_app, name="checkpoints")
app.command("serve")(api.serve_command)
app.command("mcp")(api.mcp_command)


@app.command("plan")
def plan(
    model: str = typer.Argument(..., help="Model name in the local store."),
    nodes: str = typer.Option(None, help="Comma-separated node names (default: all registered)."),
    replicas: int = typer.Option(1, min=1, max=16, help="Hold every layer on this many nodes."),
    as_json: JsonOpt = False,
) -> None:
    """Contiguous layer spans per node, sized by free memory and weighted by measured throughput."""
    from dllmctl.cli.plan import plan_command

    plan_command(model, nodes, replicas, as_json)


@app.command("rebalance")
def rebalance(
    model: str = typer.Argument(..., help="Model name in the local store."),
    replicas: int = typer.Option(None, min=1, max=16,
                                 help="Hold every layer on this many nodes (default: as many as hold its layers now)."),
    apply: bool = typer.Option(False, "--apply", help="Deploy the new spans and unload the dropped ones."),
    dtype: str = typer.Option("", help="Load new spans as float32, bfloat16 or float16 (default: as served now)."),
    as_json: JsonOpt = False,
) -> None:
    """After nodes joined or left: a layout that moves as few layers as possible (--apply makes it so)."""
    from dllmctl.cli.rebalance import rebalance_command

    rebalance_command(model, replicas, apply, dtype, as_json)


@app.command()
def init(as_json: JsonOpt = False) -> None:
    """Create your identity (an Ed25519 key) under the config dir, or show the existing one."""
    path = identity_path()
    created = not path.exists()
    if created:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        Identity.generate().save(path)
    identity = Identity.load(path)
    if as_json:
        print_json({"public_key": identity.public_key, "id": identity.node_id, "path": str(path), "created": created})
        return
    out.print(("created" if created else "existing") + f" identity {path}")
    out.print(f"public key {identity.public_key}")
    out.print("authorize it on a node with: dllmd authorize <key> --role admin")


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


def main() -> None:
    app()
