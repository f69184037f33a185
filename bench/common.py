"""What the benchmarks share: the peers, each behind its own web server, and wrk or a Python
client to load them.

Every set-up runs the same children; each gets its own web server so that set-ups can stay up
side by side while runs alternate between them (drift on the machine hits all alike). Peers
(``PEERS``, ``make_setups``): fcgipool, spawn-fcgi+multiwatch (N children on one socket),
nginx round-robin over N single-child sockets (the systemd-template set-up) and Apache with
mod_fcgid. ``run_wrk`` loads one URL; ``run_load`` mixes URLs and keeps each answer's latency
by kind; ``ForeignCpu`` measures other work on the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tomlkit

REPO = Path(__file__).resolve().parent.parent
QGIS = "/usr/lib/cgi-bin/qgis_mapserv.fcgi"
FAULT_APP = REPO / "tests" / "apps" / "fault_app.py"
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
PEERS = ("fcgipool", "spawn-fcgi+multiwatch", "nginx-rr", "apache-mod_fcgid")


def qgis_env(home: Path) -> dict[str, str]:
    return {
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PATH": SAFE_PATH,
        "QGIS_SERVER_LOG_LEVEL": "2",
        "QGIS_SERVER_LOG_STDERR": "1",
        "QT_QPA_PLATFORM": "offscreen",
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout} s")


class Setup:
    """One FastCGI manager serving ``command`` behind its own nginx (Apache is its own front
    end). Besides start/stop, what the scenarios do to every peer alike: ``reload`` (an
    operator's new release under load), ``child_pids`` and ``manager_pids`` (who to watch)."""

    name = ""
    keepalive = False
    stop_timeout = 15.0  # seconds a graceful stop may take before SIGKILL (systemd: 90)

    def __init__(self, root: Path, workers: int, command: list[str], env: dict[str, str]):
        self.root = root / self.name
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.socket = self.root / "fcgi.sock"
        self.workers, self.command, self.env = workers, command, env
        self.port = free_port()
        self.nginx: subprocess.Popen | None = None
        self.manager: subprocess.Popen | None = None

    def start(self) -> None:
        self.start_manager()
        conf = self.root / "nginx.conf"
        upstream = self.upstream() + (" keepalive 32;" if self.keepalive else "")
        keep = "fastcgi_keep_conn on;" if self.keepalive else ""
        conf.write_text(
            textwrap.dedent(f"""
            user root;
            worker_processes 1;
            daemon off;
            pid {self.root}/nginx.pid;
            error_log {self.root}/nginx-error.log error;
            events {{ worker_connections 8192; }}
            http {{
                access_log off;
                client_body_temp_path {self.root}/body;
                fastcgi_temp_path {self.root}/fastcgi;
                upstream backend {{ {upstream} }}
                server {{
                    listen 127.0.0.1:{self.port} backlog=4096;
                    location / {{
                        include /etc/nginx/fastcgi_params;
                        fastcgi_pass backend;
                        fastcgi_read_timeout 120s;
                        {keep}
                    }}
                }}
            }}
            """)
        )
        self.nginx = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(self.root)])

    def upstream(self) -> str:
        """The body of nginx's ``upstream backend`` block (without keepalive)."""
        return f"server unix:{self.socket};"

    def start_manager(self) -> None:
        raise NotImplementedError

    def stop_manager(self) -> None:
        raise NotImplementedError

    def reload(self) -> None:
        """Replace every child by a new one (a new release), as an operator would under load;
        returns once the reload has started, as the operator's command does."""
        raise NotImplementedError

    def child_pids(self) -> set[int]:
        """The FastCGI children (processes of ``command``) running now."""
        raise NotImplementedError

    def manager_pids(self) -> set[int]:
        """The manager's own processes, for its RSS and CPU: not nginx, not the children."""
        raise NotImplementedError

    def own_pids(self) -> set[int]:
        """Processes of this set-up that are not descendants of the benchmark (spawn-fcgi's
        children are re-parented to init); for the CPU accounting of ``ForeignCpu``."""
        return set()

    def restart_manager(self) -> None:
        self.stop_manager()
        self.start_manager()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.stop_manager()
        if self.nginx is not None and self.nginx.poll() is None:
            self.nginx.terminate()
            self.nginx.wait(30)


