"""``dllmctl bench``: measured figures against a baseline taken in the same run."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Iterator, Optional

import typer
from rich.table import Table

from dllmctl.cli.common import ActivationBlockOpt, ActivationsOpt, JsonOpt, err, fail, human_bytes, load_registry, load_user, local_model, out, print_json

if TYPE_CHECKING:
    from dllmd.net.identity import Identity
    from dllmctl.cluster.registry import NodeEntry

app = typer.Typer(help="Benchmarks (figures and ratios against a same-run baseline).", no_args_is_help=True)


@contextmanager
def target_node(user: Identity, name: str | None) -> Iterator[NodeEntry]:
    """The named node, the first registered one, or else a temporary local daemon (stopped after)."""
    from dllmctl.cluster import local as local_cluster
    from dllmctl.cluster.registry import NodeEntry, Registry, RegistryError

    registry = load_registry()
    if name or registry.nodes:
        try:
            yield registry.select([name] if name else None)[0]
        except RegistryError as exc:
            fail(str(exc))
        return
    with tempfile.TemporaryDirectory(prefix="dllm-bench-") as tmp:
        scratch = Registry(Path(tmp) / "cluster.toml")
        err.print("no nodes registered: starting a temporary local daemon")
        node = local_cluster.up(1, Path(tmp), user, scratch)[0]
        try:
            yield NodeEntry(node.name, node.address, node.public_key)
        finally:
            local_cluster.down(Path(tmp), scratch)


@app.command("ping")
def ping(
    node: Annotated[Optional[str], typer.Option(help="Registered node to measure (default: the first).")] = None,
    count: Annotated[int, typer.Option(min=10, max=1_000_000)] = 2000,
    as_json: JsonOpt = False,
) -> None:
    """Median round trip of a small message and of a [1, 1, 576] fp32 tensor echo, encrypted."""
    from dllmd.net.client import CallError
    from dllmctl.bench import ping as ping_bench

    user = load_user()
    with target_node(user, node) as entry:
        try:
            result = ping_bench.run(user, entry, count=count)
        except CallError as exc:
            fail(str(exc))
    if as_json:
        print_json(result)
        return
    table = Table("round trip", "median us", "p90 us", "p99 us", "raw zmq median us", "ratio")
    for key in ("ping", "tensor_echo"):
        m, b = result["encrypted"][key], result["baseline_raw_zmq"][key]
        table.add_row(key, f"{m['median_us']:.1f}", f"{m['p90_us']:.1f}", f"{m['p99_us']:.1f}",
                      f"{b['median_us']:.1f}", f"{result['ratio_median'][key]:.2f}x")
    out.print(table)
    verdict = "[green]meets[/green]" if result["meets_target"] else "[red]misses[/red]"
    out.print(f"tensor echo {verdict} the {result['target_tensor_echo_median_us']} us target ({result['node']}, {count} calls)")


@app.command("infer")
def infer(
    model: Annotated[str, typer.Option("--model", "-m", help="A deployed model.")],
    new_tokens: Annotated[int, typer.Option(min=2, max=4096)] = 64,
    compare_local: Annotated[bool, typer.Option("--compare-local", help="Also run transformers' generate here.")] = False,
    sessions: Annotated[Optional[str], typer.Option(
        help="Concurrent sessions to compare, e.g. '1,4,16': aggregate tokens/s and stage utilization.")] = None,
    parallelism: Annotated[str, typer.Option(help=(
        "pipeline, model, tensor or hybrid: the deployed layout to run through (tensor and hybrid also report "
        "each member's reductions against a raw zmq exchange of the same bytes)."))] = "pipeline",
    wan_delay_ms: Annotated[Optional[float], typer.Option(
        min=0.0, max=1000.0, help="Run one session with every link behind a delay proxy (one way, ms).")] = None,
    failover_runs: Annotated[int, typer.Option(
        min=0, max=100, help="Kill a stage of the local cluster mid-generation this many times (needs replicas).")] = 0,
    cluster: Annotated[Optional[Path], typer.Option(
        "--dir", help="The local cluster's directory (for --failover-runs).")] = None,
    activations: ActivationsOpt = "fp32",
    activation_block: ActivationBlockOpt = 64,
    prefix_cache: Annotated[bool, typer.Option(
        "--prefix-cache", help="Two requests sharing a long system prompt: both times to first token and their "
                               "ratio (the second starts from the stages' cached prefix).")] = False,
    prefix_tokens: Annotated[int, typer.Option(min=16, max=32768, help="Tokens the two requests share.")] = 200,
    as_json: JsonOpt = False,
) -> None:
    """Decode tokens/s, time to first token, per-token split into stage compute and transfer; with
    --sessions, --wan-delay-ms, --failover-runs or --prefix-cache: concurrency, WAN latency, failover
    stall or the prefix cache's time to first token."""
    import json as _json

    from dllmd.net.client import CallError
    from dllmctl.bench import infer as infer_bench
    from dllmctl.bench import pipeline as pipeline_bench
    from dllmctl.bench import prefix as prefix_bench
    from dllmctl.cluster import local as local_cluster
    from dllmctl.inference.session import PARALLELISMS
    from dllmctl.placement.routing import RouteError
    from dllmctl.inference.generation import GenerationError
    from dllmctl.inference.tokens import encode_prompt, load_tokenizer

    from dllmd.net.codec import CodecError, HopCodec

    if parallelism not in PARALLELISMS:
        fail(f"--parallelism must be one of {', '.join(PARALLELISMS)}")
    try:
        hops = HopCodec(activations, activation_block)
    except CodecError as exc:
        fail(str(exc))
    counts = _session_counts(sessions) if sessions else []
    user, registry = load_user(), load_registry()
    directory, _ = local_model(model)
    num_layers = _json.loads((directory / "config.json").read_text())["num_hidden_layers"]
    nodes = registry.select(None)
    report: dict = {"model": model}
    try:
        with err.status("benchmarking..."):
            if not (counts or wan_delay_ms is not None or failover_runs or prefix_cache):
                report.update(infer_bench.run(user, nodes, directory, model, num_layers, new_tokens, compare_local,
                                              parallelism, hops))
            tokenizer = load_tokenizer(directory)
            prompt = encode_prompt(tokenizer, infer_bench.BENCH_PROMPT)
            if counts:
                report["sessions"] = pipeline_bench.sessions_sweep(user, nodes, model, num_layers, tokenizer, counts,
                                                                   new_tokens, parallelism)
            if wan_delay_ms is not None:
                report["wan"] = pipeline_bench.wan(user, nodes, model, num_layers, prompt, new_tokens, wan_delay_ms)
            if failover_runs:
                report["failover"] = pipeline_bench.failover(user, registry, local_cluster.resolve_dir(cluster), directory, model,
                                                              num_layers, prompt, failover_runs)
            if prefix_cache:
                report["prefix_cache"] = prefix_bench.prefix_cache(user, nodes, model, prefix_tokens,
                                                                   parallelism=parallelism)
    except (CallError, RouteError, local_cluster.LocalClusterError) as exc:
        fail(str(exc))
    except GenerationError as exc:
        fail(str(exc))
    if as_json:
        print_json(report)
        return
    if "distributed" in report:
        _print_single(report)
    if "sessions" in report:
        _print_sessions(report["sessions"])
    if "wan" in report:
        w = report["wan"]
        verdict = "[green]meets[/green]" if w["meets_target"] else "[red]misses[/red]"
        out.print(f"WAN {w['delay_ms_one_way']:g} ms/link, {w['stages']} stages: {w['per_token_ms']:.1f} ms/token "
                  f"(compute {w['compute_ms']:.1f}); bound {w['bound_ms']:.1f} ms: {verdict}")
    if "prefix_cache" in report:
        _print_prefix(report["prefix_cache"])
    if "failover" in report:
        f = report["failover"]
        out.print(f"failover: {f['identical_runs']}/{f['runs']} runs identical to the fault-free output; stall "
                  f"(kill to next token) median {f['stall_ms_median']:.0f} ms, max {f['stall_ms_max']:.0f} ms")


