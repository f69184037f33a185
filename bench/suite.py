"""The benchmark suite: every scenario against every peer, one command.

    .venv/bin/python bench/suite.py [--repeats 3] [--only a,b,...] [--peers P,...] [--quick]
                                    [--out docs/bench]

Scenarios, run in this order, each a module of bench/: a trivial.py, b core.py, c mixed.py,
d projects.py, e hangs.py, f crash.py, g reload.py, h idle.py, i scaling.py, j viewer.py,
k sizes.py, l day.py, m memory.py.
A module has KEY, NAME, TITLE, HEADLINE (the metrics to plot and tabulate) and
``run(ctx) -> list[results.Row]``: it starts its own set-ups (common.make_setups), runs them
side by side with interleaved runs, stops them and hands back one row per measured value;
``estimate(ctx)``, optional, gives its seconds for the estimate printed at the start
(``--estimate`` prints only that). Peers: common.PEERS, plus the fcgipool variants of some
scenarios ("fcgipool reserved=1"); ``--peers fcgipool`` takes fcgipool's variants too. At
the default 3 repeats on a 2-core machine, a to i and m take about 35 minutes, j and k about
10 more and l (three-minute runs: a compressed day) about 30.
``--quick`` is a smoke run (2 s runs, fewest cases; its numbers mean nothing), written to a
directory in /tmp unless --out says otherwise.

After each scenario the suite rewrites, in --out: ``results.csv`` (every row so far, so an
interrupted run keeps what it has; with --only the rows of the other scenarios already there
are kept), ``medians.csv`` (median over the repeats per scenario, case, peer and metric, with
its ratio to fcgipool's and to the best other peer's), ``<NAME>.png`` per scenario,
``summary.md`` (the headline medians of medians.csv as tables) and ``run.txt`` (the command,
the machine, the versions, how each scenario went). A scenario that raises is logged and
skipped, the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.metadata
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import results  # noqa: E402
from results import Context, Median, Row, is_fcgipool, log, number, ratio  # noqa: E402

SCENARIOS = {"a": "trivial", "b": "core", "c": "mixed", "d": "projects", "e": "hangs",
             "f": "crash", "g": "reload", "h": "idle", "i": "scaling", "j": "viewer",
             "k": "sizes", "l": "day", "m": "memory", "n": "changes", "o": "carryover"}  # fmt: skip
FALLBACK_ESTIMATE = 210.0  # seconds at 3 repeats, for a module without estimate()
COLORS = {"fcgipool": "#1f77b4", "spawn-fcgi+multiwatch": "#ff7f0e", "nginx-rr": "#2ca02c",
          "apache-mod_fcgid": "#d62728"}  # fmt: skip
MORE_COLORS = ["#6baed6", "#08306b", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per case and peer")
    parser.add_argument("--only", default="", help="scenario letters, e.g. a,b,m")
    parser.add_argument(
        "--peers", default="", help=f"comma-separated; of {', '.join(common.PEERS)}"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: numbers mean nothing")
    parser.add_argument("--out", type=Path, help="default: docs/bench; with --quick, a directory "
                        "in /tmp (a smoke run's numbers do not belong in docs/)")  # fmt: skip
    parser.add_argument("--estimate", action="store_true", help="print the estimate, run nothing")
    args = parser.parse_args(argv)
    args.keys = [key.strip() for key in args.only.split(",") if key.strip()] or list(SCENARIOS)
    unknown = [key for key in args.keys if key not in SCENARIOS]
    if unknown:
        parser.error(
            f"--only: unknown scenario {', '.join(unknown)}; known: {', '.join(SCENARIOS)}"
        )
    args.keys = [key for key in SCENARIOS if key in args.keys]  # the suite's order
    args.peer_list = tuple(p.strip() for p in args.peers.split(",") if p.strip())
    unknown = [p for p in args.peer_list if p.split()[0] not in common.PEERS]
    if unknown:
        parser.error(f"--peers: unknown {', '.join(unknown)}; known: {', '.join(common.PEERS)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.out is None:
        quick = Path(tempfile.gettempdir()) / "fcgipool-bench-quick"
        args.out = quick if args.quick else common.REPO / "docs" / "bench"
    return args


def load(key: str) -> ModuleType:
    module = importlib.import_module(SCENARIOS[key])
    for attribute in ("KEY", "NAME", "TITLE", "HEADLINE", "run"):
        if not hasattr(module, attribute):
            raise AttributeError(f"bench/{SCENARIOS[key]}.py has no {attribute}")
    if key != module.KEY:
        raise ValueError(f"bench/{SCENARIOS[key]}.py has KEY {module.KEY!r}, expected {key!r}")
    return module


def estimate(module: ModuleType, ctx: Context) -> float:
    """Seconds the scenario should take: its own estimate(), else a flat guess."""
    if hasattr(module, "estimate"):
        return float(module.estimate(ctx))
    return (20.0 if ctx.quick else FALLBACK_ESTIMATE) * ctx.repeats / 3


# ---------------------------------------------------------------- run.txt


def _first_line(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown ({error})"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def _package(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> list[str]:
    git = ["git", "-C", str(common.REPO), "describe", "--always", "--dirty"]
    return [
        f"fcgipool: {_first_line(git)}",
        f"nginx: {_first_line(['nginx', '-v'])}",
        f"apache2: {_first_line(['apache2', '-v'])}",
        f"mod_fcgid: {_first_line(['dpkg-query', '-W', 'libapache2-mod-fcgid'])}",
        f"spawn-fcgi: {_first_line(['spawn-fcgi', '-v'])}",
        f"multiwatch: {_first_line(['multiwatch', '-v'])}",
        f"QGIS: {_first_line(['dpkg-query', '-W', 'qgis-server'])}",
        f"wrk: {_first_line(['wrk', '-v'])}",
        f"Python: {sys.version.split()[0]}, uvloop {_package('uvloop')}, "
        f"matplotlib {_package('matplotlib')}",
    ]


# ---------------------------------------------------------------- plots


def _ordered(values) -> list[str]:
    return list(dict.fromkeys(values))


def _color(peer: str, peers: list[str]) -> str:
    if peer in COLORS:
        return COLORS[peer]
    others = [p for p in peers if p not in COLORS]
    return MORE_COLORS[others.index(peer) % len(MORE_COLORS)]


def plot(module: ModuleType, rows: list[Row], machine: str, path: Path) -> None:
    """Grouped bars (cases on the x axis, a bar per peer, whiskers from the lowest to the
    highest repeat), one subplot per headline metric; for scaling, lines over the children."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = [row for row in rows if row.scenario == module.NAME]
    runs: dict[tuple[str, str, str], list[float]] = {}
    for row in rows:
        if not math.isnan(row.value):
            runs.setdefault((row.case, row.peer, row.metric), []).append(row.value)
    headline = [(m, label) for m, label in module.HEADLINE if any(k[2] == m for k in runs)]
    if not headline:
        return
    peers = _ordered(row.peer for row in rows)
    all_cases = _ordered(row.case for row in rows)
    lines = module.KEY == "i" and all(re.search(r"\d+", case) for case in all_cases)
    bars = max(len(all_cases) * len(peers), 1)
    width = 4.5 if lines else min(10.0, max(4.5, 1.2 + 0.42 * bars))
    fig, axes = plt.subplots(1, len(headline), figsize=(min(20, width * len(headline)), 5),
                             squeeze=False)  # fmt: skip
    for ax, (metric, label) in zip(axes[0], headline, strict=True):
        cases = [c for c in all_cases if any((c, p, metric) in runs for p in peers)]
        for j, peer in enumerate(peers):
            here = [i for i, case in enumerate(cases) if (case, peer, metric) in runs]
            if not here:
                continue
            spread = [runs[(cases[i], peer, metric)] for i in here]
            ys = [statistics.median(s) for s in spread]
            err = [[y - min(s) for y, s in zip(ys, spread, strict=True)],
                   [max(s) - y for y, s in zip(ys, spread, strict=True)]]  # fmt: skip
            color = _color(peer, peers)
            if lines:
                xs = [int(re.search(r"\d+", cases[i]).group()) for i in here]
                ax.errorbar(xs, ys, yerr=err, marker="o", color=color, capsize=3)
                continue
            xs = [i + (j - (len(peers) - 1) / 2) * 0.8 / len(peers) for i in here]
            drawn = ax.bar(xs, ys, 0.8 / len(peers), yerr=err, color=color, capsize=2,
                           error_kw={"elinewidth": 0.8})  # fmt: skip
            turn = 90 if len(cases) * len(peers) > 8 else 0
            ax.bar_label(drawn, [number(y) for y in ys], fontsize=7, rotation=turn, padding=2)
        positive = [statistics.median(v) for k, v in runs.items() if k[2] == metric]
        positive = [v for v in positive if v > 0]
        if positive and max(positive) / min(positive) > 50:
            ax.set_yscale("log")
        if lines:
            ticks = sorted({int(re.search(r"\d+", c).group()) for c in cases})
            if ticks[-1] >= 4 * ticks[0]:
                ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_xlabel("children")
        else:
            ax.set_xticks(range(len(cases)), cases, fontsize=9)
            ax.set_xlim(-0.5, len(cases) - 0.5)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    repeats = max(len(v) for v in runs.values())
    legend = [Patch(color=_color(peer, peers), label=peer) for peer in peers]
    fig.legend(handles=legend, loc="lower center", ncol=min(len(peers), 5), fontsize=9)
    fig.suptitle(f"{module.NAME}: {module.TITLE}\n{machine}; median of {repeats}, whiskers "
                 "from the lowest to the highest run", fontsize=10)  # fmt: skip
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- summary.md


