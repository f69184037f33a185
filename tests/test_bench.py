"""The benchmark suite runs end to end: scenario (a) against every peer, briefly.

Its numbers mean nothing in a 2 s run on a busy machine; what is checked is that every peer
starts, answers without errors, and that every output of the suite is written and readable.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PEERS = {"fcgipool", "spawn-fcgi+multiwatch", "nginx-rr", "apache-mod_fcgid"}


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as source:
        return list(csv.DictReader(source))


def test_quick_suite_run_of_the_trivial_child_writes_every_output(tmp_path):
    out = tmp_path / "bench"
    command = [sys.executable, str(REPO / "bench" / "suite.py"), "--quick", "--repeats", "1",
               "--only", "a", "--out", str(out)]  # fmt: skip
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as suite:  # fmt: skip
        try:
            _, stderr = suite.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            suite.terminate()  # the suite stops its servers on SIGTERM
            _, stderr = suite.communicate(timeout=60)
            pytest.fail(f"the suite took more than 180 s:\n{stderr[-4000:]}")
    assert suite.returncode == 0, stderr[-4000:]

    rows = read(out / "results.csv")
    assert {row["scenario"] for row in rows} == {"a-trivial"}
    rates = {row["peer"]: float(row["value"]) for row in rows if row["metric"] == "req_per_s"}
    assert set(rates) == PEERS
    assert all(rate > 0 for rate in rates.values()), rates
    errors = {row["peer"]: float(row["value"]) for row in rows if row["metric"] == "errors"}
    assert errors == dict.fromkeys(PEERS, 0.0)
    assert any(row["metric"] == "cpu_us_per_request" for row in rows)

    medians = read(out / "medians.csv")
    ratios = {m["peer"]: m["ratio_to_fcgipool"] for m in medians if m["metric"] == "req_per_s"}
    assert set(ratios) == PEERS
    assert ratios["fcgipool"] == "1"
    assert all(float(value) > 0 for value in ratios.values()), ratios

    with Image.open(out / "a-trivial.png") as image:
        assert image.format == "PNG"
        assert image.size[0] > 400 and image.size[1] > 200
        image.verify()

    summary = (out / "summary.md").read_text()
    assert "## a-trivial" in summary
    assert "| case | peer | requests/s |" in summary
    assert "|---|---|" in summary
    for peer in PEERS:
        assert f"| hello | {peer} |" in summary or f"| hello | **{peer}** |" in summary

    run = (out / "run.txt").read_text()
    assert "a-trivial: ok" in run and "nginx" in run and "qgis-server" in run


def test_hotpath_serves_requests_through_the_real_request_path():
    """bench/hotpath.py drives the pool's real objects with in-memory transports: if a
    request stopped finding its way through them it would hang (the timeout) or fail."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "hotpath.py"), "--requests", "3000",
         "--repeats", "1"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    match = re.search(r"pool Python CPU per request: ([\d.]+) µs", done.stdout)
    assert match, done.stdout
    assert 0 < float(match.group(1)) < 10_000


def test_hotpath_runs_with_every_part_taken_away():
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "hotpath.py"), "--requests", "2000",
         "--repeats", "1", "--without", "params", "--without", "access", "--without",
         "metrics", "--without", "status"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert re.search(r"pool Python CPU per request: [\d.]+ µs", done.stdout), done.stdout


def test_hotpath_counts_instructions_and_what_params_decoding_costs():
    """--instructions counts under valgrind, exactly; without PARAMS decoding (about a
    fifth of the cost) the count must drop: a count that failed, or a part that was not
    taken away, would show."""

    def count(*without: str) -> int:
        command = [sys.executable, str(REPO / "bench" / "hotpath.py"), "--instructions",
                   "--requests", "200"]  # fmt: skip
        for name in without:
            command += ["--without", name]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-4000:]
        match = re.search(r"pool instructions per request: ([\d,]+)", done.stdout)
        assert match, done.stdout
        return int(match.group(1).replace(",", ""))

    whole = count()
    assert 10_000 < whole < 10_000_000
    assert count("params") < 0.95 * whole


def test_ab_compares_two_pools_and_the_floor_relay():
    """bench/ab.py runs a revision's pool (in a git worktree), a source directory's pool
    with a setting changed, and bench/floor.py's relay side by side; each must answer, and
    the table give each a rate."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "ab.py"), "HEAD", str(REPO), "--setting",
         "log.access=false", "--floor", "--repeats", "1", "--duration", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    names = f"HEAD|{re.escape(str(REPO))}|floor"
    rows = dict(re.findall(rf"^\| ({names}) \| (\d+) \|", done.stdout, re.M))
    assert set(rows) == {"HEAD", str(REPO), "floor"}, done.stdout
    assert all(int(rate) > 0 for rate in rows.values()), rows
    errors = re.findall(r"errors (\d+)", done.stderr)
    assert len(errors) == 3 and set(errors) == {"0"}, done.stderr[-4000:]


def test_ab_settings_are_toml_values_for_a_section_key():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import ab
    finally:
        sys.path.remove(str(REPO / "bench"))
    assert ab.settings(["log.access=false", "limits.max_waiting=10", 'log.format="json"']) == {
        "log": {"access": False, "format": "json"},
        "limits": {"max_waiting": 10},
    }
    with pytest.raises(SystemExit, match=r"expected SECTION\.KEY=VALUE"):
        ab.settings(["access=false"])
