"""``dllmctl bench shard-data``: shard real code with every strategy onto a temporary local cluster.

The source is read and tokenized once (the baseline: what the tokenizer alone does per second);
then each strategy assigns, packs and pushes the same samples over the encrypted channel with the
two-phase commit ``dllmctl shard-data`` uses. Figures per strategy: end-to-end tokens/s (reading
and tokenizing included), placement time, bytes pushed and token skew (max/mean per node).
"""

from __future__ import annotations

import sysconfig
import tempfile
import time
from pathlib import Path

from dllmctl.cluster import local as local_cluster
from dllmctl.cluster.registry import NodeEntry, Registry
from dllmctl.data.sharding import ShardProgress, ShardRequest, place, prepare
from dllmd.data import STRATEGIES, split_samples
from dllmd.net.identity import Identity


def stdlib_source() -> str:
    """The Python standard library's source directory: real code nobody here wrote, on every machine
    (its ``site-packages/``, third-party code installed there, is excluded when reading)."""
    return sysconfig.get_paths()["stdlib"]


def run(user: Identity, model: str, model_dir: Path, source: str, nodes: int, strategies: list[str],
        seq_len: int = 2048, replicas: int = 2, progress: ShardProgress | None = None) -> dict:
    progress = progress or ShardProgress()
    request = ShardRequest(uri=source, model=model, model_dir=model_dir, strategy=strategies[0], name="bench",
                           seq_len=seq_len, include=["*.py"], exclude=["site-packages/"])
    started = time.perf_counter()
    prepared = prepare(request, progress)
    read_tokenize_s = time.perf_counter() - started
    # What the nodes get: ids and an EOS per piece (long files are cut into pieces of one sequence).
    tokens = sum(p.packed_tokens for p in split_samples(prepared.samples, seq_len).samples)
    report: dict = {"source": source, "model": model, "nodes": nodes, "seq_len": seq_len,
                    "files": len(prepared.samples), "skipped": len(prepared.source.skipped), "tokens": tokens,
                    "read_tokenize_s": round(read_tokenize_s, 3),
                    "baseline_tokenize_tokens_per_second": round(tokens / read_tokenize_s, 1), "strategies": []}
    with tempfile.TemporaryDirectory(prefix="dllm-bench-shard-") as tmp:
        registry = Registry(Path(tmp) / "cluster.toml")
        started_nodes = local_cluster.up(nodes, Path(tmp), user, registry)
        entries = [NodeEntry(n.name, n.address, n.public_key) for n in started_nodes]
        try:
            for strategy in strategies:
                copies = replicas if strategy == "dht" else 1
                step = ShardRequest(uri=source, model=model, model_dir=model_dir, strategy=strategy,
                                    name=f"bench-{strategy}", seq_len=seq_len, replicas=copies)
                placed_at = time.perf_counter()
                result = place(user, entries, step, prepared, progress)
                place_s = time.perf_counter() - placed_at
                total_s = read_tokenize_s + place_s
                report["strategies"].append({
                    "strategy": strategy, "replicas": copies, "place_s": round(place_s, 3),
                    "tokens_per_second": round(tokens / total_s, 1),
                    "ratio_to_tokenize_only": round(read_tokenize_s / total_s, 3),
                    "bytes_pushed": result["bytes_sent"],
                    "tokens_per_node": [row["tokens"] for row in result["nodes"]], "skew": result["skew"]})
        finally:
            local_cluster.down(Path(tmp), registry)
    return report


def parse_strategies(text: str | None) -> list[str]:
    chosen = [part.strip() for part in (text or "").split(",") if part.strip()] or list(STRATEGIES)
    unknown = [s for s in chosen if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
    return chosen
