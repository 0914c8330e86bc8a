"""One rank of the gloo baseline for ``dllmctl bench allreduce`` (run as a subprocess, one per rank).

``python -m dllmctl.bench.gloo_worker --rank R --world N --port P --elements E --iterations I [--rounds K]``

Joins a torch.distributed gloo group on 127.0.0.1, then runs K rounds; each waits for a line on
stdin (when K > 1, so the caller can interleave other measurements between rounds): ``go``, or
``go ELEMENTS`` for another buffer size from then on (a size sweep). A round runs one warm-up and
I timed ``all_reduce`` calls of a float32 buffer of E elements filled with ``rank + 1``, checks
that the sum is n(n+1)/2 everywhere, and prints one JSON line: ``{"rank": R, "round": k,
"seconds": [...]}``. Exit status 2: a wrong sum.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dllmctl.bench.gloo_worker")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--elements", type=int, required=True)
    parser.add_argument("--iterations", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0)
    a = parser.parse_args(argv)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank, world_size=a.world,
                            timeout=timedelta(seconds=a.timeout))
    try:
        buffer = torch.empty(a.elements, dtype=torch.float32)
        expected = a.world * (a.world + 1) / 2
        for round_ in range(a.rounds):
            if a.rounds > 1:
                line = sys.stdin.readline().split()
                if not line:
                    return 3  # the caller went away
                if len(line) > 1 and int(line[1]) != buffer.numel():
                    buffer = torch.empty(int(line[1]), dtype=torch.float32)
            seconds = []
            for i in range(1 + a.iterations):  # the first is the warm-up
                buffer.fill_(a.rank + 1)
                started = time.perf_counter()
                dist.all_reduce(buffer)
                if i:
                    seconds.append(time.perf_counter() - started)
                if not bool((buffer == expected).all()):
                    print(f"gloo rank {a.rank}: wrong sum", file=sys.stderr)
                    return 2
            print(json.dumps({"rank": a.rank, "round": round_, "seconds": seconds}), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
