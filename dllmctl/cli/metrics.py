"""``dllmctl metrics``: a job's steps (or federated rounds), as a table, NDJSON or a loss plot."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from dllmctl.cli.common import JsonOpt, err, fail, human_bytes, locate_job, maybe_number, out, print_json

FOLLOW_POLL_S = 1.0


def metrics_command(
    job: str,
    follow: Annotated[bool, typer.Option("--follow", help="Keep printing new steps (NDJSON with --json).")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Write the loss curve (and the held-out loss's) to this "
                                                      "PNG file.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Per-step loss, learning rate, gradient norm, tokens/s, compute/communication time, the held-out
    evaluation (eval loss, perplexity, next-token accuracy) and the job's alerts."""
    import asyncio

    from dllmd.net.client import CallError
    from dllmd.net.messages import training as S
    from dllmctl.training.jobs import job_call

    user, node = locate_job(job)
    rows, after = [], -1
    try:
        while True:
            status = asyncio.run(job_call(user, node, S.JOBS_METRICS, {"job": job, "after_step": after}))
            fresh = status["metrics"]
            rows += fresh
            if fresh:
                after = fresh[-1]["step"]
            if follow:
                for row in fresh:
                    print(json.dumps(row), flush=True) if as_json else _print_metric(row)
                if status["more"]:
                    continue
                if status["state"] not in ("running", "stopping", "queued"):
                    break
                time.sleep(FOLLOW_POLL_S)
            elif not status["more"]:
                break
    except KeyboardInterrupt:
        raise typer.Exit(0)
    except CallError as exc:
        fail(str(exc))
    if plot is not None:
        from dllmctl.training.plot import loss_plot

        try:
            loss_plot(rows, plot, title=job)
        except OSError as exc:
            fail(f"cannot write {plot}: {exc}")
        err.print(f"wrote {plot}")
    if follow:
        return
    if as_json:
        print_json(rows)
        return
    if rows and "sampled" in rows[0]:
        out.print(_rounds_table(rows))
    else:
        out.print(_steps_table(rows))
    _print_alerts(user, node, job)


def _print_alerts(user, node, job: str) -> None:
    """The job's alerts under its table (its events hold them: ``jobs show`` lists every event)."""
    import asyncio

    from dllmd.net.messages import training as S
    from dllmctl.alerts import job_alerts
    from dllmctl.training.jobs import job_call

    for alert in job_alerts(asyncio.run(job_call(user, node, S.JOBS_SHOW, {"job": job}))):
        where = f" {alert['node']}" if alert["node"] else ""
        out.print(f"[yellow]alert {alert['code']}[/yellow] ({alert['severity']}{where}) "
                  f"{time.strftime('%H:%M:%S', time.localtime(alert['time']))}: {alert['message']}")


def alerts_command(as_json: JsonOpt = False) -> None:
    """Serving alerts of this client: stages that inference failover dropped (a job's alerts are in
    'dllmctl jobs show' and 'dllmctl metrics')."""
    from dllmctl.alerts import log_path, recent

    alerts = recent()
    if as_json:
        print_json([json.loads(a.to_json()) for a in alerts])
        return
    if not alerts:
        out.print(f"no serving alerts ({log_path()})")
        return
    table = Table("time", "alert", "severity", "model", "node", "message")
    for a in alerts:
        table.add_row(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a.time)), a.code, a.severity, a.job, a.node,
                      a.message)
    out.print(table)


