"""Goodput when 1 % of requests hang forever: fcgipool vs spawn-fcgi, the same children.

    .venv/bin/python bench/hangs.py --duration 60

Children: tests/apps/fault_app.py, 4 of them; a normal request sleeps 100 ms (an I/O-bound
map request), a hanging one never answers. spawn-fcgi cannot see a request, so each hang
keeps one of its children forever; fcgipool answers 504 after its request timeout, cancels
the child and replaces it. Goodput is 200 answers per second; each set-up is measured
without faults first and with 1 % hangs after, and the ratio of the two is its score.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from common import FAULT_APP, SAFE_PATH, Fcgipool, SpawnFcgi, machine, run_wrk, wait_http

LUA = """
counter = 0
request = function()
  counter = counter + 1
  if math.random() < {share} then
    return wrk.format("GET", "/?hang=1&n=" .. counter)
  end
  return wrk.format("GET", "/?sleep=100&n=" .. counter)
end
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--hang-share", type=float, default=0.01)
    parser.add_argument("--timeout", type=float, default=0.5, help="fcgipool request timeout")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="fcgipool-bench-"))
    root.chmod(0o755)
    command = [sys.executable, str(FAULT_APP)]
    env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8"}
    settings = {
        "timeouts": {"request": args.timeout, "cancel": 0.2, "kill_grace": 0.5},
        "child": {"respawn_delay": 0.05},
        "pool": {"max_failure_pressure": 1000.0},
    }
    setups = [Fcgipool(root, args.workers, command, env, settings=settings),
              SpawnFcgi(root, args.workers, command, env)]  # fmt: skip
    scripts = {}
    for share in (0.0, args.hang_share):
        scripts[share] = root / f"load-{share}.lua"
        scripts[share].write_text(LUA.format(share=share))
    rows = []
    try:
        for setup in setups:
            setup.start()
            wait_http(setup.url("/?n=0"))
        for setup in setups:
            goodput = {}
            for share, script in scripts.items():
                setup.restart_manager()  # fresh children for each run
                wait_http(setup.url("/?n=0"))
                result = run_wrk(setup.url("/"), args.duration, args.connections, script,
                                 timeout=10)  # fmt: skip
                goodput[share] = result.goodput
                print(f"# {setup.name:<10} hang share {share:.2%}: {result.requests} requests, "
                      f"{result.errors} errors, goodput {result.goodput:.1f}/s",
                      file=sys.stderr, flush=True)  # fmt: skip
            rows.append((setup.name, goodput[0.0], goodput[args.hang_share]))
    finally:
        for setup in setups:
            setup.stop()
        shutil.rmtree(root, ignore_errors=True)

    print(f"Machine: {machine()}. {args.workers} children, wrk -c{args.connections}, "
          f"{args.duration:g} s per run, fcgipool request timeout {args.timeout:g} s.\n")
    print(f"| manager | goodput, no faults (req/s) | goodput, {args.hang_share:.0%} hangs "
          "(req/s) | kept |")
    print("|---|---:|---:|---:|")
    for name, clean, faulty in rows:
        print(f"| {name} | {clean:.1f} | {faulty:.1f} | {faulty / clean:.1%} |")


if __name__ == "__main__":
    main()
