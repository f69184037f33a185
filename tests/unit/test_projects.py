"""Projects (projects.py facts, children.py acting): change detection and refresh out of
rotation or by a warmed replacement, warm sets carried over to replacements, and the
`fcgipool projects` commands, on fake children that cache projects as QGIS 3.22 does (a
changed file is reloaded by the next request that names it, which then takes the load
time: FakeProcesses.project_loads)."""

from __future__ import annotations

import json
import os
import signal

import structlog

from fcgipool.admin import ControlServer
from fcgipool.child import State

LOAD = 1.5  # seconds a fake child takes to load the slow project


def projects(tmp_path, *names: str) -> list[str]:
    paths = []
    for name in names:
        path = tmp_path / f"{name}.qgs"
        path.write_text(f"<qgis>{name}</qgis>")
        paths.append(str(path))
    return paths


def touch(path: str, text: str = "<qgis>changed</qgis>") -> None:
    """A new version, written in place (mtime moved on, as on a slow file system too)."""
    before = os.stat(path).st_mtime_ns
    with open(path, "w") as file:
        file.write(text)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def query(path: str) -> str:
    return f"/ows?MAP={path}&SERVICE=WMS&REQUEST=GetCapabilities"


def visitor_loads(h, path: str) -> int:
    """Loads of ``path`` that a visitor's request paid for (not a warm-up)."""
    return sum(1 for p in h.processes.started for project, probe in p.loads
               if project == path and not probe)  # fmt: skip


def holders(h, path: str) -> list[int]:
    return h.pool.children.holders().get(path, [])


def test_warm_loads_a_project_on_every_child_out_of_rotation_and_pins_it(harness, tmp_path):
    h = harness()
    (slow,) = projects(tmp_path, "slow")
    h.processes.project_loads = {slow: LOAD}
    problem, count = h.pool.project_command("warm", slow)
    assert (problem, count) == ("", 2)
    h.until(lambda: len(holders(h, slow)) == 2, 10, "both children loaded it")
    assert visitor_loads(h, slow) == 0
    assert h.pool.projects.by_path[slow].load_seconds == LOAD
    # One child at a time: the other served meanwhile.
    assert h.get(query(slow)).status == 200 and visitor_loads(h, slow) == 0
    # Pinned: a replacement loads it before it takes traffic.
    victim = h.pool.children.all[0]
    h.processes.programs[victim.pid].exit(signal.SIGSEGV)
    h.until(lambda: victim not in h.pool.children.all and len(holders(h, slow)) == 2
            and h.pool.children.ready() == 2, 30)  # fmt: skip
    assert visitor_loads(h, slow) == 0
    assert h.pool.projects.pinned() == [slow]
    h.pool.project_command("unpin", slow)
    assert h.pool.projects.pinned() == []


def test_a_changed_project_is_reloaded_by_warmed_replacements_before_a_visitor_pays(
        harness, tmp_path):
    """The default fixed pool (min_workers = workers): no child may leave rotation, so each
    child holding the project is replaced, one at a time, by one that loads what it held."""
    h = harness()
    slow, other = projects(tmp_path, "slow", "other")
    h.processes.project_loads = {slow: LOAD, other: 0.2}
    h.pool.project_command("warm", slow)
    h.until(lambda: len(holders(h, slow)) == 2, 10)
    assert h.get(query(other)).status == 200
    h.pool.project_command("unpin", slow)  # held because it was served, not pinned
    before = {child.pid for child in h.pool.children.all}
    touch(slow)
    h.until(lambda: not {c.pid for c in h.pool.children.all} & before, 30,
            "both children replaced")  # fmt: skip
    h.until(lambda: len(holders(h, slow)) == 2, 30)
    assert h.pool.children.ready() == 2
    assert h.pool.accounting.restarts["project_changed"] == 2
    project = h.pool.projects.by_path[slow]
    assert project.reloads == 2
    for _ in range(4):
        assert h.get(query(slow)).status == 200
    assert h.get(query(other)).status == 200
    assert visitor_loads(h, slow) == 0 and visitor_loads(h, other) == 1
    # The replacement that inherited "other" loaded it too, before traffic.
    assert len(holders(h, other)) == 1