class Fcgipool(Setup):
    name = "fcgipool"
    keepalive = True

    def __init__(self, *args, settings: dict[str, dict] | None = None,
                 source: Path | None = None, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.settings = settings or {}
        self.source = source  # run fcgipool from this source tree (bench/ab.py), not ours

    def start_manager(self) -> None:
        config = {
            "pool": {"bind": [f"unix:{self.socket}"], "workers": self.workers},
            "child": {"command": self.command, "env": self.env, "allow_root": True},
            "log": {"level": "warning", "file": str(self.root / "pool.log")},
        }
        for section, values in self.settings.items():
            if isinstance(values, list):  # an array of tables: [[classes]]
                config[section] = values
            else:
                config.setdefault(section, {}).update(values)
        path = self.root / "pool.toml"
        path.write_text(tomlkit.dumps(config))
        env = None
        if self.source is not None:
            env = {**os.environ, "PYTHONPATH": str(self.source)}
        self.manager = subprocess.Popen(
            [sys.executable, "-m", "fcgipool", "serve", "-c", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "pool.stderr", "ab"),  # noqa: SIM115
            cwd=self.source,
            env=env,
        )

    def stop_manager(self) -> None:
        if self.manager is not None and self.manager.poll() is None:
            self.manager.terminate()
            try:
                self.manager.wait(60)
            except subprocess.TimeoutExpired:
                self.manager.kill()

    def reload(self) -> None:
        """SIGHUP to the pool (``fcgipool reload``): its rolling reload, built in."""
        if self.manager is not None and self.manager.poll() is None:
            os.kill(self.manager.pid, signal.SIGHUP)

    def child_pids(self) -> set[int]:
        return _children(self.manager_pids())

    def manager_pids(self) -> set[int]:
        alive = self.manager is not None and self.manager.poll() is None
        return {self.manager.pid} if alive else set()


class Floor(Fcgipool):
    """bench/floor.py: the least a Python relay in the data path costs (a reference for
    bench/ab.py, not a peer), behind nginx's keepalive upstream as fcgipool is; stopped
    and watched as fcgipool is."""

    name = "floor"

    def start_manager(self) -> None:
        self.manager = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "floor.py"), str(self.socket),
             str(self.root / "child.sock"), str(self.workers), json.dumps(self.env),
             *self.command],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "floor.stderr", "ab"),  # noqa: SIM115
        )  # fmt: skip

    def reload(self) -> None:
        raise NotImplementedError("the floor relay has no reload")


def _pids(pid_file: Path) -> set[int]:
    try:
        return {int(line) for line in pid_file.read_text().split()}
    except (OSError, ValueError):
        return set()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _proc_stats() -> dict[int, list[str]]:
    """pid → the fields of /proc/PID/stat after the command name (state, ppid, ...), of
    every process now."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        out[int(entry)] = stat.rpartition(")")[2].split()
    return out


def _processes() -> dict[int, tuple[int, str]]:
    """pid → (ppid, state) of every process now."""
    return {pid: (int(fields[1]), fields[0]) for pid, fields in _proc_stats().items()}


def _children(parents: set[int], table: dict[int, tuple[int, str]] | None = None) -> set[int]:
    """The live children of ``parents`` (zombies are dead: init here does not reap them)."""
    table = _processes() if table is None else table
    return {pid for pid, (ppid, state) in table.items() if ppid in parents and state != "Z"}


def _descendants(roots: set[int], table: dict[int, tuple[int, str]] | None = None) -> set[int]:
    table = _processes() if table is None else table
    found: set[int] = set()
    frontier = set(roots)
    while frontier:
        frontier = _children(frontier, table) - found
        found |= frontier
    return found


def _signal(pids: set[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _wait_gone(pids: set[int], timeout: float) -> bool:
    """Whether all ``pids`` ended within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


MULTIWATCH = "/usr/bin/multiwatch"
MULTIWATCH_RETRIES = 1_000_000  # its default, 3, gives up on a child that crashes often


def _spawn_watched(
    socket_path: Path, children: int, pid_file: Path, command: list[str], env: dict[str, str]
) -> None:
    """spawn-fcgi opens the socket and execs multiwatch on it (its pid in ``pid_file``),
    which forks ``children`` children sharing the socket and forks a new one when one dies
    (with SIGTERM as the signal it forwards to them on its own shutdown)."""
    pid_file.unlink(missing_ok=True)
    spawn = ["spawn-fcgi", "-s", str(socket_path), "-M", "0666", "-P", str(pid_file), "--",
             MULTIWATCH, "-f", str(children), "-r", str(MULTIWATCH_RETRIES), "-s", "TERM",
             "--", *command]  # fmt: skip
    subprocess.run(spawn, env=env, stdout=subprocess.DEVNULL, check=True)


def _watchers(pid_files: list[Path]) -> set[int]:
    """The multiwatch processes of these pid files that run now (checked by their command
    line, so that a pid reused since is never signalled)."""
    pids = set()
    for pid in set().union(*(_pids(path) for path in pid_files)):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if os.path.basename(argv0) == b"multiwatch" and _alive(pid):
            pids.add(pid)
    return pids


def _stop_watched(pid_files: list[Path], sockets: list[Path], timeout: float) -> None:
    """The service's stop: SIGTERM to multiwatch (shutdown mode: it forwards SIGTERM to its
    children and respawns none), wait for it and its children until ``timeout``, then
    SIGKILL what is left, by pid (never by name: others may run the same command). Then the
    sockets go: nothing holds them any more (spawn-fcgi itself exited at start)."""
    watchers = _watchers(pid_files)
    tree = watchers | _descendants(watchers)
    _signal(watchers, signal.SIGTERM)
    if not _wait_gone(tree, timeout):
        tree |= _descendants({pid for pid in watchers if _alive(pid)})
        _signal({pid for pid in tree if _alive(pid)}, signal.SIGKILL)
        _wait_gone(tree, 10)
    for path in [*pid_files, *sockets]:
        path.unlink(missing_ok=True)


