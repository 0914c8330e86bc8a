"""``dllmctl bench relays`` and ``bench soak``: the serving path under relays and under load (registered
on the bench app by ``dllmctl.cli``)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from dllmctl.cli.common import JsonOpt, err, fail, human_bytes, load_registry, load_user, local_model, out, print_json


def relays(
    model: Annotated[str, typer.Option("--model", "-m", help="A model in the local store.")],
    relays: Annotated[int, typer.Option(min=1, max=4, help="Relay daemons (runs through 0..N of them).")] = 2,
    new_tokens: Annotated[int, typer.Option(min=4, max=1024)] = 32,
    wan_delay_ms: Annotated[Optional[float], typer.Option(
        min=0.0, max=1000.0, help="Also run with every node behind a delay proxy (one way, ms).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Per-token latency through 0..N relays on temporary local daemons (two stages), on loopback and
    with --wan-delay-ms through delayed links: ms added per token and per relay, tokens checked equal."""
    from dllmd.net.client import CallError
    from dllmctl.bench import relays as relay_bench
    from dllmctl.cluster.local import LocalClusterError
    from dllmctl.inference.generation import CLUSTER_ERRORS, GenerationError

    directory, _ = local_model(model)
    try:
        with err.status(f"benchmarking relays on temporary daemons ({relays} relay(s), 2 stages)..."):
            report = relay_bench.run(load_user(), model, directory, relays, new_tokens, wan_delay_ms)
    except (GenerationError, CallError, LocalClusterError, *CLUSTER_ERRORS) as exc:
        fail(str(exc))
    if as_json:
        print_json(report)
        return
    table = Table("links", "relays", "ms/token", "added ms", "added ms/relay", "tokens = direct")
    for links in ("loopback", "wan"):
        for row in report.get(links, {}).get("runs", []):
            table.add_row(links, str(row["relays"]), f"{row['per_token_ms']:.2f}", f"{row.get('added_ms', 0):.2f}",
                          f"{row.get('added_ms_per_relay', 0):.2f}", "yes" if row["identical_to_direct"] else "[red]no[/red]")
    out.print(table)
    if "wan" in report:
        out.print(f"WAN links: {report['wan']['delay_ms_one_way']} ms one way "
                  f"(measured {report['wan']['measured_link_delay_ms']} ms)")


def soak(
    model: Annotated[str, typer.Option("--model", "-m", help="A deployed model.")],
    clients: Annotated[int, typer.Option(min=1, max=256, help="Concurrent OpenAI clients.")] = 8,
    requests: Annotated[int, typer.Option(min=1, max=100_000, help="Chat completions each client sends.")] = 100,
    max_tokens: Annotated[int, typer.Option(min=1, max=4096)] = 16,
    as_json: JsonOpt = False,
) -> None:
    """CLIENTS x REQUESTS chat completions through the OpenAI API against the registered nodes, after a
    warm-up round of the same shape: errors (target 0), latency, every node's RSS growth (target <= 10%)
    and the sessions left open after (target 0)."""
    from dllmctl.bench import soak as soak_bench

    local_model(model)
    import importlib.util

    if importlib.util.find_spec("uvicorn") is None:
        fail("bench soak serves the OpenAI API: it needs the 'api' extra (pip install 'dllm[api]')")
    with err.status("soaking...") as status:
        report = soak_bench.run(load_user(), load_registry().select(None), model, clients, requests, max_tokens,
                                progress=lambda message: status.update(f"soaking: {message}"))
    if as_json:
        print_json(report)
        return
    m = report["measured"]
    out.print(f"{m['requests']} requests ({clients} clients), {m['errors']} errors {m['statuses']}, "
              f"p50 {m['latency_p50_ms']} ms, p95 {m['latency_p95_ms']} ms, {m['tokens_per_second']} tok/s")
    table = Table("node", "RSS before", "RSS after", "growth")
    for name, r in report["rss"].items():
        table.add_row(name, human_bytes(r["before"]), human_bytes(r["after"]),
                      f"{r['growth'] * 100:+.1f}%" if r["growth"] is not None else "-")
    out.print(table)
    verdict = "[green]meets[/green]" if report["meets_target"] else "[red]misses[/red]"
    out.print(f"sessions left open: {report['sessions_left']}; {verdict} the targets (0 errors, RSS growth <= "
              f"{report['rss_growth_target'] * 100:.0f}%, no session left)")
