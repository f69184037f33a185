"""Scenario (a): a trivial C FastCGI child (bench/apps/hello.c, built from libfcgi), the
worst case for a manager in the data path: the child costs almost nothing, so whatever the
manager spends per request shows. fcgipool vs spawn-fcgi, 2 children each, behind nginx.

    .venv/bin/python bench/trivial.py --repeats 5 --duration 10

Also reports the supervisor's CPU time per request (user + system of the pool process over
the run, divided by the requests answered).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import psutil
from common import SAFE_PATH, Fcgipool, SpawnFcgi, machine, run_wrk, wait_http
from memory import build_hello


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fcgipool-bench-"))
    root.chmod(0o755)
    command = [str(build_hello(root))]
    env = {"PATH": SAFE_PATH}
    ours = Fcgipool(root, args.workers, command, env)
    peer = SpawnFcgi(root, args.workers, command, env)
    rates: dict[str, list[float]] = {ours.name: [], peer.name: []}
    p99s: dict[str, list[float]] = {ours.name: [], peer.name: []}
    cpu_per_request: list[float] = []
    try:
        for setup in (ours, peer):
            setup.start()
            wait_http(setup.url("/x"))
            run_wrk(setup.url("/x"), 2, args.connections)  # warm-up
        for repeat in range(args.repeats):
            for setup in (ours, peer) if repeat % 2 == 0 else (peer, ours):
                process = psutil.Process(ours.manager.pid) if setup is ours else None
                before = sum(process.cpu_times()[:2]) if process else 0.0
                result = run_wrk(setup.url("/x"), args.duration, args.connections)
                if process:
                    cpu_per_request.append((sum(process.cpu_times()[:2]) - before)
                                           / result.requests)  # fmt: skip
                rates[setup.name].append(result.requests_per_s)
                p99s[setup.name].append(result.p99_ms)
                print(f"# {repeat + 1}/{args.repeats} {setup.name:<10} "
                      f"{result.requests_per_s:8.0f} req/s p99 {result.p99_ms:.2f} ms "
                      f"errors {result.errors}", file=sys.stderr, flush=True)  # fmt: skip
    finally:
        ours.stop()
        peer.stop()
        shutil.rmtree(root, ignore_errors=True)
    rate = statistics.median(rates[ours.name])
    peer_rate = statistics.median(rates[peer.name])
    print(f"Machine: {machine()}. wrk -t1 -c{args.connections}, {args.duration:g} s runs, "
          f"median of {args.repeats}, {args.workers} children.\n")
    print("| manager | req/s | p99 ms | ratio to spawn-fcgi | supervisor CPU per request |")
    print("|---|---:|---:|---:|---:|")
    print(f"| fcgipool | {rate:.0f} | {statistics.median(p99s[ours.name]):.2f} | "
          f"{rate / peer_rate:.3f} | {statistics.median(cpu_per_request) * 1e6:.0f} µs |")
    print(f"| spawn-fcgi | {peer_rate:.0f} | {statistics.median(p99s[peer.name]):.2f} | 1 | "
          "— (not in the data path) |")


if __name__ == "__main__":
    main()