class SpawnMultiwatch(Setup):
    """spawn-fcgi + multiwatch, the usual supervised shared socket (lighttpd's tools): N
    children share one socket and multiwatch forks a new child when one dies. ``-r`` is
    large so that it always does: with the default ``-r 3`` it gives up on a child that dies
    3 times within 10 s of its start (``-t``), e.g. one that crashes often. One connection
    per request from nginx, as with spawn-fcgi."""

    name = "spawn-fcgi+multiwatch"

    def pid_file(self) -> Path:
        return self.root / "multiwatch.pid"

    def start_manager(self) -> None:
        _spawn_watched(self.socket, self.workers, self.pid_file(), self.command, self.env)

    def stop_manager(self) -> None:
        _stop_watched([self.pid_file()], [self.socket], self.stop_timeout)

    def reload(self) -> None:
        """The service's restart (stop, then start), what ``systemctl restart`` does to a
        spawn-fcgi unit: the socket is gone between the two, so requests meanwhile fail;
        returns once the new children are forked, not when they are ready."""
        self.restart_manager()

    def child_pids(self) -> set[int]:
        return _children(self.manager_pids())

    def manager_pids(self) -> set[int]:
        return _watchers([self.pid_file()])

    def own_pids(self) -> set[int]:
        return self.manager_pids()


class NginxRoundRobin(Setup):
    """The systemd-template set-up (qgis-server@N.socket + qgis-server@N.service): N
    single-child FastCGI servers, each on its own socket, and nginx's round-robin upstream
    over the N sockets, a connection per request (a kept-alive connection to a single-child
    socket would block the next connection nginx opens to it). Each socket is served by
    spawn-fcgi + ``multiwatch -f 1``, which stands in for systemd: the child gets the
    listening socket on fd 0, multiwatch restarts it when it dies (Restart=always) and keeps
    the socket open while it is replaced, as a socket unit does.

    ``balance`` replaces round-robin by another nginx balancing directive, e.g.
    ``hash $arg_project consistent;`` (projects pinned to a child by hashing)."""

    name = "nginx-rr"

    def __init__(self, *args, balance: str = "", name: str = "", **kwargs):
        if name:
            self.name = name
        self.balance = balance
        super().__init__(*args, **kwargs)

    def sockets(self) -> list[Path]:
        return [self.root / f"fcgi-{i}.sock" for i in range(self.workers)]

    def pid_files(self) -> list[Path]:
        return [self.root / f"multiwatch-{i}.pid" for i in range(self.workers)]

    def upstream(self) -> str:
        servers = " ".join(f"server unix:{path};" for path in self.sockets())
        return f"{self.balance} {servers}".strip()

    def start_manager(self) -> None:
        for path, pid_file in zip(self.sockets(), self.pid_files(), strict=True):
            _spawn_watched(path, 1, pid_file, self.command, self.env)

    def stop_manager(self) -> None:
        _stop_watched(self.pid_files(), self.sockets(), self.stop_timeout)

    def reload(self) -> None:
        """A rolling restart, as ``systemctl restart qgis-server@i`` one instance after the
        other: SIGTERM instance i's child (SIGKILL after ``stop_timeout``, as systemd's
        TimeoutStopSec), wait until multiwatch has forked its replacement on the same socket
        (not until it is ready: requests queue on the socket meanwhile), then the next."""
        for pid_file in self.pid_files():
            watcher = _watchers([pid_file])
            old = _children(watcher)
            _signal(old, signal.SIGTERM)
            if not _wait_gone(old, self.stop_timeout):
                _signal(old, signal.SIGKILL)
                _wait_gone(old, 10)
            deadline = time.monotonic() + 10
            while watcher and not _children(watcher) - old:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{pid_file}: multiwatch forked no new child")
                time.sleep(0.01)

    def child_pids(self) -> set[int]:
        return _children(self.manager_pids())

    def manager_pids(self) -> set[int]:
        return _watchers(self.pid_files())

    def own_pids(self) -> set[int]:
        return self.manager_pids()


APACHE = "/usr/sbin/apache2"
APACHE_MODULES = "/usr/lib/apache2/modules"
APACHE_USER = "www-data"


def _as_apache_user(*test: str) -> bool:
    """``test *test`` run as Apache's User: can its children read or run this?"""
    check = ["runuser", "-u", APACHE_USER, "--", "test", *test]
    return subprocess.run(check, stderr=subprocess.DEVNULL).returncode == 0