def test_never_fewer_ready_children_than_the_minimum_during_a_refresh(harness, tmp_path):
    """An adaptive pool above its minimum reloads in place, one child at a time, and keeps
    the other serving."""
    h = harness({"pool": {"workers": 3, "min_workers": 2, "max_workers": 3}})
    (slow,) = projects(tmp_path, "slow")
    h.processes.project_loads = {slow: LOAD}
    h.pool.project_command("warm", slow)
    h.until(lambda: len(holders(h, slow)) == 3, 20)
    h.pool.project_command("unpin", slow)
    pids = sorted(child.pid for child in h.pool.children.all)
    touch(slow)
    lowest = 3
    seen_loading = 0

    def refreshed() -> bool:
        nonlocal lowest, seen_loading
        lowest = min(lowest, h.pool.children.ready())
        seen_loading = max(seen_loading, h.pool.children.loading())
        return h.pool.projects.by_path[slow].reloads == 3

    h.until(refreshed, 30, "three reloads")
    assert sorted(child.pid for child in h.pool.children.all) == pids, "reloaded in place"
    assert lowest == 2 and seen_loading == 1
    assert len(holders(h, slow)) == 3 and visitor_loads(h, slow) == 0


def test_a_busy_child_reloads_when_its_request_ends_not_before(harness, tmp_path):
    h = harness({"pool": {"workers": 2, "min_workers": 1, "max_workers": 2}})
    (slow,) = projects(tmp_path, "slow")
    h.processes.project_loads = {slow: LOAD}
    assert h.get(query(slow)).status == 200  # a visitor loads it the first time
    web = h.connect()
    long = web.request(query(slow) + "&sleep=5")
    h.busy()
    touch(slow)
    h.run(2.0)
    (child,) = [c for c in h.pool.children.all if c.state is State.BUSY]
    assert slow in child.stale and long.end is None
    h.until(lambda: long.end is not None, 10)
    h.until(lambda: h.pool.projects.by_path[slow].reloads == 1, 10, "reloaded")
    assert h.pool.projects.by_path[slow].reloads == 1
    assert h.get(query(slow)).status == 200
    assert visitor_loads(h, slow) == 1, "only the first visitor, before any change"


def test_a_project_file_that_disappears_is_forgotten_not_reloaded(harness, tmp_path):
    h = harness()
    (gone,) = projects(tmp_path, "gone")
    h.processes.project_loads = {gone: 0.5}
    assert h.get(query(gone)).status == 200
    assert holders(h, gone)
    os.unlink(gone)
    with structlog.testing.capture_logs() as logged:
        h.run(3.0)
    assert holders(h, gone) == [] and h.pool.projects.by_path[gone].missing
    assert [e["project"] for e in logged if e["event"] == "project_gone"] == [gone]
    assert h.pool.projects.by_path[gone].reloads == 0
    assert h.get(query(gone)).status == 200  # what the child answers; no loop, no crash
    assert h.pool.children.ready() == 2


def test_replacements_inherit_the_warm_set_most_requested_first_within_memory(
        harness, tmp_path):
    h = harness({"pool": {"workers": 1}, "projects": {"memory": 2}})
    a, b, c = projects(tmp_path, "a", "b", "c")
    h.processes.project_loads = {a: 0.3, b: 0.3, c: 0.3}
    for path, times in ((a, 3), (b, 1), (c, 2)):
        for _ in range(times):
            assert h.get(query(path)).status == 200
    (child,) = h.pool.children.all
    assert list(child.projects) == [b, c]  # memory 2: the two served last
    h.pool.children.recycle(child, "max_requests")
    h.until(lambda: child not in h.pool.children.all and h.pool.children.ready() == 1, 30)
    (new,) = h.pool.children.all
    assert list(new.projects) == [b, c][::-1] or set(new.projects) == {b, c}
    program = h.processes.programs[new.pid]
    assert [project for project, _ in program.loads] == [c, b], "most requested first"
    assert all(probe for _, probe in program.loads)


