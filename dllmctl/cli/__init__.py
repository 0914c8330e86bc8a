"""``dllmctl``: one typer sub-app per noun."""

from __future__ import annotations

import typer

from dllmd import __version__
from dllmctl.cli import api, bench, bench_serving, bench_train, checkpoints, cluster, data, deploy, eval, infer, metrics, model, nodes, plan, top, train
from dllmctl.cli.demo import demo
from dllmctl.cli.common import JsonOpt, out, print_json
from dllmctl.paths import identity_path

app = typer.Typer(help="dllmctl: drive a dllm cluster (distributed LLM inference and training).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(nodes.app, name="nodes")
app.add_typer(cluster.app, name="cluster")
# The bench app's commands live in three modules by what they measure; registered here, where every
# cli module comes together (cli modules import only cli.common).
for command in (bench_serving.relays, bench_serving.soak, bench_train.allreduce, bench_train.train,
                bench_train.chaos):
    bench.app.command(command.__name__)(command)
app.add_typer(bench.app, name="bench")
app.add_typer(model.app, name="model")
app.add_typer(data.app, name="data")
app.add_typer(eval.app, name="eval")
app.command()(demo)
app.command("deploy")(deploy.deploy_command)
app.command("undeploy")(deploy.undeploy_command)
app.command("infer")(infer.infer_command)
app.command("shard-data")(data.shard_data_command)
app.command("train")(train.train_command)
app.command("metrics")(metrics.metrics_command)
app.command("top")(top.top_command)
app.command("alerts")(metrics.alerts_command)
app.add_typer(train.jobs_app, name="jobs")
app.add_typer(checkpoints.checkpoints_app, name="checkpoints")
app.command("plan")(plan.plan_command)
app.command("rebalance")(plan.rebalance_command)
app.command("serve")(api.serve_command)
app.command("mcp")(api.mcp_command)


@app.command()
def init(as_json: JsonOpt = False) -> None:
    """Create your identity (an Ed25519 key) under the config dir, or show the existing one."""
    from dllmd.net.identity import Identity

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
    from dllmd.process_exit import run_and_exit

    run_and_exit(app)