def _apache_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class ApacheFcgid(Setup):
    """Apache 2.4 (event MPM) with mod_fcgid, Apache itself the front end (no nginx). Every
    URL path runs one wrapper script (``exec command``), so one mod_fcgid class, with what
    an operator sets to get exactly N children and keep them:

    - FcgidMaxProcesses N, FcgidMaxProcessesPerClass N, FcgidMinProcessesPerClass N;
    - FcgidMaxRequestsPerProcess 0, FcgidProcessLifeTime 0, FcgidIdleTimeout 0 (no
      recycling, no idle kill);
    - FcgidIOTimeout 120 (nginx's fastcgi_read_timeout), FcgidBusyTimeout 3600,
      FcgidConnectTimeout 20, FcgidMaxRequestLen 1 GiB;
    - FcgidSpawnScoreUpLimit 100000 (default 10: each spawn scores 1, each exit 2, 1 decays a
      second, so a class above 10 stops spawning: N children would come ~1 a second past
      the tenth, a crashing child would be replaced late), FcgidSpawnScore 1,
      FcgidTerminationScore 2, FcgidTimeScore 1;
    - FcgidErrorScanInterval 1, FcgidZombieScanInterval 1 (default 3: a dead child's slot
      is freed, and a new child allowed, only at these scans).

    mod_fcgid spawns on demand only: children start with the first requests (one per request
    that finds none idle), never at start-up; FcgidMinProcessesPerClass only keeps them. A
    request that finds all N busy polls for a free one once a second (up to ~64 s, then
    503), so latency under saturation comes in steps of a second.

    Keep-alive as nginx's: KeepAlive On, MaxKeepAliveRequests 0, KeepAliveTimeout 75. The
    event MPM holds idle keep-alive connections without a thread; 4 processes of 128 threads
    (ServerLimit 8 leaves room for a graceful restart's old generation) and
    AsyncRequestWorkerFactor 4 accept up to 4 x (128 + 4 x 128) = 2560 connections.

    ``Mutex sysvsem default``: with fcntl locks (Debian's ``Mutex file:``) mod_fcgid's two
    locks, taken by threads of several processes, get false EDEADLK from the kernel under
    load (the request fails: "can't lock process table"); with pthread or flock, old-
    generation workers left stuck after a graceful restart make the next stop take 10 s.
    Either way a graceful restart under load loses a few requests in flight.

    The children run as www-data: the command must be readable by it; a HOME it cannot
    write (the caller's, owned by root) is replaced by one of its own in this set-up's
    directory."""

    name = "apache-mod_fcgid"

    def conf(self) -> Path:
        return self.root / "apache.conf"

    def start(self) -> None:
        self.start_manager()

    def stop(self) -> None:
        self.stop_manager()

    def _write_conf(self) -> None:
        import pwd
        import shlex

        user = pwd.getpwnam(APACHE_USER)
        if not _as_apache_user("-x", self.command[0]):
            raise RuntimeError(f"{APACHE_USER} cannot run {self.command[0]}")
        for arg in self.command[1:]:
            if arg.startswith("/") and os.path.exists(arg) and not _as_apache_user("-r", arg):
                raise RuntimeError(f"{APACHE_USER} cannot read {arg}")
        env = dict(self.env)
        if "HOME" in env and not _as_apache_user("-w", env["HOME"]):
            home = self.root / "home"
            home.mkdir(exist_ok=True)
            os.chown(home, user.pw_uid, user.pw_gid)
            env["HOME"] = str(home)
        run, ipc, cgi = self.root / "run", self.root / "fcgid", self.root / "cgi"
        for directory in (run, ipc, cgi):
            directory.mkdir(exist_ok=True)
        os.chown(ipc, user.pw_uid, user.pw_gid)
        wrapper = cgi / "app.fcgi"
        wrapper.write_text(f"#!/bin/sh\nexec {shlex.join(self.command)}\n")
        wrapper.chmod(0o755)
        n = self.workers
        initial_env = "\n".join(
            f"FcgidInitialEnv {name} {_apache_quote(value)}" for name, value in env.items()
        )
        modules = ["mpm_event", "authz_core", "alias", "fcgid"]
        self.conf().write_text(
            "\n".join(
                f"LoadModule {module}_module {APACHE_MODULES}/mod_{module}.so" for module in modules
            )
            + textwrap.dedent(f"""
            ServerRoot {self.root}
            ServerName 127.0.0.1
            User {APACHE_USER}
            Group {APACHE_USER}
            Listen 127.0.0.1:{self.port}
            ListenBacklog 4096
            PidFile {self.root}/apache.pid
            DefaultRuntimeDir {run}
            Mutex sysvsem default
            ErrorLog {self.root}/apache-error.log
            LogLevel warn
            Timeout 120
            KeepAlive On
            MaxKeepAliveRequests 0
            KeepAliveTimeout 75

            ServerLimit 8
            StartServers 4
            ThreadLimit 128
            ThreadsPerChild 128
            MaxRequestWorkers 512
            MinSpareThreads 128
            MaxSpareThreads 512
            AsyncRequestWorkerFactor 4
            MaxConnectionsPerChild 0

            FcgidIPCDir {ipc}
            FcgidProcessTableFile {run}/fcgid_shm
            FcgidMaxProcesses {n}
            FcgidMaxProcessesPerClass {n}
            FcgidMinProcessesPerClass {n}
            FcgidMaxRequestsPerProcess 0
            FcgidProcessLifeTime 0
            FcgidIdleTimeout 0
            FcgidIOTimeout 120
            FcgidBusyTimeout 3600
            FcgidConnectTimeout 20
            FcgidMaxRequestLen 1073741824
            FcgidSpawnScoreUpLimit 100000
            FcgidSpawnScore 1
            FcgidTerminationScore 2
            FcgidTimeScore 1
            FcgidErrorScanInterval 1
            FcgidZombieScanInterval 1
            """)
            + initial_env
            + textwrap.dedent(f"""

            DocumentRoot {cgi}
            AliasMatch ^/ {wrapper}
            <Directory {cgi}>
                Options +ExecCGI
                SetHandler fcgid-script
                Require all granted
            </Directory>
            """)
        )

    def start_manager(self) -> None:
        """Apache in the foreground; returns once it listens."""
        self._write_conf()
        self.manager = subprocess.Popen(
            [APACHE, "-f", str(self.conf()), "-DFOREGROUND"],
            env={"PATH": SAFE_PATH, "LANG": "C"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "apache.stderr", "ab"),  # noqa: SIM115
        )
        deadline = time.monotonic() + 30
        while True:
            if self.manager.poll() is not None:
                log = (self.root / "apache-error.log", self.root / "apache.stderr")
                tail = "".join(p.read_text(errors="replace")[-2000:] for p in log if p.exists())
                raise RuntimeError(f"apache2 exited ({self.manager.returncode}):\n{tail}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"apache2 does not listen on {self.port} after 30 s")
            time.sleep(0.05)

    def stop_manager(self) -> None:
        """SIGTERM to the parent (it stops its workers; mod_fcgid's process manager TERMs
        the children, then KILLs them a second later); SIGKILL what is left after
        ``stop_timeout``. The IPC sockets go with it."""
        if self.manager is not None and self.manager.poll() is None:
            tree = self.own_pids()
            self.manager.terminate()
            try:
                self.manager.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                tree |= self.own_pids()
                _signal({pid for pid in tree if _alive(pid)}, signal.SIGKILL)
                self.manager.wait(10)
            if not _wait_gone(tree, 10):
                _signal({pid for pid in tree if _alive(pid)}, signal.SIGKILL)
                _wait_gone(tree, 10)
        for path in (self.root / "fcgid").glob("**/*"):
            if path.is_socket():
                path.unlink(missing_ok=True)

    def reload(self) -> None:
        """``apachectl graceful`` (SIGUSR1 to the parent): a new generation of workers and a
        new mod_fcgid process manager; the old one ends its children (TERM, KILL a second
        later), and new children are spawned on demand by the next requests."""
        if self.manager is not None and self.manager.poll() is None:
            os.kill(self.manager.pid, signal.SIGUSR1)

    def _parent(self) -> set[int]:
        alive = self.manager is not None and self.manager.poll() is None
        return {self.manager.pid} if alive else set()

    def child_pids(self) -> set[int]:
        """The children of mod_fcgid's process manager(s), itself a child of the parent."""
        table = _processes()
        return _children(_children(self._parent(), table), table)

    def manager_pids(self) -> set[int]:
        """The parent, its workers and mod_fcgid's process manager(s)."""
        parent = self._parent()
        return parent | _children(parent)

    def own_pids(self) -> set[int]:
        parent = self._parent()
        return parent | _descendants(parent)


def make_setups(
    root: Path,
    workers: int,
    command: list[str],
    env: dict[str, str],
    *,
    peers: Sequence[str] = (),
    fcgipool_settings: dict | None = None,
) -> list[Setup]:
    """The set-ups named in ``peers`` (all of PEERS when empty), in that order, not started."""
    unknown = [peer for peer in peers if peer not in PEERS]
    if unknown:
        raise ValueError(f"unknown peers {unknown}; known: {', '.join(PEERS)}")
    others: dict[str, type[Setup]] = {
        "spawn-fcgi+multiwatch": SpawnMultiwatch,
        "nginx-rr": NginxRoundRobin,
        "apache-mod_fcgid": ApacheFcgid,
    }
    return [
        Fcgipool(root, workers, command, env, settings=fcgipool_settings)
        if peer == "fcgipool"
        else others[peer](root, workers, command, env)
        for peer in peers or PEERS
    ]


@dataclass
class Result:
    requests: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def goodput(self) -> float:
        return (self.requests - self.errors) / self.seconds


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(
    url: str,
    duration: float,
    connections: int,
    script: Path | None = None,
    timeout: float = 30,
    threads: int = 1,
) -> Result:
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(duration)}s", "--latency",
               f"--timeout={int(timeout)}s"]  # fmt: skip
    if script is not None:
        command += ["-s", str(script)]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", out)
    seconds = _ms(total.group(2), total.group(3)) / 1000
    latency = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+(?:us|ms|s|m))\s*$", out, re.MULTILINE))
    p50 = re.match(r"([\d.]+)(us|ms|s|m)", latency.get("50", "0ms"))
    p99 = re.match(r"([\d.]+)(us|ms|s|m)", latency.get("99", "0ms"))
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    socket_errors = re.search(r"Socket errors: (.*)", out)
    if socket_errors:
        errors += sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1)))
    requests = int(total.group(1))
    return Result(requests, seconds, requests / seconds, _ms(*p50.groups()), _ms(*p99.groups()),
                  errors)  # fmt: skip


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = int(Path("/proc/meminfo").read_text().split()[1]) // 2**20
    python = sys.version.split()[0]
    return f"{os.cpu_count()} cores ({cpu}), {memory} GiB, Debian bookworm, Python {python}"