def summary(
    table: list[Median], modules: dict[str, ModuleType], status: dict[str, str], header: list[str]
) -> str:
    """A table per scenario, rows = case x peer, columns = the headline medians and their
    ratio to the best other peer: the very strings of medians.csv."""
    out = [
        "# Benchmark results",
        "",
        *header,
        "",
        "Each figure is the median of the repeats; *x best other* divides it by the best "
        "median among the peers that are not fcgipool (highest rate, lowest latency) for the "
        "same case. medians.csv has every metric, and the ratio to fcgipool too.",
        "",
    ]
    names = _ordered([m.scenario for m in table] + list(status))
    order = {key: i for i, key in enumerate(SCENARIOS)}
    names.sort(key=lambda name: order.get(name.split("-")[0], len(order)))
    by_name = {module.NAME: module for module in modules.values()}
    for name in names:
        module = by_name.get(name)
        out += [f"## {name}: {module.TITLE}" if module else f"## {name}", ""]
        if name in status and not status[name].startswith("ok"):
            out += [f"This run: **{status[name]}**.", ""]
        mine = [m for m in table if m.scenario == name]
        if not mine:
            continue
        metrics = _ordered(m.metric for m in mine)
        headline = module.HEADLINE if module else [(metric, metric) for metric in metrics]
        headline = [(metric, label) for metric, label in headline if metric in metrics]
        out += [f"![{name}]({name}.png)", ""]
        out.append(
            "| case | peer | "
            + " | ".join(f"{label} | x best other" for _, label in headline)
            + " |"
        )
        out.append("|---|---|" + "---:|---:|" * len(headline))
        found = {(m.case, m.peer, m.metric): m for m in mine}
        for case in _ordered(m.case for m in mine):
            for peer in _ordered(m.peer for m in mine):
                cells = [found.get((case, peer, metric)) for metric, _ in headline]
                if not any(cells):
                    continue
                text = " | ".join(
                    f"{number(c.median)} | {ratio(c.ratio_to_best_peer)}" if c else " | "
                    for c in cells
                )
                peer_text = f"**{peer}**" if is_fcgipool(peer) else peer
                out.append(f"| {case} | {peer_text} | {text} |")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------- the run


