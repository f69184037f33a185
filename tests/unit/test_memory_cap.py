"""child.max_memory (memcap.py): which mechanism is chosen from the pool's cgroups, what a
leaf gets, how a kill is recognised; and what the pool does with a child killed at the cap.
The cgroup file systems here are directories shaped like them (no kernel, no root)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import structlog
from fakes import Answer, Crash

from fcgipool import memcap

LIMIT = 100 * 2**20


def fake_host(tmp_path: Path, *, v2_controllers: str = "", v1_memory: bool = False) -> Path:
    """A /proc/self and the cgroup mounts of a host: v2 at tmp/cg2 (the pool in /pool.service),
    v1 memory at tmp/cg1 (the pool in /box)."""
    proc = tmp_path / "proc"
    proc.mkdir()
    mounts = [f"41 31 0:38 / {tmp_path}/cg2 rw,relatime - cgroup2 cgroup2 rw"]
    groups = ["0::/pool.service"]
    own2 = tmp_path / "cg2" / "pool.service"
    own2.mkdir(parents=True)
    (own2 / "cgroup.controllers").write_text(v2_controllers + "\n")
    (own2 / "cgroup.subtree_control").write_text("\n")
    (own2 / "cgroup.procs").write_text("4242\n4243\n")
    if v1_memory:
        mounts.append(f"35 31 0:32 / {tmp_path}/cg1 rw,relatime - cgroup cgroup rw,memory")
        groups.insert(0, "4:memory:/box")
        (tmp_path / "cg1" / "box").mkdir(parents=True)
    (proc / "mountinfo").write_text("\n".join(mounts) + "\n")
    (proc / "cgroup").write_text("\n".join(groups) + "\n")
    return proc


def test_no_limit_is_no_cap(tmp_path):
    cap = memcap.choose(0, fake_host(tmp_path, v2_controllers="memory"))
    assert cap.mechanism == "off" and cap.enter(1) == memcap.Entry()


def test_a_delegated_v2_cgroup_gets_a_leaf_per_child_with_memory_max(tmp_path):
    cap = memcap.choose(LIMIT, fake_host(tmp_path, v2_controllers="cpu memory pids"))
    own = tmp_path / "cg2" / "pool.service"
    assert cap.mechanism == "cgroup2"
    assert (own / "cgroup.subtree_control").read_text() == "+memory"
    # the no-internal-processes rule: what lived in the pool's cgroup moved to a leaf
    assert (own / "supervisor" / "cgroup.procs").read_text() == "4243"  # the last write
    leaf = own / f"child-{os.getpid()}-7"
    leaf.mkdir()
    (leaf / "cgroup.procs").write_text("")
    (leaf / "memory.swap.max").write_text("max\n")  # the kernel makes these files
    (leaf / "memory.oom.group").write_text("0\n")
    entry = cap.enter(7)
    try:
        assert entry.procs_fd >= 0 and entry.address_space == 0
        assert (leaf / "memory.max").read_text() == str(LIMIT)
        assert (leaf / "memory.swap.max").read_text() == "0"
        assert (leaf / "memory.oom.group").read_text() == "1"
    finally:
        cap.entered(entry)
    assert not cap.killed(7)
    (leaf / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\n")
    assert cap.killed(7)
    assert cap.view() == {"mechanism": "cgroup2", "max_memory": LIMIT, "cgroup": str(own)}


def test_a_v2_cgroup_without_the_memory_controller_falls_back_to_v1_when_writable(tmp_path):
    cap = memcap.choose(LIMIT, fake_host(tmp_path, v2_controllers="hugetlb", v1_memory=True))
    assert cap.mechanism == "cgroup1"
    base = tmp_path / "cg1" / "box" / f"fcgipool-{os.getpid()}"
    assert base.is_dir(), "a group of its own under the pool's memory cgroup"
    leaf = base / "child-3"
    leaf.mkdir()
    (leaf / "cgroup.procs").write_text("")
    entry = cap.enter(3)
    cap.entered(entry)
    assert (leaf / "memory.limit_in_bytes").read_text() == str(LIMIT)
    assert not (leaf / "memory.memsw.limit_in_bytes").exists(), "no swap accounting here"
    (leaf / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert cap.killed(3)
    for name in ("memory.limit_in_bytes", "memory.oom_control", "cgroup.procs"):
        (leaf / name).unlink()  # a real cgroup's files go with it
    cap.close()
    assert not base.exists(), "the leaves and the pool's group are removed at stop"


def test_without_a_usable_cgroup_the_cap_is_the_address_space(tmp_path):
    cap = memcap.choose(LIMIT, fake_host(tmp_path, v2_controllers="cpu"))
    assert cap.mechanism == "rlimit"
    assert cap.enter(1) == memcap.Entry(address_space=LIMIT)
    assert not cap.killed(1)


def test_a_child_killed_at_the_cap_is_replaced_with_reason_max_memory(harness):
    h = harness({"child": {"max_memory": "100MiB"}})
    h.processes.behaviour = lambda params: Crash(0.1, signal.SIGKILL)
    h.processes.memory_kills.update(p.pid for p in h.programs())
    with structlog.testing.capture_logs() as logs:
        response = h.get("/grow?mb=500", method="POST", body=b"x")
    assert response.status == 502, "not repeatable: the web server gets a clean 502"
    h.until(lambda: h.pool.children.ready() == 2, within=5)
    assert h.pool.accounting.restarts["max_memory"] == 1
    assert h.pool.status()["pool"]["restarts"] == {"max_memory": 1}
    (exited,) = [e for e in logs if e["event"] == "child_exited"]
    assert exited["reason"] == "max_memory" and exited["uri"] == "/grow?mb=500"
    assert exited["pid"] in h.processes.memory_kills
    assert h.pool.status()["pool"]["memory_cap"] == {
        "mechanism": "off", "max_memory": 100 * 2**20, "cgroup": None}
    h.processes.behaviour = lambda params: Answer()
    assert h.get("/next").status == 200, "the next request is served; the pool stays up"


def test_groups_left_by_a_pool_killed_by_sigkill_are_removed_at_start(tmp_path):
    proc = fake_host(tmp_path, v1_memory=True)
    box = tmp_path / "cg1" / "box"
    dead = box / "fcgipool-999999999"  # no such pid
    (dead / "child-4").mkdir(parents=True)
    living = box / f"fcgipool-{os.getppid()}"
    (living / "child-1").mkdir(parents=True)
    assert memcap.choose(LIMIT, proc).mechanism == "cgroup1"
    assert not dead.exists(), "a dead pool's empty groups go"
    assert (living / "child-1").exists(), "a living pool's stay"