# ---------------------------------------------------------------- a bounded HTTP load client
#
# wrk's Lua hooks can pick a URL per request, but its `done` hook only sees one latency
# histogram for all of them: latency per kind of request (light vs heavy) needs a client that
# knows which request took how long. This one is small and bounded on purpose: a fixed number
# of workers (a closed loop: each sends its next request when the previous answer is in),
# raw HTTP/1.1 GET over one kept-alive TCP connection each to nginx, a fixed duration, then it
# stops by itself. Only answers that *complete* inside the measured window are counted; at the
# end no new request is sent and the ones in flight are awaited (not counted, bounded by
# ``timeout``) so that no work of this run is left on the children when the next run starts.
# Like wrk, a closed loop does not see "coordinated omission": when the server is slow the
# workers send less. Every set-up gets the same workers and the same sequence of URLs.
# A request still unanswered ``drain`` seconds after the end is abandoned (its connection
# closed) and counted in ``abandoned``; ``tag_header`` keeps one response header per answer
# (the fault app's X-Cache: hit|miss).


@dataclass
class Sample:
    kind: str
    latency: float  # seconds
    status: int  # 0: no HTTP answer (connection error or client timeout)
    tag: str = ""  # the value of the response header ``tag_header``


@dataclass
class LoadResult:
    seconds: float
    samples: list[Sample]
    abandoned: int = 0  # requests still unanswered after the drain

    def kinds(self) -> list[str]:
        return sorted({sample.kind for sample in self.samples})

    def of(self, kind: str | None = None) -> list[Sample]:
        return [s for s in self.samples if kind is None or s.kind == kind]

    def count(self, kind: str | None = None) -> int:
        return len(self.of(kind))

    def rate(self, kind: str | None = None) -> float:
        """Answers per second (any status)."""
        return self.count(kind) / self.seconds

    def goodput(self, kind: str | None = None) -> float:
        """2xx answers per second."""
        return sum(200 <= s.status < 300 for s in self.of(kind)) / self.seconds

    def errors(self, kind: str | None = None) -> int:
        return sum(not 200 <= s.status < 300 for s in self.of(kind))

    def statuses(self, kind: str | None = None) -> dict[int, int]:
        counts: dict[int, int] = {}
        for s in self.of(kind):
            counts[s.status] = counts.get(s.status, 0) + 1
        return counts

    def percentile_ms(self, q: float, kind: str | None = None) -> float:
        """Nearest-rank percentile (q in 0..100) of the latencies of all answers."""
        values = sorted(s.latency for s in self.of(kind))
        if not values:
            return float("nan")
        rank = max(1, math.ceil(q / 100 * len(values)))
        return values[rank - 1] * 1000