def write_all(
    out: Path,
    rows: list[Row],
    modules: dict[str, ModuleType],
    status: dict[str, str],
    header: list[str],
    run_txt: list[str],
) -> None:
    results.write_csv(rows, out / "results.csv")
    table = results.summarize(rows)
    results.write_medians(table, out / "medians.csv")
    (out / "summary.md").write_text(summary(table, modules, status, header))
    (out / "run.txt").write_text("\n".join(run_txt) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [key for key in args.keys if not (BENCH / f"{SCENARIOS[key]}.py").exists()]
    if missing:
        names = ", ".join(f"bench/{SCENARIOS[key]}.py (scenario {key})" for key in missing)
        print(f"suite: missing {names}; run the others with --only", file=sys.stderr)
        return 2
    failed = False
    modules: dict[str, ModuleType] = {}
    status: dict[str, str] = {}
    for key in args.keys:
        try:
            modules[key] = load(key)
        except Exception:
            traceback.print_exc()
            status[f"bench/{SCENARIOS[key]}.py"] = "FAILED to import"
            failed = True
    for key in set(SCENARIOS) - set(args.keys):  # titles of rows kept from an earlier run
        with contextlib.suppress(Exception):
            modules[key] = load(key)

    out: Path = args.out
    rows: list[Row] = []
    earlier: list[str] = []  # run.txt of the runs whose rows are kept, then this run's
    if args.only and (out / "results.csv").exists():
        rows = results.read_csv(out / "results.csv")
        with contextlib.suppress(OSError):
            earlier = [*(out / "run.txt").read_text().rstrip("\n").split("\n"), "", "---", ""]
    machine = common.machine()
    command = shlex.join(["bench/suite.py", *(sys.argv[1:] if argv is None else argv)])
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    header = [f"Machine: {machine}.", "", f"Command: `{command}`, started {started}."]
    if earlier:
        header[-1] += " The other scenarios' figures come from earlier runs: see run.txt."
    if args.quick:
        header += ["", "**A quick run (--quick): a smoke test, its numbers mean nothing.**"]
    contexts = {
        key: Context(Path(), args.repeats, args.quick, args.peer_list)
        for key in modules
        if key in args.keys
    }
    estimates = {key: estimate(modules[key], ctx) for key, ctx in contexts.items()}
    total = sum(estimates.values())
    each = ", ".join(f"{key} {seconds / 60:.1f}" for key, seconds in estimates.items())
    log(f"suite: {machine}; estimate, minutes: {each}; {total / 60:.1f} in all")
    if args.estimate:
        return 1 if failed else 0
    run_txt_head = [
        *earlier,
        f"command: {command}",
        f"started: {started}",
        f"machine: {machine}",
        *versions(),
        "",
        "scenarios:",
    ]
    notes: list[str] = [f"  {name}: {text}" for name, text in status.items()]
    begin = time.monotonic()
    for key, ctx in contexts.items():
        module = modules[key]
        ctx.root = Path(tempfile.mkdtemp(prefix=f"fcgipool-bench-{key}-"))
        ctx.root.chmod(0o755)
        log(f"== {module.NAME}: {module.TITLE} (estimate {estimates[key] / 60:.1f} min)")
        t0 = time.monotonic()
        try:
            new = module.run(ctx)
        except Exception as error:
            traceback.print_exc()
            status[module.NAME] = f"FAILED after {time.monotonic() - t0:.0f} s: {error!r}"
            failed = True
        else:
            rows = [row for row in rows if row.scenario != module.NAME] + list(new)
            seconds = time.monotonic() - t0
            status[module.NAME] = (
                f"ok, {seconds:.0f} s (estimate {estimates[key]:.0f} s), {len(new)} rows"
            )
            if new:
                try:
                    plot(module, rows, machine, out / f"{module.NAME}.png")
                except Exception as error:
                    traceback.print_exc()
                    status[module.NAME] += f"; plot FAILED: {error!r}"
                    failed = True
        finally:
            shutil.rmtree(ctx.root, ignore_errors=True)
        log(f"{module.NAME}: {status[module.NAME]}")
        notes.append(f"  {module.NAME}: {status[module.NAME]}")
        elapsed = f"elapsed: {time.monotonic() - begin:.0f} s (estimate {total:.0f} s)"
        write_all(out, rows, modules, status, header, [*run_txt_head, *notes, "", elapsed])
    if not contexts:
        write_all(out, rows, modules, status, header, [*run_txt_head, *notes])
    log(
        f"suite: done in {(time.monotonic() - begin) / 60:.1f} min; results in {out}"
        + (" (with failures)" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    os.umask(0o022)  # nginx's and Apache's workers must read what the scenarios write
    # SIGTERM (a timeout, a CI runner) unwinds like Ctrl-C: every set-up is stopped on the way
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
