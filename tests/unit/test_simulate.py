"""bench/simulate.py: the pool's real dispatcher over simulated QGIS children keeps its
promises in a small site (200 projects, 16 children, 3 simulated minutes, a fraction of a
second of CPU each): every request ends exactly once, queues stay within their bound, the
pool remembers at most projects.memory projects per child, and its affinity finds loaded
projects more often than a random idle child does, because of affinity (with
projects.memory = 0 the gain is gone)."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import simulate

from fcgipool import config

SMALL = {"children": 16, "projects": 200, "cache": 10, "warmup": 60.0, "duration": 120.0,
         "max_requests": 100, "max_requests_jitter": 50, "crash_rate": 5e-3,
         "changes_per_hour": 120.0}  # fmt: skip
POLICIES = ["fcgipool", "fcgipool:projects.memory=0", "fcgipool:limits.max_waiting=20",
            "random-idle", "round-robin", "first-idle"]  # fmt: skip


def run(bursty: bool, seed: int) -> dict[str, dict]:
    workload = simulate.Workload(name="small", bursty=bursty, seed=seed, **SMALL)
    return {row["policy"]: row for row in simulate.simulate(workload, POLICIES)}


@pytest.fixture(scope="module", params=[(False, 1), (False, 2), (True, 3)],
                ids=["steady-1", "steady-2", "bursty-3"])  # fmt: skip
def rows(request: pytest.FixtureRequest) -> dict[str, dict]:
    return run(*request.param)


def test_every_request_ends_exactly_once(rows):
    # Simulation.resolve asserts that no request ends twice; here none is left or lost.
    for policy, row in rows.items():
        ended = row["served"] + row["refused"] + row["waited_out"] + row["lost"]
        assert row["requests"] > 100, policy
        assert row["unfinished"] == 0 and ended == row["requests"], (policy, row)
        if policy.startswith("fcgipool"):
            assert row["lost"] == 0, (policy, row)  # a crash's request is retried
    crashes = rows["fcgipool"]["crashes"]
    assert crashes and rows["fcgipool"]["recycled"], "the run should crash and recycle"


def test_queues_stay_within_max_waiting_per_class(rows):
    for policy in ("fcgipool", "fcgipool:limits.max_waiting=20"):
        row = rows[policy]
        bound = 20 if "max_waiting" in policy else 1024
        # a request retried after a crash goes back to the head of its queue past the bound
        assert max(row["max_class_queue"].values()) <= bound + row["crashes"], row


def test_the_bound_is_reached_when_bursts_overflow_it():
    row = run(True, 3)["fcgipool:limits.max_waiting=20"]
    assert max(row["max_class_queue"].values()) >= 20
    assert row["refused"] > 0


def test_the_pool_remembers_at_most_projects_memory_per_child(rows):
    assert 0 < rows["fcgipool"]["max_remembered"] <= config.Config().projects.memory
    assert rows["fcgipool:projects.memory=0"]["max_remembered"] == 0


def test_affinity_finds_loaded_projects_more_often_than_a_random_idle_child(rows):
    affinity = rows["fcgipool"]["hit_rate"]
    assert affinity > rows["random-idle"]["hit_rate"] + 0.03, rows
    assert affinity > rows["fcgipool:projects.memory=0"]["hit_rate"], rows


def test_same_seed_same_numbers():
    workload = simulate.Workload(name="small", seed=4, **SMALL)
    first, second = (simulate.simulate(workload, ["fcgipool", "random-idle"]) for _ in "ab")
    for row in (*first, *second):
        row.pop("cpu_s"), row.pop("dispatch_us_per_request")  # times, not results
    assert first == second


def test_quick_command_writes_the_table_the_json_and_the_plot(tmp_path, capsys):
    out, plot = tmp_path / "simulate.json", tmp_path / "simulate.svg"
    args = ["--quick", "--children", "16", "--policies", "fcgipool,random-idle"]
    assert simulate.main([*args, "--out", str(out), "--plot", str(plot)]) == 0
    document = json.loads(out.read_text())
    assert {row["workload"] for row in document["rows"]} == {"steady", "bursty"}
    assert "| steady | 16 | fcgipool |" in capsys.readouterr().out
    svg = ElementTree.fromstring(plot.read_text())
    assert svg.tag.endswith("svg") and len(svg.findall(".//{*}rect")) > 4
    assert simulate.main(["--from", str(out), "--plot", str(plot)]) == 0
