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
    tp: Annotated[Optional[int], typer.Option(
        "--tp", min=1, max=64, help="With tensor or hybrid: the group size the deployed layout must have.")] = None,
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
    if tp is not None:
        _check_group_size(user, nodes, model, parallelism, tp)
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
                report["wan"] = pipeline_bench.wan(user, nodes, model, num_layers, prompt, new_tokens, wan_delay_ms,
                                                   parallelism)
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


def _check_group_size(user, nodes, model: str, parallelism: str, tp: int) -> None:
    """Refuse --tp N unless every deployed group has N members: the benchmark runs what is
    deployed, and a figure for another group size than asked would be misread."""
    import asyncio

    from dllmctl.inference.stages import live_stages

    if parallelism not in ("tensor", "hybrid"):
        fail("--tp needs --parallelism tensor or hybrid")
    sizes = sorted({s.span.tensor_slice.size for s in asyncio.run(live_stages(user, nodes, model))
                    if s.span.tensor_slice is not None})
    if sizes != [tp]:
        have = (f"its groups have {' and '.join(map(str, sizes))} members" if sizes else
                "no linked tensor-parallel group serves it; one just deployed may still be linking")
        fail(f"{model} has no deployed group of {tp} ({have}); 'dllmctl deploy {model} --parallelism "
             f"{parallelism} --tp {tp}' deploys one")


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
