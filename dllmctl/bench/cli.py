"""``dllmctl bench cli``: how long the commands people type most take, wall time, best of N runs.

A command-line tool that takes seconds to print its help is one people stop using. Each command runs
as a fresh process, as a person runs it, against a temporary local cluster (so ``nodes list`` and
``jobs list`` ask real daemons); the baseline is the interpreter starting and exiting, measured in
the same run. Targets: ``--help`` <= 0.5 s, ``nodes list`` / ``jobs list`` with 3 nodes <= 1 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dllmd.net.identity import Identity
from dllmctl.cluster import local as local_cluster
from dllmctl.cluster.registry import Registry

TARGETS_S = {"--help": 0.5, "nodes list": 1.0, "jobs list": 1.0}


def _seconds(argv: list[str], env: dict) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()[-300:]}")
    return elapsed


def run(nodes: int = 3, runs: int = 3) -> dict:
    with tempfile.TemporaryDirectory(prefix="dllm-bench-cli-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "DLLM_CONFIG_DIR": str(root / "config"), "DLLM_DATA_DIR": str(root / "data"),
               "DLLM_CACHE_DIR": str(root / "cache")}
        (root / "config").mkdir()
        user = Identity.generate()
        user.save(root / "config" / "identity")
        registry = Registry(root / "config" / "cluster.toml")
        local_cluster.up(nodes, root / "cluster", user, registry)
        try:
            baseline = min(_seconds([sys.executable, "-c", "pass"], env) for _ in range(runs))
            commands = {"--help": ["--help"], "nodes list": ["nodes", "list", "--json"],
                        "jobs list": ["jobs", "list", "--json"]}
            figures = {}
            for label, args in commands.items():
                best = min(_seconds([sys.executable, "-m", "dllmctl", *args], env) for _ in range(runs))
                figures[label] = {"best_s": round(best, 3), "target_s": TARGETS_S[label],
                                  "meets_target": best <= TARGETS_S[label],
                                  "over_interpreter_start_s": round(best - baseline, 3)}
        finally:
            local_cluster.down(root / "cluster", registry)
    return {"nodes": nodes, "runs": runs, "interpreter_start_s": round(baseline, 3), "commands": figures}