def _steps_table(rows: list[dict]) -> Table:
    pipeline = bool(rows) and "bubble" in rows[0]
    private = bool(rows) and "epsilon" in rows[0]
    sent = bool(rows) and "bytes_sent" in rows[0]
    outer = bool(rows) and "inner_steps" in rows[0]
    columns = ["outer step" if outer else "step", "loss", "lr", "pseudo-grad norm" if outer else "grad norm",
               "tokens/s", "step s", "compute s", "comm s"]
    heldout = any("heldout_loss" in row for row in rows)
    evaluated = any("eval_loss" in row for row in rows)
    columns += (["exposed s", "sent"] if sent else []) + (["inner steps"] if outer else [])
    columns += ["held-out loss"] if heldout else []
    columns += EVAL_COLUMNS if evaluated else []
    columns += (["bubble", "between stages"] if pipeline else []) + (["rows", "epsilon"] if private else [])
    table = Table(*columns)
    for row in rows:
        cells = [str(row["step"]), maybe_number(row["loss"], ".4f"), f"{row['lr']:.2e}", f"{row['grad_norm']:.3f}",
                 f"{row['tokens_per_s']:.0f}", f"{row['step_s']:.3f}", f"{row['compute_s']:.3f}", f"{row['comm_s']:.3f}"]
        if sent:
            cells += [f"{row['comm_exposed_s']:.3f}", human_bytes(row["bytes_sent"])]
        if outer:
            cells.append(str(row["inner_steps"]))
        if heldout:
            cells.append(maybe_number(row.get("heldout_loss"), ".4f"))
        if evaluated:
            cells += _eval_cells(row)
        if pipeline:
            cells += [f"{row['bubble']:.0%}", human_bytes(row["bytes_between_stages"])]
        if private:
            cells += [str(row["rows"]), f"{row['epsilon']:.4g}"]
        table.add_row(*cells)
    return table


EVAL_COLUMNS = ["eval loss", "eval ppl", "eval acc"]


def _eval_cells(row: dict) -> list[str]:
    """A row's held-out evaluation (``-`` for the steps between evaluations)."""
    if "eval_loss" not in row:
        return ["-"] * len(EVAL_COLUMNS)
    return [f"{row['eval_loss']:.4f}", f"{row['eval_perplexity']:.2f}", f"{row['eval_accuracy']:.1%}"]


def _rounds_table(rows: list[dict]) -> Table:
    """A federated job's rounds: the global model's loss on the clients' data, theirs after training."""
    private = "epsilon" in rows[0]
    evaluated = any("eval_loss" in row for row in rows)
    table = Table("round", "global loss", "local loss", "lr", "clients", "left out", "tokens/s", "round s",
                  *(["epsilon"] if private else []), *(EVAL_COLUMNS if evaluated else []))
    for row in rows:
        missing = row["stragglers"] + row["dropped"]
        table.add_row(str(row["step"]), maybe_number(row["loss"], ".4f"), maybe_number(row["local_loss"], ".4f"),
                      f"{row['lr']:.2e}", ", ".join(row["nodes"]) or "-", ", ".join(missing) or "-",
                      maybe_number(row["tokens_per_s"], ".0f"), f"{row['step_s']:.2f}",
                      *([f"{row['epsilon']:.4g}"] if private else []), *(_eval_cells(row) if evaluated else []))
    return table


def _print_metric(row: dict) -> None:
    epsilon = f", epsilon {row['epsilon']:.4g}" if "epsilon" in row else ""
    if "eval_loss" in row:
        epsilon += (f"; held-out loss {row['eval_loss']:.4f}, perplexity {row['eval_perplexity']:.2f}, accuracy "
                    f"{row['eval_accuracy']:.1%}")
    if "sampled" in row:  # a federated round: each client's loss on its own data
        clients = ", ".join(f"{name} {c['loss_before']:.4f}->{c['loss_after']:.4f}" for name, c in row["nodes"].items())
        out.print(f"round {row['step']}: global loss {maybe_number(row['loss'], '.4f')} ({clients}); "
                  f"{maybe_number(row['tokens_per_s'], '.0f')} tok/s{epsilon}")
        return
    sent = f", {human_bytes(row['bytes_sent'])} sent" if "bytes_sent" in row else ""
    kind = f"outer step {row['step']} ({row['inner_steps']} inner)" if "inner_steps" in row else f"step {row['step']}"
    out.print(f"{kind}: loss {maybe_number(row['loss'], '.4f')} lr {row['lr']:.2e} grad norm "
              f"{row['grad_norm']:.3f} {row['tokens_per_s']:.0f} tok/s (compute {row['compute_s']:.2f} s, comm "
              f"{row['comm_s']:.2f} s{sent}{epsilon})")