def test_the_warm_budget_bounds_what_a_replacement_loads(harness, tmp_path):
    h = harness({"pool": {"workers": 1}, "projects": {"warm_budget": 1.0}})
    huge, small = projects(tmp_path, "huge", "small")
    h.processes.project_loads = {huge: 5.0, small: 0.4}
    h.pool.projects.loaded(huge, 5.0)
    h.pool.projects.loaded(small, 0.4)
    for path in (huge, huge, small):
        assert h.get(query(path)).status == 200
    (child,) = h.pool.children.all
    h.pool.children.recycle(child, "max_lifetime")
    h.until(lambda: child not in h.pool.children.all and h.pool.children.ready() == 1, 30)
    (new,) = h.pool.children.all
    assert [p for p, _ in h.processes.programs[new.pid].loads] == [small]


def test_a_warm_set_project_that_fails_does_not_fail_the_child(harness, tmp_path):
    h = harness({"pool": {"workers": 1}})
    (broken,) = projects(tmp_path, "broken")
    assert h.get(query(broken)).status == 200
    h.processes.behaviour = lambda params: __import__("fakes").Answer(500, b"broken\n")
    (child,) = h.pool.children.all
    h.pool.children.recycle(child, "max_requests")
    h.until(lambda: child not in h.pool.children.all and h.pool.children.ready() == 1, 30)
    (new,) = h.pool.children.all
    assert broken not in new.projects
    assert h.pool.children.failure_pressure() == 0


def test_project_commands_their_answers_and_errors(harness, tmp_path):
    outside = tmp_path / "outside"
    root = tmp_path / "root"
    root.mkdir()
    outside.mkdir()
    h = harness({"projects": {"allowed_roots": [str(root)]}})
    (inside,) = projects(root, "inside")
    (elsewhere,) = projects(outside, "elsewhere")
    control = ControlServer(h.pool, str(tmp_path / "ctl"))

    def ask(**command) -> dict:
        return control.execute(json.dumps({"command": "projects", **command}).encode())

    assert ask()["projects"] == []
    assert h.get(query(inside)).status == 200
    (row,) = ask()["projects"]
    assert row["path"] == inside and row["requests"] == 1 and row["pinned"] is False
    assert len(row["children"]) == 1 and row["version"] == os.stat(inside).st_mtime_ns / 1e9
    assert ask(action="warm", path=inside) == {"ok": True, "action": "warm", "path": inside,
                                               "children": 1}  # fmt: skip
    h.until(lambda: len(holders(h, inside)) == 2, 10)
    assert ask()["projects"][0]["pinned"] is True
    for action, path, why in (
        ("warm", elsewhere, "outside the allowed roots"),
        ("warm", str(root / "none.qgs"), "no such file"),
        ("warm", "/etc/passwd", "not a project file"),
        ("refresh", str(root / "never.qgs"), "not a project the pool has seen"),
        ("fly", inside, "unknown action"),
    ):
        answer = ask(action=action, path=path)
        assert answer["ok"] is False and answer["exit"] == 2 and why in answer["error"]
    assert ask(action="refresh")["exit"] == 2
    answer = ask(action="refresh", path=inside)
    assert answer["ok"] and answer["children"] == 2
    h.until(lambda: h.pool.projects.by_path[inside].reloads == 2, 30)
    held = set(holders(h, inside))
    answer = ask(action="drop", path=inside)
    assert answer["ok"] and answer["children"] == 2
    h.until(lambda: not held & {c.pid for c in h.pool.children.all}
            and h.pool.children.ready() == 2, 30)  # fmt: skip
    assert holders(h, inside) == []
    (row,) = ask()["projects"]
    assert row["dropped"] and not row["pinned"]
    assert h.pool.accounting.restarts["project_dropped"] == 2


