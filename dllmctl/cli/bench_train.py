"""``dllmctl bench allreduce`` and ``bench train``: the training benchmarks (registered on the bench app by
``dllmctl.cli``)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from dllmctl.cli.common import JsonOpt, err, fail, human_bytes, load_user, local_model, out, print_json


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
    balance: Annotated[str, typer.Option(help="Planned stages balance compute or memory.")] = "compute",
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
                                     schedule=schedule, dp=dp, pp=pp, stage_layers=layers, balance=balance)
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


def chaos(
    model: Annotated[str, typer.Option("--model", "-m", help="A model in the local store.")],
    nodes: Annotated[int, typer.Option(min=2, max=16, help="Temporary local nodes (the first coordinates).")] = 4,
    steps: Annotated[int, typer.Option(min=8, max=100_000)] = 40,
    faults: Annotated[int, typer.Option(min=0, max=64, help="Faults to strike, spread over the job.")] = 3,
    kinds: Annotated[str, typer.Option(help="Kinds of fault to draw from: kill, stop, coordinator.")] =
        "kill,stop,coordinator",
    seed: Annotated[int, typer.Option(min=0, help="Draws the faults' kinds and victims.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, max=4096)] = 8,
    micro_batch_size: Annotated[int, typer.Option(min=1, max=4096)] = 2,
    seq_len: Annotated[int, typer.Option(min=16, max=65536)] = 64,
    checkpoint_every: Annotated[int, typer.Option(min=1, max=100_000)] = 5,
    as_json: JsonOpt = False,
) -> None:
    """A data-parallel job on temporary local nodes while workers are killed, hung (SIGSTOP) and the
    coordinator killed and resumed: what each fault cost, and whether the final weights still equal the
    same steps in one process (target: max abs difference <= 1e-5)."""
    from dllmctl.bench import chaos as chaos_bench

    if batch_size % micro_batch_size:
        fail("--batch-size must be divisible by --micro-batch-size")
    drawn = [k.strip() for k in kinds.split(",") if k.strip()]
    if not drawn or any(k not in chaos_bench.KINDS for k in drawn):
        fail(f"--kinds takes some of {', '.join(chaos_bench.KINDS)}, comma-separated; got {kinds!r}")
    directory, _ = local_model(model)
    try:
        with err.status("chaos...") as status:
            report = chaos_bench.run(load_user(), model, directory, nodes, steps, faults, drawn, seed, batch_size,
                                     micro_batch_size, seq_len, checkpoint_every,
                                     progress=lambda message: status.update(f"chaos: {message}"))
    except _training_bench_errors() as exc:
        fail(str(exc))
    if as_json:
        print_json(report)
        return
    table = Table("fault", "node", "at step", "struck at", "next step after")
    for f in report["faults"]:
        table.add_row(f["kind"], f["node"], str(f["at_step"]), str(f["struck_at_step"]),
                      "never" if f["recovered_s"] is None else f"{f['recovered_s']:.1f} s")
    out.print(table)
    diff = report["max_abs_difference"]
    out.print(f"job {report['job_state']} at step {report['job_step']}/{report['steps']} in {report['job_seconds']:.0f} s; "
              f"weights vs one process: {'-' if diff is None else f'{diff:.2g}'} "
              f"({'exact' if report['exact'] else 'NOT exact'}); survived: {report['survived']}")
