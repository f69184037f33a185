"""The repository's systemd units, unchanged, under a real systemd booted in a container.

tests/test_deploy.py checks the units with `systemd-analyze verify` and runs their ExecStart
under systemd-socket-activate; here a real systemd (PID 1 of a `systemd-nspawn --boot`
container) runs them: socket activation, Type=notify readiness, `systemctl reload`,
Restart= after a SIGKILL, and `systemctl stop`.

The container's root is a minimal Debian (debootstrap --variant=minbase: systemd and
python3, no procps, so no /bin/kill) of the host's release, built once into
/var/cache/fcgipool-tests/ (FCGIPOOL_TEST_CACHE) under a name derived from what goes in
it; the build goes to a temporary directory renamed into place when complete, so an
interrupted build is never used.  Each run boots it with --volatile=overlay: whatever the
container writes goes to a tmpfs and the cached root stays as built.  The repository (and
its virtualenv, whose python is /usr/bin/python3) is bind-mounted read-only at
/opt/fcgipool-test/ (not at its host path, which may be under /tmp, hidden from the service
by PrivateTmp=yes), /usr/local/bin/fcgipool runs the package from there, and the children
are tests/apps/wsgi_app.py run as `nobody`.  The container shares the host's network and pid
numbers differ: the test reaches the pool's sockets as /proc/LEADER/root/run/fcgipool/...
and runs systemctl inside with nsenter.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import APPS, REPO, WSGI_APP, to_toml, wait_for
from fcgipool import client

UNITS = REPO / "systemd"
# Where the container sees the checkout and its virtualenv: not at their host paths, which
# may lie under /tmp (a CI clone), hidden from the service by the unit's PrivateTmp=yes.
INSIDE = Path("/opt/fcgipool-test")
SOURCE = INSIDE / "repo"
VENV = (SOURCE / Path(sys.prefix).relative_to(REPO) if Path(sys.prefix).is_relative_to(REPO)
        else INSIDE / "venv")  # fmt: skip
PYTHON = VENV / "bin" / "python"  # the venv's python: /usr/bin/python3 with its site-packages
CACHE = Path(os.environ.get("FCGIPOOL_TEST_CACHE", "/var/cache/fcgipool-tests"))
MIRROR = "http://deb.debian.org/debian"
VARIANT = "minbase"
PACKAGES = ("systemd", "python3")
# Change this when the way the root is made changes: the cache key follows it.
RECIPE = 1
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
WARMUP = 2.0  # seconds each child's warm-up request takes: the pool is ready after it
CAPABILITIES = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_KILL": 5,
                "CAP_SETGID": 6, "CAP_SETUID": 7}


# ---------------------------------------------------------------------------- the root


def host_codename() -> str:
    text = Path("/etc/os-release").read_text()
    match = re.search(r"^VERSION_CODENAME=\"?(\w+)\"?$", text, re.M)
    assert match, "no VERSION_CODENAME in /etc/os-release"
    return match.group(1)


def mountpoints_under(path: Path) -> list[str]:
    """Mount points below ``path`` (debootstrap mounts /proc and /sys in its target; a
    build killed half-way leaves them), deepest first."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = re.sub(r"\\(\d{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
        if point.startswith(f"{path}/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    for point in mountpoints_under(path):
        subprocess.run(["umount", "--lazy", point], check=True, timeout=30)
    shutil.rmtree(path)


def container_root() -> Path:
    """The cached root, built here when absent (about 80 s, once)."""
    suite = host_codename()
    recipe = {"suite": suite, "variant": VARIANT, "packages": PACKAGES, "mirror": MIRROR,
              "recipe": RECIPE}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    name = f"nspawn-{suite}-{key}"
    root = CACHE / name
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session building it: wait for it
        if root.is_dir():
            return root
        partial = CACHE / f"{name}.partial"
        if partial.exists():  # an interrupted build
            remove_tree(partial)
        build = subprocess.run(
            ["debootstrap", f"--variant={VARIANT}", f"--include={','.join(PACKAGES)}",
             suite, str(partial), MIRROR],
            # The lock stays held while debootstrap runs, even if this process dies first.
            pass_fds=(lock.fileno(),), capture_output=True, text=True, timeout=900)
        assert build.returncode == 0, f"debootstrap failed:\n{build.stdout[-3000:]}{build.stderr}"
        assert not mountpoints_under(partial), mountpoints_under(partial)
        (partial / "etc" / "fcgipool-test-root.json").write_text(json.dumps(recipe) + "\n")
        partial.rename(root)
    return root


# ---------------------------------------------------------------------------- the container


class Container:
    """A booted systemd-nspawn container; commands run inside with nsenter."""

    def __init__(self, root: Path, log: Path):
        self.log_path = log
        self.machine = f"fcgipool-test-{os.getpid()}"
        binds = {REPO: SOURCE}
        if not Path(sys.prefix).is_relative_to(REPO):
            binds[Path(sys.prefix)] = VENV
        # --register=no --keep-unit: no systemd-machined and no system bus on the host
        # needed (this host's PID 1 need not be systemd).  The container gets the unified
        # cgroup hierarchy (cgroup v2 only) as a Debian 12 host has it, whatever the host's
        # layout.
        command = ["systemd-nspawn", "--boot", f"--directory={root}",
                   f"--machine={self.machine}", "--register=no", "--keep-unit",
                   "--volatile=overlay", "--console=read-only",
                   *(f"--bind-ro={host}:{inside}" for host, inside in binds.items())]
        self.binds = list(binds.values())
        self.leader = 0
        self.root = Path("/nonexistent")
        self.volatile: Path | None = None
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"},
                start_new_session=True)

    def boot(self) -> None:
        """Wait until the container's systemd has finished booting."""
        self.leader = wait_for(self._find_leader, 60, "the container's systemd")
        self.root = Path(f"/proc/{self.leader}/root")
        self.volatile = self._volatile_dir()

        def booted() -> str | None:
            # Fails ("offline", or nothing) until PID 1 listens on its private socket.
            state = self.run("systemctl", "is-system-running", "--wait", timeout=120)
            return None if state.stdout.strip() in ("", "offline", "unknown") else state.stdout

        state = wait_for(booted, 120, "the container to boot").strip()
        assert state == "running", (state, self.run("systemctl", "--failed").stdout, self.log())
        for path in self.binds:
            self._make_traversable(path)

    def _find_leader(self) -> int:
        if self.process.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited:\n{self.log()}")
        with contextlib.suppress(OSError):
            for pid in Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children") \
                    .read_text().split():
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
        return 0

    def _volatile_dir(self) -> Path | None:
        """The host directory of --volatile=overlay's tmpfs, to remove if nspawn cannot."""
        for line in Path(f"/proc/{self.leader}/mountinfo").read_text().splitlines():
            match = re.search(r"upperdir=(/[^,]+)/upper", line)
            if match:
                return Path(match.group(1))
        return None

    def _make_traversable(self, path: Path) -> None:
        """The children run as nobody: the directories above a bind mount (the container's
        own, in the overlay, e.g. /root) must let it through; the repository's own modes
        are those of the checkout."""
        for parent in path.parents:
            if parent == Path("/"):
                continue
            inside = self.root / parent.relative_to("/")
            os.chmod(inside, inside.stat().st_mode | 0o001)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def run(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["nsenter", f"--target={self.leader}", "--all", "env", "-i", f"PATH={PATH}",
             "LANG=C.UTF-8", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", *command],
            capture_output=True, text=True, timeout=timeout)

    def check(self, *command: str, timeout: float = 60) -> str:
        result = self.run(*command, timeout=timeout)
        assert result.returncode == 0, (f"{' '.join(command)}: exit {result.returncode}\n"
                                        f"{result.stdout}{result.stderr}")
        return result.stdout

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.check("systemctl", "show", unit, *(f"--property={p}" for p in properties))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def processes(self) -> dict[int, str]:
        """The container's processes (its own pid numbers) and their command lines."""
        found = {}
        for entry in (self.root / "proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    found[int(entry.name)] = (entry / "cmdline").read_bytes() \
                        .replace(b"\0", b" ").decode(errors="replace")
        return found

    def host_pid(self, pid: int) -> int:
        """The host's number of the container's process ``pid``."""
        namespace = os.readlink(f"/proc/{self.leader}/ns/pid")
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "pid") != namespace:
                    continue
                status = (entry / "status").read_text()
                numbers = re.search(r"^NSpid:\s+(.*)$", status, re.M).group(1).split()
                if int(numbers[-1]) == pid:
                    return int(entry.name)
        raise AssertionError(f"no host process for the container's pid {pid}")

    def stop(self) -> None:
        """Power the container off (SIGTERM makes nspawn ask its systemd to), or kill it;
        its mounts live in its own mount namespace and go with it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                if self.leader:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.leader, signal.SIGKILL)  # the whole pid namespace
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.volatile is not None and self.volatile.exists():
            shutil.rmtree(self.volatile, ignore_errors=True)


@pytest.fixture(scope="module")
def box(tmp_path_factory) -> Iterator[Container]:
    """The booted container with the units installed as the unit file's header says."""
    root = container_root()
    container = Container(root, tmp_path_factory.mktemp("nspawn") / "console.log")
    try:
        container.boot()
        # The container is the minimal system the unit must cope with: no procps.
        assert not (container.root / "usr/bin/kill").exists()
        assert not (container.root / "bin/kill").exists()
        inside = container.check("/usr/bin/python3", "-c",
                                 "import sys; print(*sys.version_info[:2])").split()
        assert [int(n) for n in inside] == list(sys.version_info[:2]), \
            "the container's /usr/bin/python3 must be the virtualenv's Python"
        system = container.root / "etc" / "systemd" / "system"
        for name in ("fcgipool@.service", "fcgipool@.socket"):
            shutil.copyfile(UNITS / name, system / name)  # as they are
            os.chmod(system / name, 0o644)
        # The venv's own script names the venv's host path: run the package from the
        # checkout instead (the editable install points at the host path too).
        wrapper = container.root / "usr/local/bin/fcgipool"
        wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={SOURCE} exec {PYTHON} -m fcgipool "$@"\n')
        wrapper.chmod(0o755)
        (container.root / "etc/fcgipool").mkdir()
        container.check("systemctl", "daemon-reload")
        yield container
    finally:
        container.stop()


# ---------------------------------------------------------------------------- a pool


def pool_config(mark: str) -> dict:
    """Two children of the WSGI test app as nobody, each warmed up for WARMUP seconds;
    ``mark`` shows in their environment (which config a child was started with)."""
    return {
        "pool": {"workers": 2},
        "child": {"command": [str(PYTHON), str(SOURCE / WSGI_APP.relative_to(REPO))],
                  "cwd": str(SOURCE / APPS.relative_to(REPO)),
                  "user": "nobody", "env": {"MARK": mark},
                  "warmup": [f"/warm?sleep={WARMUP}"]},
        "log": {"level": "info"},
    }


class Pool:
    """fcgipool@NAME seen from the host."""

    def __init__(self, box: Container, name: str):
        self.box = box
        self.name = name
        self.service = f"fcgipool@{name}.service"
        self.socket_unit = f"fcgipool@{name}.socket"
        self.config = box.root / "etc" / "fcgipool" / f"{name}.toml"
        self.socket = box.root / "run" / "fcgipool" / f"{name}.sock"
        self.control = box.root / "run" / "fcgipool" / f"{name}.ctl"

    def write(self, config: dict | str) -> None:
        self.config.write_text(config if isinstance(config, str) else to_toml(config))

    def state(self, unit: str | None = None) -> str:
        return self.box.show(unit or self.service, "ActiveState")["ActiveState"]

    def show(self, *properties: str) -> dict[str, str]:
        return self.box.show(self.service, *properties)

    def request(self, uri: str = "/hello", timeout: float = 30) -> client.Response:
        return client.request(f"unix:{self.socket}", uri, timeout=timeout)

    def pid(self) -> int:
        """The pid of the child that answers."""
        response = self.request()
        assert response.status == 200, response
        return int(response.headers["X-Pid"])

    def mark(self) -> str:
        """MARK in the environment of the child that answers: its config."""
        response = self.request("/?env=1")
        assert response.status == 200, response
        return json.loads(response.body)["MARK"]

    def status(self) -> dict:
        """`fcgipool status --json` through the control socket."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.control))
            sock.sendall(b'{"command": "status"}\n')
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return json.loads(data)["status"]

    def children(self) -> dict[int, str]:
        return {row["pid"]: row["state"] for row in self.status()["children"]}

    def journal(self, tail: int | None = 6000) -> str:
        """The units' journal: its last ``tail`` characters (for messages), or all of it."""
        text = self.box.run("journalctl", "--no-pager", "-o", "short-precise",
                            f"--unit={self.service}", f"--unit={self.socket_unit}").stdout
        return text[-tail:] if tail else text

    def start(self) -> None:
        """systemctl start: returns once the pool sent READY=1."""
        self.box.check("systemctl", "start", self.service, timeout=120)
        assert self.state() == "active", self.journal()


@pytest.fixture
def pool_unit(box) -> Iterator[Callable[[str, dict], Pool]]:
    made: list[Pool] = []

    def make(name: str, config: dict) -> Pool:
        pool = Pool(box, name)
        pool.write(config)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        box.run("systemctl", "disable", "--now", pool.socket_unit, pool.service, timeout=120)
        box.run("systemctl", "reset-failed", pool.socket_unit, pool.service)
        pool.config.unlink(missing_ok=True)


def dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] in "ZX"
    except FileNotFoundError:
        return True


def unit_reload_lines() -> list[str]:
    text = (UNITS / "fcgipool@.service").read_text()
    return re.findall(r"^ExecReload=(.*)$", text, re.M)


# ---------------------------------------------------------------------------- the checks


def test_socket_activation_starts_the_hardened_pool(box, pool_unit):
    pool = pool_unit("activated", pool_config("one"))
    box.check("systemctl", "enable", "--now", pool.socket_unit)
    assert pool.state(pool.socket_unit) == "active"
    assert pool.state() == "inactive", "nothing may start the pool before a connection"
    assert pool.socket.is_socket() and pool.socket.stat().st_mode & 0o777 == 0o660
    # The first connection starts the service; the request waits in the backlog and is
    # answered by the first child ready (READY=1 follows when both are).
    response = pool.request("/hello", timeout=60)
    assert response.status == 200 and response.body.startswith(b"hello from "), response
    wait_for(lambda: pool.state() == "active", 30, "the service to be active")
    assert "sockets_inherited" in pool.journal(tail=None)
    # The unit's hardening is in force, unchanged, in the pool and its children.
    main = int(pool.show("MainPID")["MainPID"])
    children = pool.children()
    assert len(children) == 2 and set(children.values()) == {"idle"}, children
    unit = (UNITS / "fcgipool@.service").read_text()
    names = re.search(r"^CapabilityBoundingSet=(.*)$", unit, re.M).group(1).split()
    bounding = sum(1 << CAPABILITIES[name] for name in names)
    for pid in (main, *children):
        status = (box.root / "proc" / str(pid) / "status").read_text()
        fields = dict(re.findall(r"^(\w+):\s+(.*)$", status, re.M))
        assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2", (pid, fields)
        assert int(fields["CapBnd"], 16) == bounding, (pid, fields["CapBnd"])
        mounts = (box.root / "proc" / str(pid) / "mountinfo").read_text()
        assert re.search(r"^\S+ \S+ \S+ \S+ /usr ro,", mounts, re.M), "ProtectSystem=full"
        assert f"-{pool.service}-" in mounts, "PrivateTmp=yes"
        uid = fields["Uid"].split()[0]
        assert uid == ("0" if pid == main else "65534"), (pid, uid)


def test_the_unit_is_active_only_once_the_pool_is_ready(box, pool_unit):
    pool = pool_unit("notify", pool_config("one"))
    box.check("systemctl", "start", "--no-block", pool.service)
    seen: list[tuple[str, tuple[str, ...]]] = []

    def sample() -> bool:
        state = pool.state()
        with contextlib.suppress(OSError):  # the control socket is not there at first
            seen.append((state, tuple(sorted(pool.children().values()))))
        assert state in ("inactive", "activating", "active"), (state, pool.journal())
        assert not (state == "inactive" and seen and seen[-1][0] != "inactive"), seen
        return state == "active"

    wait_for(sample, 60, "the unit to become active")
    # While the children were warming up, the unit was activating; it became active only
    # once both were ready (READY=1 of Type=notify).
    assert ("activating", ("starting", "starting")) in seen, seen
    assert all(children == ("idle", "idle") for state, children in seen if state == "active")
    times = pool.show("ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    waited = (int(times["ActiveEnterTimestampMonotonic"])
              - int(times["ExecMainStartTimestampMonotonic"])) / 1e6
    assert waited >= WARMUP, f"active {waited:.2f} s after the start: before the warm-up ended"
    assert pool.request().status == 200


def test_systemctl_reload_replaces_the_children_without_failing_a_request(box, pool_unit):
    pool = pool_unit("reload", pool_config("one"))
    pool.start()
    old = set(pool.children())
    assert pool.mark() == "one"
    pool.write(pool_config("two"))
    answers: list[int] = []
    failures: list[str] = []
    done = threading.Event()

    def load() -> None:
        while not done.is_set():
            try:
                response = pool.request("/loop?sleep=0.02", timeout=30)
            except Exception as error:  # every failure counts
                failures.append(repr(error))
                continue
            if response.status != 200:
                failures.append(f"status {response.status}: {response.body[:200]!r}")
            else:
                answers.append(int(response.headers["X-Pid"]))

    # Two clients at once, so that both children are busy and the queue is used.
    threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(answers) >= 10, 30, "requests before the reload")
        started = time.monotonic()
        result = box.run("systemctl", "reload", pool.service, timeout=120)
        took = time.monotonic() - started
        assert result.returncode == 0, (result.stderr, pool.journal())
        # `systemctl reload` returned only once every child had been replaced: the pool
        # sent RELOADING=1 before `fcgipool reload` exited, so systemd waited for READY=1.
        new = pool.children()
        assert pool.state() == "active"
        assert len(new) == 2 and not set(new) & old, (old, new, pool.journal())
        assert set(new.values()) <= {"idle", "busy"}, new  # ready, serving the load
        assert took >= WARMUP, took
        count = len(answers)
        wait_for(lambda: len(answers) >= count + 10, 30, "requests after the reload")
    finally:
        done.set()
        for thread in threads:
            thread.join(60)
    assert failures == [], failures[:5]
    # The requests ran across the reload: answered by old children and by new ones.
    assert set(answers) & old and set(answers) & set(new), (old, new, set(answers))
    assert {pool.mark() for _ in range(4)} == {"two"}
    assert "Reloaded fcgipool@reload.service" in pool.journal(tail=None)


def test_a_bad_config_makes_reload_fail_and_the_pool_keeps_serving(box, pool_unit):
    pool = pool_unit("bad", pool_config("one"))
    pool.start()
    before = pool.children()
    generation = pool.status()["pool"]["generation"]
    pool.write(to_toml(pool_config("two")).replace("workers = 2", 'workers = "many"'))
    result = box.run("systemctl", "reload", pool.service, timeout=120)
    assert result.returncode != 0, result
    # Each ExecReload line on its own refuses the file: the control socket's reload too
    # (when run without the check-config line before it).
    for line in unit_reload_lines():
        command = line.replace("%i", pool.name).split()
        alone = box.run(*command)
        assert alone.returncode != 0 and "pool.workers" in alone.stderr, (line, alone)
    # The pool goes on with its old config and children, and is not left reloading.
    assert pool.state() == "active", pool.journal()
    assert pool.children() == before
    assert pool.status()["pool"]["generation"] == generation
    for _ in range(4):
        assert pool.mark() == "one" and pool.pid() in before
    # Once the file is fixed, a reload works again.
    pool.write(pool_config("two"))
    box.check("systemctl", "reload", pool.service, timeout=120)
    assert not set(pool.children()) & set(before)
    assert pool.mark() == "two"


def test_sigkill_of_the_pool_restarts_it_and_keeps_the_socket(box, pool_unit):
    pool = pool_unit("crash", pool_config("one"))
    box.check("systemctl", "enable", "--now", pool.socket_unit)
    pool.start()
    inode = pool.socket.stat().st_ino
    listening_since = box.show(pool.socket_unit, "ActiveEnterTimestampMonotonic")
    before = pool.show("MainPID", "NRestarts")
    assert before["NRestarts"] == "0"
    old_children = set(pool.children())
    os.kill(box.host_pid(int(before["MainPID"])), signal.SIGKILL)

    def restarted() -> dict[str, str] | None:
        now = pool.show("MainPID", "NRestarts", "ActiveState")
        return now if now["ActiveState"] == "active" and now["MainPID"] != "0" \
            and now["MainPID"] != before["MainPID"] else None

    # Back by itself (Restart=on-failure), with no connection to trigger the socket.
    after = wait_for(restarted, 60, "the pool to be restarted")
    assert after["NRestarts"] == "1", (after, pool.journal())
    assert "Scheduled restart job" in pool.journal(tail=None)
    # The same listening socket, held by systemd throughout; the old children are gone.
    assert pool.socket.stat().st_ino == inode
    assert box.show(pool.socket_unit, "ActiveEnterTimestampMonotonic") == listening_since
    assert pool.state(pool.socket_unit) == "active"
    assert not set(pool.children()) & old_children
    assert not old_children & set(box.processes())
    assert pool.request().status == 200
    # A connection made while the pool is dead waits in the backlog and is served by the
    # next one.
    main = int(pool.show("MainPID")["MainPID"])
    host_pid = box.host_pid(main)
    os.kill(host_pid, signal.SIGKILL)
    wait_for(lambda: dead(host_pid), 10, "the pool to die")
    response = pool.request("/hello", timeout=60)
    assert response.status == 200, response
    assert pool.show("MainPID")["MainPID"] != str(main)
    assert pool.socket.stat().st_ino == inode


def test_systemctl_stop_leaves_nothing_behind(box, pool_unit):
    pool = pool_unit("stop", pool_config("one"))
    box.check("systemctl", "enable", "--now", pool.socket_unit)
    assert pool.request("/hello", timeout=60).status == 200  # socket-activated
    main = int(pool.show("MainPID")["MainPID"])
    pids = {main, *pool.children()}
    runtime = box.root / "run" / f"fcgipool-{pool.name}"
    assert runtime.is_dir() and pool.control.is_socket()
    started = time.monotonic()
    box.check("systemctl", "stop", pool.service, pool.socket_unit, timeout=120)
    took = time.monotonic() - started
    result = pool.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus",
                       "ControlGroup")
    # The pool stopped on SIGTERM by itself (exit 0), not killed at TimeoutStopSec.
    assert result == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1",
                      "ExecMainStatus": "0", "ControlGroup": ""}, (result, pool.journal())
    assert took < 20, took
    assert pool.state(pool.socket_unit) == "inactive"
    left = {pid: line for pid, line in box.processes().items()
            if pid in pids or "fcgipool" in line or "wsgi_app" in line}
    assert left == {}
    assert not pool.socket.exists(), "RemoveOnStop=yes"
    assert not pool.control.exists()
    assert not runtime.exists(), "RuntimeDirectory= is removed at stop"
    with pytest.raises(FileNotFoundError):
        pool.request()
