"""What a change to fcgipool bought: the pool of one git revision against another's (or the
working tree's), side by side on the trivial C child (scenario a's set-up) or on QGIS
GetCapabilities (scenario b's), runs interleaved.

    .venv/bin/python bench/ab.py c92e87b --repeats 5          # c92e87b vs the working tree
    .venv/bin/python bench/ab.py c92e87b 5b1f0e2 --repeats 5  # one commit's change
    .venv/bin/python bench/ab.py HEAD --child qgis --spawn    # GetCapabilities, + spawn-fcgi
    .venv/bin/python bench/ab.py HEAD --floor                 # + bench/floor.py's relay
    .venv/bin/python bench/ab.py HEAD --setting log.access=false   # a setting's cost
    .venv/bin/python bench/ab.py HEAD /tmp/compiled           # a source tree (e.g. mypyc-built)

Each revision is checked out in a temporary git worktree and run from there (PYTHONPATH and
working directory); a directory is run as it is. Both pools get the same configuration
(``--setting`` changes the second's), children, nginx and wrk. Reports requests/s and the
pool's CPU time per request, medians of the repeats, and the ratio of each to the
baseline's. docs/benchmarks.md records what each hot-path change bought with this script.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import common
import tomlkit
from core import qgis_paths
from memory import build_hello
from results import interleaved, log, warm, wrk_with_cpu

WORKERS, CONNECTIONS = 2, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", help="a git revision or a source directory: the pool to "
                        "compare with")
    parser.add_argument("revision", nargs="?",
                        help="a git revision or a source directory (default: the working tree)")
    parser.add_argument("--setting", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="for the second pool only, a TOML value, e.g. log.access=false")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--duration", type=float, default=6)
    parser.add_argument("--child", choices=("hello", "qgis"), default="hello",
                        help="the trivial C child (a) or QGIS GetCapabilities (b)")
    parser.add_argument("--spawn", action="store_true",
                        help="spawn-fcgi+multiwatch too, as the reference of scenarios a and b")
    parser.add_argument("--floor", action="store_true",
                        help="bench/floor.py too: the least a Python relay costs")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fcgipool-ab-"))
    root.chmod(0o755)
    trees: dict[str, Path] = {}
    worktrees: list[Path] = []
    for name in filter(None, (args.baseline, args.revision)):
        if Path(name).is_dir():
            trees[name] = Path(name).resolve()
            continue
        trees[name] = root / f"tree-{len(trees)}"
        worktrees.append(trees[name])
        subprocess.run(["git", "-C", str(common.REPO), "worktree", "add", "--detach",
                        str(trees[name]), name], check=True, capture_output=True)  # fmt: skip
    if args.child == "qgis":
        command, env = [common.QGIS], common.qgis_env(root / "home")
        (root / "home").mkdir()
        path = qgis_paths()["GetCapabilities"]
    else:
        command, env, path = [str(build_hello(root))], {"PATH": common.SAFE_PATH}, "/x"
    new = args.revision or "working tree"
    setups: dict[str, common.Setup] = {
        args.baseline: common.Fcgipool(root / "a", WORKERS, command, env,
                                       source=trees[args.baseline]),
        new: common.Fcgipool(root / "b", WORKERS, command, env, source=trees.get(new),
                             settings=settings(args.setting)),
    }  # fmt: skip
    if args.floor:
        setups["floor"] = common.Floor(root / "d", WORKERS, command, env)
    if args.spawn:
        setups["spawn-fcgi"] = common.SpawnMultiwatch(root / "c", WORKERS, command, env)
    rates: dict[str, list[float]] = {name: [] for name in setups}
    cpu: dict[str, list[float]] = {name: [] for name in setups}
    try:
        for setup in setups.values():
            setup.start()
            warm(setup, path, WORKERS, CONNECTIONS, 2)
        for repeat, name in interleaved(list(setups), args.repeats):
            setup = setups[name]
            result, used = wrk_with_cpu(setup.url(path), args.duration, CONNECTIONS,
                                        setup.manager_pids())  # fmt: skip
            rates[name].append(result.requests_per_s)
            cpu[name].append(used)
            log(f"{repeat + 1}/{args.repeats} {name:<14} {result.requests_per_s:8.0f} req/s "
                f"{cpu[name][-1]:6.1f} µs/request errors {result.errors}")  # fmt: skip
    finally:
        for setup in setups.values():
            setup.stop()
        for tree in worktrees:
            subprocess.run(["git", "-C", str(common.REPO), "worktree", "remove", "--force",
                            str(tree)], check=False, capture_output=True)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)
    base = args.baseline
    child = "QGIS GetCapabilities" if args.child == "qgis" else "Trivial C child"
    print(
        f"Machine: {common.machine()}. {child}, {WORKERS} children, wrk -t1 "
        f"-c{CONNECTIONS}, {args.duration:g} s runs, median of {args.repeats}.\n"
    )
    reference = statistics.median(rates["spawn-fcgi"]) if args.spawn else 0.0
    print("| pool | req/s | ratio | pool CPU µs/request | ratio |"
          + (" vs spawn-fcgi |" if args.spawn else ""))  # fmt: skip
    print("|---|---:|---:|---:|---:|" + ("---:|" if args.spawn else ""))
    base_rate, base_us = statistics.median(rates[base]), statistics.median(cpu[base])
    for name in setups:
        rate, us = statistics.median(rates[name]), statistics.median(cpu[name])
        line = f"| {name} | {rate:.0f} | {rate / base_rate:.3f} |"
        line += " - | - |" if name == "spawn-fcgi" else f" {us:.1f} | {us / base_us:.3f} |"
        print(line + (f" {rate / reference:.3f} |" if args.spawn else ""))

def settings(assignments: list[str]) -> dict[str, dict]:
    """``["log.access=false"]`` → ``{"log": {"access": False}}``; values are TOML."""
    out: dict[str, dict] = {}
    for assignment in assignments:
        key, _, value = assignment.partition("=")
        section, _, name = key.strip().partition(".")
        if not (section and name and value):
            raise SystemExit(f"--setting {assignment!r}: expected SECTION.KEY=VALUE")
        out.setdefault(section, {})[name] = tomlkit.parse(f"v = {value}").unwrap()["v"]
    return out


if __name__ == "__main__":
    main()