def _print_prefix(p: dict) -> None:
    verdict = "[green]meets[/green]" if p["meets_target"] else "[red]misses[/red]"
    out.print(f"prefix cache: {p['shared_prefix_tokens']} shared prompt tokens; time to first token "
              f"{p['first_ttft_ms']:.0f} ms, then {p['second_ttft_ms']:.0f} ms with {p['second_cached_tokens']} "
              f"tokens cached ({p['second_uncached_ttft_ms']:.0f} ms without): ratio {p['ratio']} {verdict} the "
              f"{p['target_ratio']} target; tokens identical: {'yes' if p['tokens_identical'] else '[red]no[/red]'}")


def _session_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        fail(f"--sessions takes counts like '1,4,16', not {text!r}")
    if not counts or any(c < 1 or c > 256 for c in counts):
        fail("--sessions counts must be between 1 and 256")
    return counts


def _print_sessions(sweep: dict) -> None:
    table = Table("sessions", "aggregate tok/s", "vs first", "decode tok/s", "vs first", "TTFT ms",
                  "busy per node", "mean batch per node")
    for run in sweep["runs"]:
        table.add_row(str(run["sessions"]), f"{run['aggregate_tokens_per_second']:.2f}",
                      f"{run['aggregate_ratio_to_first']}x", f"{run['decode_tokens_per_second']:.2f}",
                      f"{run['decode_ratio_to_first']}x",
                      f"{run['time_to_first_token_ms']:.0f}",
                      " ".join(f"{u:.0%}" for u in run["utilization"].values()),
                      " ".join(f"{b:g}" for b in run["mean_batch"].values()))
    out.print(table)