async def _read_response(reader: asyncio.StreamReader, tag_header: str) -> tuple[int, bool, str]:
    """Read one HTTP/1.1 response; (status, the server closes the connection, the value of
    the header ``tag_header``)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status = lines[0].split(" ", 2)[:2]
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip().lower()
    close = version == "HTTP/1.0" or headers.get("connection") == "close"
    code = int(status)
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif "chunked" in headers.get("transfer-encoding", ""):
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                break
            await reader.readexactly(size + 2)
    elif code >= 200 and code not in (204, 304):
        await reader.read()  # until EOF
        close = True
    return code, close, headers.get(tag_header, "")


def _closed_while_idle(error: BaseException) -> bool:
    """Whether a kept-alive connection failed as one the server closed while it sat idle
    (nginx's keepalive_timeout): no byte of an answer came back, either as an end of file or,
    when the close crossed the request on the wire, as a reset. Such a request never reached
    the pool; a client sends it again on a new connection, as browsers and urllib3 do."""
    if isinstance(error, asyncio.IncompleteReadError):
        return not error.partial
    return isinstance(error, (ConnectionResetError, BrokenPipeError))


async def _load(port: int, duration: float, workers: int, choose, timeout: float,
                warmup: float, drain: float, tag_header: str) -> LoadResult:  # fmt: skip
    loop = asyncio.get_running_loop()
    begin = loop.time() + warmup
    end = begin + duration
    samples: list[Sample] = []

    class Client:
        def __init__(self) -> None:
            self.reader: asyncio.StreamReader | None = None
            self.writer: asyncio.StreamWriter | None = None

        def close(self) -> None:
            if self.writer is not None:
                self.writer.close()
            self.reader = self.writer = None

        async def exchange(self, request: bytes) -> tuple[int, bool, str]:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
            self.writer.write(request)
            return await asyncio.wait_for(_read_response(self.reader, tag_header), timeout)

        async def run(self) -> None:
            try:
                while loop.time() < end:
                    kind, path = choose()
                    request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
                    for attempt in (0, 1):
                        reused = self.writer is not None
                        start = loop.time()
                        try:
                            status, close, tag = await self.exchange(request)
                        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                                TimeoutError, ValueError) as error:  # fmt: skip
                            self.close()
                            if reused and attempt == 0 and _closed_while_idle(error):
                                continue  # the server had closed the idle connection: again
                            status, close, tag = 0, True, ""
                        done = loop.time()
                        if begin <= done <= end:
                            samples.append(Sample(kind, done - start, status, tag))
                        if close:
                            self.close()
                        break
            finally:
                self.close()

    tasks = [asyncio.create_task(Client().run()) for _ in range(workers)]
    _, pending = await asyncio.wait(tasks, timeout=warmup + duration + drain)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return LoadResult(duration, samples, len(pending))


def run_load(port: int, duration: float, workers: int, choose, timeout: float = 60,
             warmup: float = 0, drain: float = 30, tag_header: str = "") -> LoadResult:  # fmt: skip
    """``workers`` closed-loop clients against http://127.0.0.1:port for ``warmup`` +
    ``duration`` seconds; ``choose()`` gives the next request's (kind, path). Answers that
    complete in the last ``duration`` seconds are kept; requests still in flight ``drain``
    seconds after the end are abandoned."""
    return asyncio.run(_load(port, duration, workers, choose, timeout, warmup, drain,
                             tag_header.lower()))  # fmt: skip


# ---------------------------------------------------------------- bursts and open-loop load
#
# A map viewer's pan or zoom is a burst: all the tiles of the new view at once (HTTP/2, or
# several HTTP/1.1 connections), then nothing while its user looks. ``run_viewers`` plays
# viewers that do that over and over; ``run_phases`` plays a day (phases of open-loop
# requests at a rate, and viewers) back to back. Both use the raw HTTP/1.1 client above
# (``_read_response``), each request on a kept-alive connection of its own client.


class _Connections:
    """Idle kept-alive connections to 127.0.0.1:port, reused; a request takes one or opens
    one, and gives it back unless the server closes it. A retry always opens a new one: after
    a burst many idle connections outlive nginx's keepalive_timeout together, so a second
    idle one would as likely be closed too."""

    def __init__(self, port: int, timeout: float):
        self.port, self.timeout = port, timeout
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def get(self, kind: str, path: str) -> Sample:
        loop = asyncio.get_running_loop()
        request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
        for attempt in (0, 1):
            reused = attempt == 0 and bool(self.idle)  # a retry never takes another idle one
            start = loop.time()
            reader = writer = None
            try:
                if reused:
                    reader, writer = self.idle.pop()
                else:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(request)
                status, close, _ = await asyncio.wait_for(_read_response(reader, ""),
                                                          self.timeout)  # fmt: skip
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    TimeoutError, ValueError) as error:  # fmt: skip
                if writer is not None:
                    writer.close()
                if reused and _closed_while_idle(error):
                    continue  # the server had closed the idle connection: again, on a new one
                return Sample(kind, loop.time() - start, 0)
            if close:
                writer.close()
            else:
                self.idle.append((reader, writer))
            return Sample(kind, loop.time() - start, status)
        raise AssertionError("unreachable")

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


@dataclass
class BurstResult:
    seconds: float
    samples: list[Sample]  # every request of the bursts counted
    bursts: list[tuple[float, bool]]  # a counted burst: (seconds from its start to its last
    # answer, whether every answer was a 2xx)
    abandoned: int = 0  # bursts still unanswered after the drain

    def failed_bursts(self) -> int:
        return sum(not ok for _, ok in self.bursts)

    def burst_percentile_ms(self, q: float) -> float:
        """Nearest-rank percentile of the bursts whose every answer was a 2xx (a refused
        request would end its burst early)."""
        values = sorted(seconds for seconds, ok in self.bursts if ok)
        if not values:
            return float("nan")
        return values[max(1, math.ceil(q / 100 * len(values))) - 1] * 1000


async def _viewer(connections: _Connections, views, number: int, think: tuple[float, float],
                  rng, start: float, end: float, begin: float, kind: str, samples: list,
                  bursts: list) -> None:  # fmt: skip
    """One viewer from ``start`` to ``end``: a burst (``views(number, i)``: the paths of its
    i-th view, all at once), wait for all, think ``think`` seconds (uniform), again. Bursts
    that start at or after ``begin`` are counted, to their end."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start - loop.time()))
    i = 0
    while loop.time() < end:
        paths = views(number, i)
        t0 = loop.time()
        answers = await asyncio.gather(*(connections.get(kind, path) for path in paths))
        if t0 >= begin:
            samples.extend(answers)
            bursts.append((loop.time() - t0, all(200 <= a.status < 300 for a in answers)))
        i += 1
        await asyncio.sleep(min(rng.uniform(*think), max(0.0, end - loop.time())))


def run_viewers(port: int, duration: float, viewers: int, views, think: tuple[float, float],
                seed: int, warmup: float = 0, drain: float = 30,
                timeout: float = 60) -> BurstResult:  # fmt: skip
    """``viewers`` viewers against http://127.0.0.1:port for ``warmup`` + ``duration``
    seconds, each starting at a random moment of its first think time; ``views(viewer, i)``
    gives the paths of a viewer's i-th burst. Bursts that start in the last ``duration``
    seconds are counted (with all their requests, kind "tile"); no burst starts after the
    end, and those running ``drain`` seconds after it are abandoned."""
    import random

    async def main() -> BurstResult:
        loop = asyncio.get_running_loop()
        now = loop.time()
        begin, end = now + warmup, now + warmup + duration
        samples: list[Sample] = []
        bursts: list[tuple[float, bool]] = []
        pools = [_Connections(port, timeout) for _ in range(viewers)]
        tasks = []
        for number, connections in enumerate(pools):
            rng = random.Random(seed * 1000 + number)
            start = now + rng.uniform(0, think[1])
            tasks.append(asyncio.create_task(_viewer(connections, views, number, think, rng,
                                                     start, end, begin, "tile", samples,
                                                     bursts)))  # fmt: skip
        _, pending = await asyncio.wait(tasks, timeout=warmup + duration + drain)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for connections in pools:
            connections.close()
        return BurstResult(duration, samples, bursts, len(pending))

    return asyncio.run(main())


@dataclass
class Phase:
    """A stretch of a day: open-loop requests at ``rate`` a second (Poisson arrivals, each
    path from ``path(rng)``), and ``viewers`` viewers bursting ``views`` with ``think``."""

    name: str
    seconds: float
    rate: float = 0.0
    viewers: int = 0
    think: tuple[float, float] = (0.5, 1.0)


@dataclass
class PhasesResult:
    samples: list[Sample]  # kind: the phase the request was sent in
    bursts: dict[str, list[tuple[float, bool]]]  # phase → its bursts, as BurstResult.bursts
    windows: dict[str, tuple[float, float]]  # phase → (start, end), time.monotonic()
    abandoned: int = 0  # requests still unanswered after the drain


def run_phases(port: int, phases: Sequence[Phase], path, views, seed: int, drain: float = 30,
               timeout: float = 60) -> PhasesResult:  # fmt: skip
    """The phases back to back, on schedule (a phase does not wait for the answers of the
    one before: time goes on). ``path(rng)``: the path of an open-loop request;
    ``views(viewer, i)``: a viewer's i-th burst."""
    import random

    async def main() -> PhasesResult:
        loop = asyncio.get_running_loop()  # its clock is time.monotonic()
        samples: list[Sample] = []
        bursts: dict[str, list[tuple[float, bool]]] = {}
        windows: dict[str, tuple[float, float]] = {}
        connections = _Connections(port, timeout)
        rng = random.Random(seed)
        tasks: list[asyncio.Task] = []

        async def one(kind: str, p: str) -> None:
            samples.append(await connections.get(kind, p))

        start = loop.time()
        for phase in phases:
            end = start + phase.seconds
            windows[phase.name] = (start, end)
            done = bursts.setdefault(phase.name, [])
            for number in range(phase.viewers):
                viewer_rng = random.Random(rng.random())
                begin = start + viewer_rng.uniform(0, phase.think[1])
                tasks.append(asyncio.create_task(_viewer(
                    _Connections(port, timeout), views, number, phase.think, viewer_rng,
                    begin, end, start, phase.name, samples, done)))  # fmt: skip
            at = start
            while phase.rate > 0:
                at += rng.expovariate(phase.rate)
                if at >= end:
                    break
                await asyncio.sleep(max(0.0, at - loop.time()))
                tasks.append(asyncio.create_task(one(phase.name, path(rng))))
            await asyncio.sleep(max(0.0, end - loop.time()))
            start = end
        pending: set = set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=drain)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        connections.close()
        return PhasesResult(samples, bursts, windows, len(pending))

    return asyncio.run(main())