def test_a_child_that_hangs_or_dies_while_loading_is_replaced_and_nothing_is_lost(
        harness, tmp_path):
    from fakes import Hang, by_uri

    h = harness({"pool": {"workers": 3, "min_workers": 1, "max_workers": 3},
                 "child": {"start_timeout": 5.0}})  # fmt: skip
    (slow,) = projects(tmp_path, "slow")
    h.pool.project_command("warm", slow)
    h.until(lambda: len(holders(h, slow)) == 3, 20)
    pids = {child.pid for child in h.pool.children.all}
    h.processes.behaviour = lambda params: (
        Hang() if params.get(b"HTTP_USER_AGENT") == b"fcgipool-probe" else by_uri(params))
    touch(slow)
    h.until(lambda: h.pool.children.loading() == 1, 5, "a child loading")
    (loading,) = [c for c in h.pool.children.all if c.state is State.LOADING]
    answers = [h.get(query(slow) + "&sleep=0.1") for _ in range(3)]  # served meanwhile
    assert [a.status for a in answers] == [200] * 3
    h.until(lambda: loading not in h.pool.children.all, 20, "the hung child stopped")
    assert h.pool.accounting.restarts["load_timeout"] == 1
    h.processes.behaviour = by_uri
    second = next(c for c in h.pool.children.all if c.state is State.LOADING or slow in c.stale)
    h.processes.programs[second.pid].exit(signal.SIGKILL)  # dies while it waits or loads
    h.until(lambda: h.pool.children.ready() == 3 and not h.pool.children.pending
            and not pids & {c.pid for c in h.pool.children.all if slow in c.stale}, 60)
    assert h.get(query(slow)).status == 200
    assert h.pool.lifecycle.value == "running"


def test_a_stop_during_a_refresh_starts_nothing_more(harness, tmp_path):
    h = harness({"pool": {"workers": 3, "min_workers": 1, "max_workers": 3}})
    (slow,) = projects(tmp_path, "slow")
    h.processes.project_loads = {slow: 5.0}
    h.pool.project_command("warm", slow)
    h.until(lambda: len(holders(h, slow)) == 3, 60)
    touch(slow)
    h.until(lambda: h.pool.children.loading() == 1, 5)
    started = len(h.processes.started)
    h.pool.stop(fast=False)
    assert h.wait_stopped(30) == 0
    assert len(h.processes.started) == started


def test_a_visitors_cold_request_teaches_the_load_time_and_the_budget_counts_unknown_loads(
        harness, tmp_path):
    h = harness({"pool": {"workers": 1}, "projects": {"warm_budget": 2.5}})
    slow, *others = projects(tmp_path, "slow", "a", "b", "c")
    h.processes.project_loads = {slow: LOAD}
    assert h.get(query(slow)).status == 200  # cold: the visitor waits for the load
    assert h.get(query(slow)).status == 200  # warm
    assert abs(h.pool.projects.by_path[slow].load_seconds - LOAD) < 0.01
    for path in others:  # loads never measured (fake loads take no time): 1 s each
        h.pool.projects.seen(path).requests += 10
    assert h.pool.projects.warm_set([slow, *others]) == others[:2]


def test_a_child_a_visitor_already_brought_to_the_new_version_is_not_replaced(harness, tmp_path):
    """QGIS reloads a changed file for the first request that names it: a child whose
    request for the project began after the file changed holds the new version."""
    h = harness()
    h.pool.children.wall = lambda: h.now() + 1.7e9  # file times, on the pool's clock
    slow, _ = projects(tmp_path, "slow", "other")
    h.processes.project_loads = {slow: LOAD}
    h.pool.project_command("warm", slow)
    h.until(lambda: len(holders(h, slow)) == 2, 10)
    h.pool.project_command("unpin", slow)
    h.run(h.pool.config.projects.check_interval * 2)  # the versions as they are now, seen
    with open(slow, "w") as file:
        file.write("<qgis>new</qgis>")
    written = h.now() + 1.7e9
    os.utime(slow, (written, written))
    first = h.pool.children.all[-1]
    visitor = h.get(query(slow))  # before the pool notices: this visitor pays the reload
    assert visitor.status == 200 and visitor_loads(h, slow) == 1
    h.run(3.0)
    restarts = h.pool.accounting.restarts["project_changed"]
    assert restarts == 1, "only the child the visitor did not reach is replaced"
    fresh = [c for c in h.pool.children.all if slow in c.projects and not c.stale]
    assert fresh and (first in fresh or visitor_loads(h, slow) == 1)