def _print_single(report: dict) -> None:
    d = report["distributed"]
    table = Table("figure", "distributed", "local generate", "ratio")
    local = report.get("local", {})
    table.add_row("decode tokens/s", f"{d['tokens_per_second']:.2f}", f"{local.get('tokens_per_second', '-')}",
                  f"{report.get('ratio_tokens_per_second', '-')}")
    table.add_row("time to first token ms", f"{d['time_to_first_token_ms']:.1f}", f"{local.get('time_to_first_token_ms', '-')}", "")
    table.add_row("per-token ms (median)", f"{d['per_token_ms']:.2f}", "", "")
    table.add_row("compute ms per stage", ", ".join(f"{c:.2f}" for c in d["compute_ms_per_stage"]), "", "")
    table.add_row("transfer + overhead ms", f"{d['transfer_and_overhead_ms']:.2f} ({d['overhead_ms_per_message']:.3f}/message)", "", "")
    table.add_row("bytes per token per hop", ", ".join(map(str, d["bytes_per_token_per_hop"])), "", "")
    for name, rss in d["node_rss_bytes"].items():
        share = report.get("node_rss_share_of_local_model", {}).get(name)
        table.add_row(f"RSS {name}", human_bytes(rss), human_bytes(local.get("process_rss_bytes")) if local else "",
                      f"{share}" if share is not None else "")
    for name, r in d.get("reductions", {}).items():
        table.add_row(f"reductions {name} ({r['group']}#{r['rank']})",
                      f"{r['reductions_per_token']:g}/token, {r['ms_per_reduction']:.3f} ms each "
                      f"(blocked in receive {r['waiting_for_members_ms_per_reduction']:.3f}, send and sum "
                      f"{r['transfer_ms_per_reduction']:.3f}); {human_bytes(r['bytes_sent_per_token'])}/token sent",
                      f"raw exchange {report.get('raw_zmq_exchange_ms', '-')} ms", f"{r.get('ratio_to_raw_exchange', '-')}")
    out.print(table)
    if "tokens_identical" in report:
        out.print("tokens identical to local generate: " + ("[green]yes[/green]" if report["tokens_identical"] else "[red]no[/red]"))


@app.command("relays")
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


@app.command("soak")
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


@app.command("shard-data")
def shard_data(
    model: Annotated[str, typer.Option("--model", "-m", help="The model whose tokenizer to use.")],
    source: Annotated[Optional[str], typer.Option(
        help="A directory of code to shard (default: this Python's standard library).")] = None,
    nodes: Annotated[int, typer.Option(min=1, max=16, help="Temporary local nodes to shard onto.")] = 4,
    strategies: Annotated[Optional[str], typer.Option(help="Comma-separated strategies (default: all).")] = None,
    seq_len: Annotated[int, typer.Option(min=8, max=1_048_576)] = 2048,
    replicas: Annotated[int, typer.Option(min=1, max=16, help="Copies per sample for dht.")] = 2,
    as_json: JsonOpt = False,
) -> None:
    """Shard real code (*.py) with each strategy onto temporary local nodes: tokens/s and skew."""
    from dllmctl.bench import shard as shard_bench
    from dllmctl.cli.common import RichShardProgress
    from dllmctl.cluster.local import LocalClusterError
    from dllmctl.data.push import PushError
    from dllmd.data import DataError
    from dllmd.net.client import CallError

    try:
        chosen = shard_bench.parse_strategies(strategies)
    except ValueError as exc:
        fail(str(exc))
    if replicas > nodes:
        fail(f"--replicas {replicas} needs at least as many --nodes")
    directory, _ = local_model(model)
    progress = RichShardProgress(transient=True)
    try:
        report = shard_bench.run(load_user(), model, directory, source or shard_bench.stdlib_source(), nodes, chosen,
                                 seq_len=seq_len, replicas=replicas, progress=progress)
    except (DataError, PushError, CallError, LocalClusterError, OSError) as exc:
        progress.stop()
        fail(str(exc))
    progress.stop()
    if as_json:
        print_json(report)
        return
    out.print(f"{report['source']}: {report['files']} files, {report['tokens']:,} tokens ({report['model']}); "
              f"read + tokenize {report['read_tokenize_s']:.2f} s = "
              f"{report['baseline_tokenize_tokens_per_second']:,.0f} tokens/s (baseline)")
    table = Table("strategy", "tokens/s end to end", "vs tokenize only", "place s", "pushed",
                  "tokens per node (min - max)", "skew")
    for row in report["strategies"]:
        name = row["strategy"] + (f" (R={row['replicas']})" if row["replicas"] > 1 else "")
        table.add_row(name, f"{row['tokens_per_second']:,.0f}", f"{row['ratio_to_tokenize_only']:.2f}x",
                      f"{row['place_s']:.2f}", human_bytes(row["bytes_pushed"]),
                      f"{min(row['tokens_per_node']):,} - {max(row['tokens_per_node']):,}", f"{row['skew']:.3f}")
    out.print(table)