class ChildMemory:
    """The children's RSS, summed, sampled every ``interval`` seconds in a thread while it
    runs (``with ChildMemory(setup) as memory:``): memory-seconds (the integral of the sum
    over time) and the mean number of children, for the whole run or a window of it."""

    def __init__(self, setup: Setup, interval: float = 0.25):
        import threading

        self.setup, self.interval = setup, interval
        self.samples: list[tuple[float, int, int]] = []  # (time.monotonic(), bytes, children)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while True:
            now = time.monotonic()
            total = count = 0
            for pid in self.setup.child_pids():
                with contextlib.suppress(psutil.Error):
                    total += psutil.Process(pid).memory_info().rss
                    count += 1
            self.samples.append((now, total, count))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> ChildMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _window(self, start: float, end: float) -> list[tuple[float, int, int]]:
        return [s for s in self.samples if start <= s[0] <= end]

    def gib_seconds(self, start: float = -math.inf, end: float = math.inf) -> float:
        """∫ RSS dt over [start, end] (each sample holds until the next), GiB·s."""
        window = self._window(start, end)
        total = 0.0
        for (t0, rss, _), (t1, _, _) in itertools.pairwise(window):
            total += rss * (t1 - t0)
        return total / 2**30

    def mean_children(self, start: float = -math.inf, end: float = math.inf) -> float:
        window = self._window(start, end)
        return sum(s[2] for s in window) / len(window) if window else float("nan")


