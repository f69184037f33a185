"""Projects on the real thing: qgis_mapserv.fcgi children behind the pool, default config.

A copy of demo/project/heavy.qgs (50,000 GeoJSON points: about 0.5 s to load on this
machine, 1-2 ms warm) is changed in place and by an atomic rename; QGIS Server 3.22 notices
either by itself and reloads the project in the next request that names it. The pool
notices too (projects.check_interval), and brings every child holding it to the new version
before a visitor's request gets there; the `fcgipool projects` commands act on the real
children; a reload, a recycle and a crash hand the warm set over to the replacements.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

from conftest import DEMO_PROJECT, HEAVY_PROJECT, pool_status, qgis_config, wait_for
from fcgipool import client

WARM = 0.25  # seconds: a warm GetCapabilities of either project is far below this


def slow_copy(workdir) -> str:
    """heavy.qgs with its data path made absolute, so the copy loads the same points."""
    text = HEAVY_PROJECT.read_text()
    data = str(HEAVY_PROJECT.parent / "data")
    path = workdir / "slow.qgs"
    path.write_text(text.replace("<datasource>./data/", f"<datasource>{data}/"))
    return str(path)


def retitle(path: str, title: str, rename: bool) -> None:
    with open(path) as file:
        text = file.read()
    text = re.sub(r'(<WMSServiceTitle type="QString">)[^<]*<', rf"\g<1>{title}<", text)
    if rename:
        with open(path + ".tmp", "w") as file:
            file.write(text)
        os.rename(path + ".tmp", path)
    else:
        with open(path, "w") as file:
            file.write(text)


def capabilities(pool, project: str) -> tuple[float, str]:
    """(seconds, service title) of a GetCapabilities of ``project``."""
    query = urllib.parse.urlencode({"MAP": project, "SERVICE": "WMS",
                                    "REQUEST": "GetCapabilities"})
    started = time.monotonic()
    response = client.request(pool.address, "/ows?" + query, timeout=60)
    elapsed = time.monotonic() - started
    assert response.status == 200, response.body[:300]
    title = re.search(rb"<Title>([^<]*)</Title>", response.body)
    return elapsed, title.group(1).decode() if title else ""


def cli(pool, *args: str) -> subprocess.CompletedProcess:
    control = str(pool.config_path.parent / "pool.ctl")
    return subprocess.run([sys.executable, "-m", "fcgipool", "projects", "--control", control,
                           *args], capture_output=True, text=True, timeout=30)


def projects(pool) -> dict[str, dict]:
    rows = json.loads(cli(pool, "--json").stdout)
    return {row["path"]: row for row in rows}


def test_a_changed_project_reaches_every_child_before_a_visitor_pays_the_load(
        pool_factory, workdir, heavy_project):
    slow = slow_copy(workdir)
    pool = pool_factory(qgis_config(workdir))
    capabilities(pool, slow)  # the first load, by a visitor
    assert cli(pool, "warm", slow).returncode == 0  # and on the other child
    wait_for(lambda: len(projects(pool)[slow]["children"]) == 2, 30, "both children hold it")
    assert cli(pool, "unpin", slow).returncode == 0
    warm, _ = capabilities(pool, slow)
    assert warm < WARM
    stop = threading.Event()
    others: list[float] = []

    def other_traffic() -> None:  # another project, served all along
        while not stop.is_set():
            others.append(capabilities(pool, str(DEMO_PROJECT))[0])

    thread = threading.Thread(target=other_traffic, daemon=True)
    thread.start()
    try:
        for version, rename in ((1, False), (2, True)):
            reloads = projects(pool)[slow]["reloads"]
            retitle(slow, f"version {version}", rename)
            def reloaded(before: int = reloads) -> bool:
                row = projects(pool)[slow]
                return row["reloads"] >= before + 2 and len(row["children"]) == 2

            wait_for(reloaded, 30, "both children reloaded")
            answers = [capabilities(pool, slow) for _ in range(8)]
            assert {title for _, title in answers} == {f"version {version}"}, answers
            assert max(seconds for seconds, _ in answers) < WARM, answers
    finally:
        stop.set()
        thread.join(60)
    assert others and max(others) < WARM, f"the other project paid a load: {max(others)}"
    row = projects(pool)[slow]
    # the load time is learned: 0.4-0.6 s for a first load, down to 0.18 s for a reload
    # with the CSV in the page cache; a warm GetCapabilities takes milliseconds
    assert row["load_seconds"] > 0.05 and row["reloads"] >= 4
    assert "project_changed" in pool.log()


def test_without_change_detection_each_child_makes_a_visitor_pay(
        pool_factory, workdir, heavy_project):
    """What the pool saves: QGIS alone reloads on the next request of each child."""
    slow = slow_copy(workdir)
    pool = pool_factory(qgis_config(workdir, projects={"check_interval": 0}))
    capabilities(pool, slow)
    cli(pool, "warm", slow)
    wait_for(lambda: len(projects(pool)[slow]["children"]) == 2, 30, "both children hold it")
    retitle(slow, "changed", False)
    first, title = capabilities(pool, slow)
    assert title == "changed" and first > WARM


def serving(pool) -> int:
    counts = pool_status(pool)["pool"]["children"]
    return counts["idle"] + counts["busy"]


def test_project_commands_on_real_children(pool_factory, workdir, heavy_project):
    slow = slow_copy(workdir)
    pool = pool_factory(qgis_config(workdir, projects={"allowed_roots": [str(workdir)]}))
    listed = cli(pool)
    assert listed.returncode == 0 and "REQUESTS" in listed.stdout
    warm = cli(pool, "warm", slow, "--children", "1")
    assert warm.returncode == 0 and "loading on 1 children; pinned" in warm.stdout
    wait_for(lambda: len(projects(pool).get(slow, {}).get("children", [])) == 1, 30)
    row = projects(pool)[slow]
    assert row["pinned"] and row["loads"] == 1 and row["requests"] == 0
    text = cli(pool).stdout
    assert slow in text and "(pinned)" in text
    for args, message in (
        (("warm", str(DEMO_PROJECT)), "outside the allowed roots"),
        (("warm", str(workdir / "nope.qgs")), "no such file"),
        (("drop", "/etc/passwd"), "not a project file"),
        (("refresh", str(workdir / "other.qgs")), "not a project the pool has seen"),
    ):
        result = cli(pool, *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    refreshed = cli(pool, "refresh", slow)
    assert refreshed.returncode == 0 and "reloading on 1 children" in refreshed.stdout
    wait_for(lambda: projects(pool)[slow]["reloads"] == 1, 30, "the refresh")
    held_by = projects(pool)[slow]["children"]
    dropped = cli(pool, "drop", slow)
    assert dropped.returncode == 0 and "replacing 1 children" in dropped.stdout
    wait_for(lambda: not set(held_by) & set(pool.children()), 60, "the holder replaced")
    wait_for(lambda: serving(pool) == 2, 60, "two children ready")
    row = projects(pool)[slow]
    assert row["dropped"] and not row["pinned"] and row["children"] == []


def test_the_warm_set_survives_a_reload_a_recycle_and_a_crash(
        pool_factory, workdir, heavy_project):
    """The first request for a popular project after each replacement is as fast as
    before it: the replacement loaded it before taking traffic."""
    slow = slow_copy(workdir)
    pool = pool_factory(qgis_config(workdir, child={"max_requests": 40,
                                                    "max_requests_jitter": 0}))
    capabilities(pool, slow)
    cli(pool, "warm", slow)
    wait_for(lambda: len(projects(pool)[slow]["children"]) == 2, 30)
    cli(pool, "unpin", slow)  # held because it is requested, not because it is pinned

    def replaced(before: set[int]) -> bool:
        """Some child of ``before`` is gone, two are ready, both hold the project."""
        status = pool_status(pool)
        pids = {row["pid"] for row in status["children"] if row["state"] in ("idle", "busy")}
        return len(pids) == 2 and pids != before and len(projects(pool)[slow]["children"]) == 2

    for cause in ("reload", "crash", "recycle"):
        before = set(pool.children())
        if cause == "reload":
            os.kill(pool.pid, signal.SIGHUP)
        elif cause == "crash":
            os.kill(min(before), signal.SIGSEGV)
        else:
            for _ in range(100):  # max_requests: 40 per child
                capabilities(pool, slow)
        wait_for(lambda: replaced(before), 90, f"children replaced after the {cause}")  # noqa: B023
        first, _ = capabilities(pool, slow)
        assert first < WARM, f"after the {cause} the first request took {first:.3f} s"