@app.command("plan")
def plan(
    nodes: Annotated[int, typer.Option(min=2, max=100_000, help="Simulated nodes.")] = 1000,
    churn: Annotated[int, typer.Option(min=0, max=100_000, help="Joins and leaves after the first plan.")] = 100,
    replicas: Annotated[int, typer.Option(min=1, max=10_000, help="Chains at least (more where they pay).")] = 1,
    seed: Annotated[int, typer.Option(help="Seeds the nodes and the events.")] = 0,
    correlation: Annotated[float, typer.Option(
        min=-1.0, max=1.0, help="Between a node's log memory and log GFLOP/s (0: drawn apart).")] = 0.0,
    as_json: JsonOpt = False,
) -> None:
    """The swarm planner in simulation (no daemons): a Llama-70B-shaped model over drawn nodes, then
    churn; the layout's throughput against an upper bound, and each change's moved layers against
    the fewest it needs."""
    from dllmctl.cli.common import StageProgress
    from dllmctl.placement.layout import PlanError
    from dllmctl.placement.simulation import SwarmSpec, simulate

    progress = StageProgress(transient=True)
    try:
        report = simulate(SwarmSpec(nodes=nodes, seed=seed, correlation=correlation), churn, replicas,
                          progress=progress).to_json()
    except PlanError as exc:
        fail(str(exc))
    finally:
        progress.stop()
    if as_json:
        print_json(report)
        return
    first, change = report["initial"], report["churn"]
    table = Table("figure", "value")
    table.add_row("chains (at least --replicas)", f"{first['chains']} (at least {report['min_replicas']})")
    table.add_row("fraction of the bound, planned", f"{first['fraction_of_bound']:.3f} in {first['plan_seconds']:.2f} s")
    table.add_row(f"plan_layout with exactly {report['min_replicas']} chain(s)",
                  f"{first['baseline_plan_layout_fraction']:.3f}")
    table.add_row("per-token latency of a chain (median, max)",
                  f"{first['hop_latency_ms'].get('median', 0):.0f} / {first['hop_latency_ms'].get('max', 0):.0f} ms")
    table.add_row("churn events (joins, leaves of serving nodes)",
                  f"{change['events']} ({change['joins']}, {change['serving_leaves']})")
    table.add_row("fraction of the bound, lowest / last", f"{change['min_fraction_of_bound']:.3f} / "
                  f"{change['final_fraction_of_bound']:.3f}")
    table.add_row("moved layers / fewest (lower bound)", f"{change['moved_layers']} / {change['fewest_layers']}")
    table.add_row("worst change: moved over fewest", f"{change['worst_moves_over_fewest']:.2f}")
    table.add_row("changes over twice the fewest", str(change["changes_over_twice_fewest"]))
    table.add_row("slowest rebalance", f"{change['max_rebalance_seconds']:.2f} s")
    out.print(table)
    verdict = "[green]meets[/green]" if report["meets_target"] else "[red]misses[/red]"
    out.print(f"{verdict} the target: at least {report['target_fraction']:.0%} of the bound after every change, "
              f"each moving at most twice the fewest layers")