# ---------------------------------------------------------------- other work on the machine


def _proc_cpu() -> dict[int, tuple[int, int]]:
    """pid → (ppid, utime + stime in clock ticks) of every process."""
    return {pid: (int(fields[1]), int(fields[11]) + int(fields[12]))
            for pid, fields in _proc_stats().items()}  # fmt: skip


class ForeignCpu:
    """CPU that processes outside the benchmark used during a run (in cores, averaged):
    the machine is shared, and a busy neighbour distorts what it measures. Ours are this
    process, its descendants, and the ``own_pids`` of the set-ups (with descendants)."""

    def __init__(self, setups: list[Setup]):
        self.setups = setups
        self.start = _proc_cpu()
        self.t0 = time.monotonic()
        self.busy0 = self._busy()

    @staticmethod
    def _busy() -> int:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
        return user + nice + system + irq + softirq

    def stop(self) -> tuple[float, float]:
        """(cores busy in all, cores used by processes not ours), averaged over the run."""
        end = _proc_cpu()
        seconds = time.monotonic() - self.t0
        tick = os.sysconf("SC_CLK_TCK")
        roots = {os.getpid()}
        for setup in self.setups:
            roots |= setup.own_pids()
        ours = set(roots)
        changed = True
        while changed:
            changed = False
            for pid, (ppid, _) in end.items():
                if pid not in ours and ppid in ours:
                    ours.add(pid)
                    changed = True
        mine = sum(cpu - self.start.get(pid, (0, 0))[1] for pid, (_, cpu) in end.items()
                   if pid in ours)  # fmt: skip
        total = self._busy() - self.busy0
        foreign = max(0, total - mine)  # also counts foreign processes that ended meanwhile
        return total / tick / seconds, foreign / tick / seconds