@app.command("allreduce")
def allreduce(
    size: Annotated[str, typer.Option(
        help="Buffer to sum: 64MB (10^6), 512KiB (2^10), 1GB; float32, at most 2 GiB.")] = "64MB",
    nodes: Annotated[int, typer.Option(min=2, max=16, help="Temporary local nodes (ring members, gloo ranks).")] = 4,
    iterations: Annotated[int, typer.Option(
        min=1, max=100, help="Timed all-reduces per mode and round, after one warm-up.")] = 10,
    rounds: Annotated[int, typer.Option(
        min=1, max=20, help="Rounds in which the modes take turns (evens out load from elsewhere).")] = 2,
    bucket: Annotated[Optional[str], typer.Option(
        help="The ring's bucket size (default: the ring's own, as training uses: 4MiB encrypted, 16MiB plaintext).")] = None,
    algorithm: Annotated[str, typer.Option(
        help="ring, tree, or auto (what training takes for the size: the tree for small buffers).")] = "auto",
    sweep: Annotated[Optional[str], typer.Option(
        help="Sizes to compare the ring and the tree (encrypted) on, e.g. 4KB,64KB,1MB,16MB.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Our all-reduce, encrypted (AES-GCM links) and plaintext, against torch.distributed gloo on temporary
    local nodes: median time, bus bandwidth and the ratio to gloo (targets 0.6x and 0.9x); with --sweep,
    the ring against the tree by size."""
    from dllmctl.bench import allreduce as allreduce_bench
    from dllmctl.cluster.local import LocalClusterError
    from dllmctl.cluster.registry import RegistryError
    from dllmd.net.client import CallError

    try:
        nbytes = allreduce_bench.parse_size(size)
        bucket_bytes = allreduce_bench.parse_size(bucket, "--bucket", lo=4096, hi=256 * 2**20) if bucket else 0
        sizes = [allreduce_bench.parse_size(s.strip(), "--sweep") for s in sweep.split(",")] if sweep else []
        if algorithm not in allreduce_bench.ALGORITHMS:
            raise ValueError(f"--algorithm is one of {', '.join(allreduce_bench.ALGORITHMS)}, not {algorithm!r}")
    except ValueError as exc:
        fail(str(exc))
    user = load_user()
    try:
        with err.status("benchmarking...") as status:
            report = allreduce_bench.run(user, nodes, nbytes, iterations, rounds, bucket_bytes,
                                         progress=lambda text: status.update(text), algorithm=algorithm, sweep=sizes)
    except (allreduce_bench.BenchError, CallError, LocalClusterError, RegistryError, OSError) as exc:
        fail(str(exc))
    if as_json:
        print_json(report)
        return
    out.print(f"all-reduce of {human_bytes(report['bytes'])} ({report['elements']:,} float32) over {report['nodes']} "
              f"local nodes, {report['rounds']} x {report['iterations']} iterations, {report['cpu_count']} cores, "
              f"{report['omp_threads_per_process']} OpenMP thread(s) per process")
    table = Table("mode", "algorithm", "bucket", "median ms", "bus GB/s", "vs gloo", "target", "met")
    for key, label in (("gloo", "gloo (baseline)"), ("encrypted", "ours, encrypted (AES-GCM)"),
                       ("plaintext", "ours, plaintext")):
        row = report[key]
        target = f">= {row['target_ratio']}x" if "target_ratio" in row else ""
        met = ("[green]yes[/green]" if row["meets_target"] else "[red]no[/red]") if "meets_target" in row else ""
        bucket_text = human_bytes(row["bucket_bytes"]) if "bucket_bytes" in row and row["algorithm"] == "ring" else ""
        table.add_row(label, row.get("algorithm", ""), bucket_text, f"{row['median_ms']:.1f}", f"{row['bus_gb_per_s']:.3f}",
                      f"{row['ratio_to_gloo']:.2f}x", target, met)
    out.print(table)
    if report["sweep"]:
        sweep_table = Table("size", "gloo ms", "ring ms", "tree ms", "faster", "auto takes")
        for row in report["sweep"]:
            sweep_table.add_row(human_bytes(row["bytes"]), f"{row['gloo']['median_ms']:.2f}",
                                f"{row['ring']['median_ms']:.2f}", f"{row['tree']['median_ms']:.2f}", row["faster"],
                                row["auto"])
        out.print(sweep_table)
        out.print(f"auto takes the tree up to {human_bytes(report['tree_max_bytes'])} (encrypted links)")
    out.print("bus bandwidth = 2(n-1)/n x bytes / time; an iteration's time is its slowest rank's")


@app.command("train")
def train(
    model: Annotated[str, typer.Option("--model", "-m", help="A model in the local store.")],
    nodes: Annotated[int, typer.Option(min=1, max=16, help="Temporary local nodes (data parallelism).")] = 2,
    steps: Annotated[Optional[int], typer.Option(min=2, max=100_000, help="Steps (default 6; with --modes, 10 "
                                                                         "outer steps).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=4096)] = 8,
    micro_batch_size: Annotated[int, typer.Option(min=1, max=4096)] = 2,
    seq_len: Annotated[int, typer.Option(min=16, max=65536)] = 256,
    source: Annotated[Optional[str], typer.Option(help="Code to train on (default: parts of the stdlib).")] = None,
    parallelism: Annotated[str, typer.Option(help="data, model (a pipeline), hybrid or federated.")] = "data",
    schedule: Annotated[str, typer.Option(help="Pipeline schedule: 1f1b or gpipe.")] = "1f1b",
    pp: Annotated[Optional[int], typer.Option("--pp", min=2, max=16, help="Stages (default: 2).")] = None,
    dp: Annotated[Optional[int], typer.Option("--dp", min=1, max=16, help="Replicas (hybrid; default 2).")] = None,
    stage_layers: Annotated[Optional[str], typer.Option(help="Layers per stage, e.g. 16,14 (default: planned).")] = None,
    rounds: Annotated[int, typer.Option(min=1, max=10_000, help="Federated: rounds.")] = 5,
    local_steps: Annotated[int, typer.Option(min=1, max=10_000, help="Federated: local steps per round.")] = 4,
    modes: Annotated[Optional[str], typer.Option(help="Compare ways to communicate, e.g. sync,diloco+int8: sync, "
                                                      "diloco or overlap, each optionally +none/fp16/int8/"
                                                      "powersgd:R (data parallelism).")] = None,
    sync_every: Annotated[int, typer.Option(min=1, max=100_000, help="--modes: DiLoCo's inner steps per outer "
                                                                      "step.")] = 30,
    compress: Annotated[str, typer.Option(help="--modes: the compression of modes that name none.")] = "none",
    lr: Annotated[Optional[float], typer.Option(min=0.0, max=10.0, help="Learning rate (default 1e-5; 1e-3 "
                                                                         "with --modes).")] = None,
    warmup_steps: Annotated[int, typer.Option(min=0, help="--modes: linear warmup steps.")] = 0,
    outer_lr: Annotated[float, typer.Option(min=0.0, max=100.0)] = 0.7,
    outer_momentum: Annotated[float, typer.Option(min=0.0, max=0.9999)] = 0.9,
    wan_steps: Annotated[int, typer.Option(min=0, max=10_000, help="--modes: steps of each mode's timed run "
                                                                    "through WAN proxies (0: none; DiLoCo: whole "
                                                                    "outer steps).")] = 3,
    wan_delay_ms: Annotated[float, typer.Option(min=0.0, max=10_000.0, help="One-way delay of each WAN link.")] = 20.0,
    wan_mbit: Annotated[float, typer.Option(min=0.01, max=100_000.0, help="Each WAN link's rate, each way.")] = 100.0,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tuning on temporary local nodes (data-parallel, a pipeline or hybrid) vs the same steps in one
    process; for pipelines also the bubble, the bytes between stages and each stage's training state.
    With --modes: each way of communicating trains the same model on the same tokens; bytes sent,
    held-out loss, tokens/s, and a timed run through WAN links (targets: DiLoCo with int8 >= 100x fewer
    bytes than sync, held-out loss within 3%)."""
    from dllmctl.bench import train as train_bench
    from dllmctl.training.jobs import TrainError, check_parallelism

    if batch_size % micro_batch_size:
        fail("--batch-size must be divisible by --micro-batch-size")
    try:
        check_parallelism(parallelism)
        layers = [int(n) for n in stage_layers.split(",")] if stage_layers else None
    except TrainError as exc:
        fail(str(exc))
    except ValueError:
        fail(f"--stage-layers takes layer counts separated by commas, e.g. 16,14; got {stage_layers!r}")
    if modes is not None:
        _train_modes(model, nodes, steps, batch_size, micro_batch_size, seq_len, source, parallelism, modes,
                     sync_every, compress, lr, warmup_steps, outer_lr, outer_momentum, wan_steps, wan_delay_ms,
                     wan_mbit, as_json)
        return
    steps = steps or 6
    if parallelism == "model":
        pp = pp or 2
    directory, _ = local_model(model)
    if parallelism == "federated":
        _bench_federated(model, directory, max(nodes, 3), rounds, local_steps, batch_size, micro_batch_size, seq_len,
                         as_json)
        return
    count = train_bench.node_count(parallelism, nodes, dp, pp)
    try:
        with err.status(f"training {steps} steps on {count} temporary node(s), then in one process..."):
            report = train_bench.run(load_user(), model, directory, nodes, steps, batch_size, micro_batch_size,
                                     seq_len, source=source, lr=lr or 1e-5, parallelism=parallelism,
                                     schedule=schedule, dp=dp, pp=pp, stage_layers=layers)
    except _training_bench_errors() as exc:
        fail(str(exc))
    if as_json:
        print_json(report)
        return
    d, local = report["distributed"], report["local"]
    table = Table("", f"{count} nodes ({parallelism})", "one process")
    table.add_row("tokens/s", f"{d['tokens_per_second']:,.0f}", f"{local['tokens_per_second']:,.0f}")
    table.add_row("step s", f"{d['step_s']:.2f}", f"{local['step_s']:.2f}")
    table.add_row("compute / comm s", f"{d['compute_s']:.2f} / {d['comm_s']:.2f}", "")
    table.add_row("share communicating", f"{d['comm_share']:.1%}", "")
    table.add_row("final loss", f"{d['loss'][-1]:.4f}", f"{local['loss'][-1]:.4f}")
    table.add_row("peak RSS", ", ".join(human_bytes(v) for v in d["peak_rss_bytes"].values()),
                  human_bytes(local["peak_rss_bytes"]))
    out.print(table)
    out.print(f"{report['model']}: {report['tokens_per_step']} tokens per step (batch {report['batch_size']} x "
              f"{report['seq_len']}); ratio {report['ratio_tokens_per_second']}x")
    if "pipeline" in report:
        _print_pipeline(report["pipeline"])


def _train_modes(model: str, nodes: int, steps: int | None, batch_size: int, micro_batch_size: int, seq_len: int,
                 source: str | None, parallelism: str, modes: str, sync_every: int, compress: str, lr: float | None,
                 warmup_steps: int, outer_lr: float, outer_momentum: float, wan_steps: int, wan_delay_ms: float,
                 wan_mbit: float, as_json: bool) -> None:
    from dllmctl.bench import lowcomm
    from dllmctl.training.jobs import TrainError

    if parallelism != "data":
        fail("--modes compares data-parallel jobs: DiLoCo, compression and overlap are built for --parallelism data")
    if not 2 <= nodes <= 4:
        fail("--modes runs on 2 to 4 temporary nodes")
    try:
        chosen = lowcomm.parse_modes(modes, sync_every, compress)
    except TrainError as exc:
        fail(str(exc))
    steps = steps or 10 * sync_every
    directory, _ = local_model(model)
    try:
        with err.status("comparing modes...") as status:
            report = lowcomm.run(load_user(), model, directory, chosen, nodes, steps, batch_size, micro_batch_size,
                                 seq_len, lr or 1e-3, warmup_steps, outer_lr, outer_momentum, wan_steps, wan_delay_ms,
                                 wan_mbit, source=source, progress=lambda m: status.update(m + "..."))
    except _training_bench_errors() as exc:
        fail(str(exc))
    if as_json:
        print_json(report)
        return
    table = Table("mode", "bytes sent", "fewer than first", "held-out loss", "vs first", "tokens/s",
                  *(["WAN s/step", "WAN tokens/s"] if report["wan"] else []), "target")
    for m in report["modes"]:
        target = {True: "[green]met[/green]", False: "[red]not met[/red]"}.get(m.get("meets_target"), "")
        wan = [f"{m['wan']['seconds_per_step']:.2f}", f"{m['wan']['tokens_per_second']:,.0f}"] if m["wan"] else []
        table.add_row(m["mode"], human_bytes(m["bytes_sent"]), f"{m['bytes_ratio']:,.1f}x", f"{m['final_loss']:.4f}",
                      f"{m['loss_vs_first']:+.1%}", f"{m['tokens_per_second']:,.0f}", *wan, target)
    out.print(table)
    wan = report["wan"]
    out.print(f"{report['model']}: {report['steps']} steps of {report['batch_size']} x {report['seq_len']} tokens on "
              f"{report['nodes']} nodes" + (f"; WAN: {wan['mbit_per_s']:g} Mbit/s, {wan['delay_ms_one_way']:g} ms "
                                           f"each way" if wan else "") +
              "; target: DiLoCo with int8 sends >= 100x fewer bytes than the first mode, held-out loss within 3%")


def _print_pipeline(p: dict) -> None:
    out.print(f"{p['stages']} stages x {p['replicas']} replica(s), {p['schedule']}, {p['micro_batches']} micro-batches "
              f"per replica: bubble {p['bubble_measured']:.1%} measured, {p['bubble_theoretical']:.1%} in theory; "
              f"{human_bytes(p['bytes_between_stages_per_step'])} between stages per step")
    one = p["one_process"]
    table = Table("stage", "layers", "params", "saved activations", "training state", "vs one process", "peak RSS",
                  "compute s", "bubble")
    for s in p["per_stage"]:
        table.add_row(str(s["stage"]), f"{s['layers'][0]}-{s['layers'][1] - 1}", f"{s['params'] / 1e6:.1f}M",
                      human_bytes(s["activation_bytes"]), human_bytes(s["training_state_bytes"]),
                      f"{s['ratio_to_one_process']:.2f}x", human_bytes(s["peak_rss_bytes"]), f"{s['compute_s']:.2f}",
                      f"{s['bubble']:.1%}")
    table.add_row("one process", "all", f"{one['params'] / 1e6:.1f}M", human_bytes(one["activation_bytes"]),
                  human_bytes(one["training_state_bytes"]), "1.00x", "", "", "")
    out.print(table)
    met = "[green]met[/green]" if p["meets_state_target"] else "[red]not met[/red]"
    out.print(f"target: each stage <= {p['state_ratio_target']}x the one process's training state "
              f"({'tied' if p['tied'] else 'untied'} embeddings): {met}")


@app.command("cli")
def cli(
    nodes: Annotated[int, typer.Option(min=1, max=16, help="Temporary local nodes the listings ask.")] = 3,
    runs: Annotated[int, typer.Option(min=1, max=20, help="Runs per command; the best counts.")] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Wall time of 'dllmctl --help', 'nodes list' and 'jobs list' as fresh processes (targets 0.5 s, 1 s, 1 s)."""
    from dllmctl.bench import cli as cli_bench
    from dllmctl.cluster.local import LocalClusterError

    try:
        with err.status(f"timing commands against {nodes} temporary local nodes..."):
            report = cli_bench.run(nodes, runs)
    except (LocalClusterError, RuntimeError, OSError) as exc:
        fail(str(exc))
    if as_json:
        print_json(report)
        return
    table = Table("command", "best s", "target s", "met", "over interpreter start s")
    for label, row in report["commands"].items():
        table.add_row(f"dllmctl {label}", f"{row['best_s']:.3f}", f"{row['target_s']:.1f}",
                      "[green]yes[/green]" if row["meets_target"] else "[red]no[/red]",
                      f"{row['over_interpreter_start_s']:.3f}")
    out.print(table)
    out.print(f"best of {report['runs']} runs; the interpreter alone starts in {report['interpreter_start_s']:.3f} s")


@app.command("quant")
def quant(
    model: Annotated[str, typer.Option("--model", "-m", help="The unquantized model (deployed, for quality).")],
    text: Annotated[Path, typer.Option("--text", help="A held-out UTF-8 text to score.", exists=True,
                                       dir_okay=False, readable=True)],
    variant: Annotated[Optional[list[str]], typer.Option(
        help="A quantized import of the same model, deployed too (repeat; default MODEL-int8 and MODEL-int4).")] = None,
    layers: Annotated[Optional[str], typer.Option(
        help="START:END, the middle span whose memory is compared (default: the middle two thirds).")] = None,
    max_tokens: Annotated[int, typer.Option(min=2, help="Score the text's first tokens.")] = 2048,
    window: Annotated[int, typer.Option(min=2, max=512)] = 256,
    stride: Annotated[int, typer.Option(min=1, max=511)] = 128,
    prompts: Annotated[int, typer.Option(min=1, max=64, help="Prompts answered greedily by every model.")] = 16,
    new_tokens: Annotated[int, typer.Option(min=1, max=512)] = 32,
    skip_quality: Annotated[bool, typer.Option("--skip-quality", help="Only the span memory (no deployment needed).")
                            ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity, top-1 and greedy agreement of quantized variants against MODEL through the registered
    nodes; parameter bytes and RSS growth of the same middle span on temporary daemons (targets: int8
    perplexity within 2% and memory <= 0.35x, int4 within 10% and <= 0.2x)."""
    import json as _json

    from dllmd.net.client import CallError
    from dllmctl.bench import quant as quant_bench
    from dllmctl.cluster.local import LocalClusterError
    from dllmctl.inference.generation import CLUSTER_ERRORS, GenerationError

    directory, manifest = local_model(model)
    if manifest.quantization is not None:
        fail(f"{model} is itself quantized ({manifest.quantization.method}); pass the unquantized model")
    names = variant or [f"{model}-int8", f"{model}-int4"]
    dirs, methods = {model: directory}, {}
    for name in names:
        dirs[name], other = local_model(name)
        if other.quantization is None:
            fail(f"{name} is not quantized; import it with 'dllmctl model import ... --quantize int8|int4'")
        methods[name] = other.quantization.method
    num_layers = _json.loads((directory / "config.json").read_text())["num_hidden_layers"]
    start, end = _span_bounds(layers, num_layers)
    content = text.read_text(encoding="utf-8", errors="strict")
    report: dict = {"model": model}
    try:
        with err.status("benchmarking quantized spans...") as status:
            def progress(message: str) -> None:
                status.update(message)

            if not skip_quality:
                report["quality"] = quant_bench.quality(
                    load_user(), load_registry().select(None), model, methods, content, window=window, stride=stride,
                    max_tokens=max_tokens, prompts=prompts, new_tokens=new_tokens, progress=progress)
            report["memory"] = quant_bench.span_memory(load_user(), dirs, model, start, end, methods, progress)
    except (GenerationError, CallError, LocalClusterError, *CLUSTER_ERRORS) as exc:
        fail(str(exc))
    if as_json:
        print_json(report)
        return
    _print_quant(report)


def _span_bounds(layers: str | None, num_layers: int) -> tuple[int, int]:
    if layers is None:
        return num_layers // 6, num_layers - num_layers // 6
    try:
        start, end = (int(part) for part in layers.split(":"))
    except ValueError:
        fail(f"--layers takes START:END, like 5:25, not {layers!r}")
    if not 0 <= start < end <= num_layers:
        fail(f"--layers must satisfy 0 <= START < END <= {num_layers}")
    return start, end


def _print_quant(report: dict) -> None:
    def verdict(ok: bool) -> str:
        return "[green]yes[/green]" if ok else "[red]no[/red]"

    m = report["memory"]
    label = {v["model"]: v["method"] for v in m["variants"]} | {m["base"]["model"]: "unquantized"}
    out.print(", ".join(f"{method}: {name}" for name, method in label.items()))
    if "quality" in report:
        q = report["quality"]
        table = Table("weights", "perplexity", "ratio", "target", "met", "top-1 agreement", "greedy identical",
                      "greedy prefix")
        table.add_row("unquantized", f"{q['base']['perplexity']:.3f}", "1", "", "", "", "", "")
        for v in q["variants"]:
            table.add_row(v["method"], f"{v['perplexity']:.3f}", f"{v['perplexity_ratio']:.4f}",
                          f"<= {v['target_ratio']}", verdict(v["meets_target"]), f"{v['top1_agreement']:.1%}",
                          f"{v['greedy']['identical']}/{v['greedy']['prompts']}", f"{v['greedy']['matched_prefix']:.1%}")
        out.print(table)
        if q["variants"]:
            out.print(f"{q['base']['scored']} tokens scored; greedy answers of {q['variants'][0]['greedy_new_tokens']} "
                      "tokens ('greedy prefix': the mean share generated before the first token that differs)")
    table = Table(f"layers {m['layers'][0]}-{m['layers'][1] - 1}", "parameters", "ratio", "RSS growth", "ratio",
                  "beyond parameters", "target", "met")
    table.add_row("unquantized", human_bytes(m["base"]["param_bytes"]), "1", human_bytes(m["base"]["rss_growth_bytes"]),
                  "1", human_bytes(m["base"]["rss_beyond_params_bytes"]), "", "")
    for v in m["variants"]:
        table.add_row(v["method"], human_bytes(v["param_bytes"]), f"{v['param_bytes_ratio']:.3f}",
                      human_bytes(v["rss_growth_bytes"]), f"{v['rss_growth_ratio']:.3f}",
                      human_bytes(v["rss_beyond_params_bytes"]), f"<= {v['target_ratio']}", verdict(v["meets_target"]))
    out.print(table)


def _bench_federated(model: str, directory, clients: int, rounds: int, local_steps: int, batch_size: int,
                     micro_batch_size: int, seq_len: int, as_json: bool) -> None:
    from dllmctl.bench import federated

    try:
        with err.status(f"{rounds} federated rounds on {clients} temporary clients, in clear and with secure "
                        f"aggregation, then data parallelism in one process..."):
            report = federated.run(load_user(), model, directory, clients, rounds, local_steps, batch_size,
                                   micro_batch_size, seq_len)
    except _training_bench_errors() as exc:
        fail(str(exc))
    if as_json:
        print_json(report)
        return
    b, loss = report["bytes_per_round_per_client"], report["heldout_loss"]
    table = Table("", "federated", "secure aggregation", "data parallel (same tokens)")
    table.add_row("bytes / round / client", human_bytes(b["plain"]),
                  f"{human_bytes(b['secure'])} ({human_bytes(b['secure_aggregation_protocol'])} protocol)", "")
    table.add_row("round s", f"{report['round_s']['plain']:.2f}",
                  f"{report['round_s']['secure']:.2f} ({report['secure_aggregation_time_ratio']:.2f}x)", "")
    table.add_row("held-out loss", f"{loss['federated']:.4f}", f"{loss['federated_secure']:.4f}",
                  f"{loss['data_parallel']:.4f}")
    out.print(table)
    out.print(f"{report['model']}: {report['clients']} clients, {report['rounds']} rounds of {report['local_steps']} "
              f"local steps, {report['tokens_per_round']} tokens a round; held-out loss untrained "
              f"{loss['untrained']:.4f}; federated / data parallel {report['federated_vs_data_parallel_loss']}x")


def _training_bench_errors() -> tuple[type[BaseException], ...]:
    """What a training benchmark on temporary nodes fails with, said as one line (imported when needed:
    'dllmctl --help' stays light)."""
    from dllmctl.cluster.local import LocalClusterError
    from dllmctl.data.push import PushError
    from dllmctl.training.jobs import TrainError
    from dllmd.data import DataError
    from dllmd.net.client import CallError

    return DataError, PushError, CallError, LocalClusterError, TrainError, RuntimeError, OSError
