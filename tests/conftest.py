"""Fixtures that start real processes: the pool, nginx, and the children they serve."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
APPS = REPO / "tests" / "apps"
WSGI_APP = APPS / "wsgi_app.py"
QGIS_FCGI = "/usr/lib/cgi-bin/qgis_mapserv.fcgi"
DEMO_PROJECT = REPO / "demo" / "project" / "demo.qgs"


def wait_for(condition: Callable[[], object], timeout: float = 30.0, what: str = "condition"):
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shared_tmpdir(prefix: str) -> Path:
    """A directory that nginx workers (www-data) can traverse."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def to_toml(config: dict) -> str:
    """Tables for dicts, arrays of tables for lists of dicts (the [[classes]])."""
    lines = []
    for section, values in config.items():
        if isinstance(values, list):
            for item in values:
                lines.append(f"[[{section}]]")
                lines += [f"{key} = {toml_value(value)}" for key, value in item.items()]
            continue
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


class PoolProcess:
    """A real `fcgipool serve` process with its config written to a file."""

    def __init__(self, workdir: Path, config: dict, args: list[str] | None = None,
                 wrap: list[str] | None = None, env: dict[str, str] | None = None,
                 pass_fds: tuple[int, ...] = ()):
        self.workdir = workdir
        self.config_path = workdir / "pool.toml"
        self.config_path.write_text(to_toml(config))
        self.log_path = workdir / "pool.log"
        command = [*(wrap or []), sys.executable, "-m", "fcgipool", "serve",
                   "-c", str(self.config_path), *(args or [])]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the pool
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, pass_fds=pass_fds, start_new_session=True,
        )
        self.address = config["pool"]["bind"][0] if "bind" in config.get("pool", {}) else ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"pool exited with {self.process.returncode}:\n{self.log()}")
            return "pool_ready" in self.log()
        wait_for(ready, timeout, "pool_ready in the pool log")

    def children(self) -> list[int]:
        import psutil
        with contextlib.suppress(psutil.NoSuchProcess):
            return [c.pid for c in psutil.Process(self.pid).children()]
        return []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = shared_tmpdir("fcgipool-test-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pool_factory(workdir: Path) -> Iterator[Callable[..., PoolProcess]]:
    started: list[PoolProcess] = []

    def start(config: dict, ready: bool = True, **kwargs) -> PoolProcess:
        pool = PoolProcess(workdir, config, **kwargs)
        started.append(pool)
        if ready:
            pool.wait_ready()
        return pool

    yield start
    for pool in started:
        pool.stop(signal.SIGKILL if pool.process.poll() is None else signal.SIGTERM)


def wsgi_config(workdir: Path, **sections: dict) -> dict:
    """A pool of flup children running tests/apps/wsgi_app.py."""
    config: dict = {
        "pool": {"bind": [f"unix:{workdir}/pool.sock"], "workers": 2},
        "child": {"command": [sys.executable, str(WSGI_APP)], "cwd": str(APPS),
                  "allow_root": True},
        "log": {"level": "info"},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def qgis_env(home: Path) -> dict[str, str]:
    return {
        "HOME": str(home),
        "QGIS_SERVER_LOG_LEVEL": "2",
        "QGIS_SERVER_LOG_STDERR": "1",
        "QT_QPA_PLATFORM": "offscreen",
        "LANG": "C.UTF-8",
    }


def qgis_config(workdir: Path, bind: list[str] | None = None, **sections: dict) -> dict:
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    config: dict = {
        "pool": {"bind": bind or [f"unix:{workdir}/pool.sock"], "workers": 2,
                 "socket_mode": "0666"},
        "child": {"command": [QGIS_FCGI], "cwd": str(workdir), "env": qgis_env(home),
                  "allow_root": True},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


class Nginx:
    def __init__(self, workdir: Path, upstream: str, port: int):
        self.port = port
        self.dir = workdir / "nginx"
        self.dir.mkdir()
        self.dir.chmod(0o755)
        user = "user root;" if os.geteuid() == 0 else ""
        conf = textwrap.dedent(f"""
            {user}
            worker_processes 1;
            daemon off;
            pid {self.dir}/nginx.pid;
            error_log {self.dir}/error.log warn;
            worker_rlimit_nofile 16384;
            events {{ worker_connections 8192; }}
            http {{
                access_log off;
                client_body_temp_path {self.dir}/body;
                fastcgi_temp_path {self.dir}/fastcgi;
                proxy_temp_path {self.dir}/proxy;
                uwsgi_temp_path {self.dir}/uwsgi;
                scgi_temp_path {self.dir}/scgi;
                upstream pool {{ server {upstream}; keepalive 16; }}
                server {{
                    listen 127.0.0.1:{port} backlog=4096;
                    client_max_body_size 100m;
                    location / {{
                        include /etc/nginx/fastcgi_params;
                        fastcgi_param QGIS_PROJECT_FILE "";
                        fastcgi_pass pool;
                        fastcgi_keep_conn on;
                        fastcgi_read_timeout 300s;  # above every pool timeout here
                    }}
                    location = /pinned {{  # a route whose project the web server sets
                        include /etc/nginx/fastcgi_params;
                        fastcgi_param QGIS_PROJECT_FILE {DEMO_PROJECT};
                        fastcgi_pass pool;
                        fastcgi_keep_conn on;
                    }}
                }}
            }}
        """)
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(conf)
        self.process = subprocess.Popen(
            ["nginx", "-c", str(self.conf), "-p", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

        def listening() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"nginx exited: {self.process.stderr.read().decode()}")
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0
        wait_for(listening, 20, "nginx to listen")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def error_log(self) -> str:
        path = self.dir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture
def nginx_factory(workdir: Path) -> Iterator[Callable[[str], Nginx]]:
    started: list[Nginx] = []

    def start(upstream: str) -> Nginx:
        server = Nginx(workdir, upstream, free_port())
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


FAULT_APP = APPS / "fault_app.py"


def fault_config(workdir: Path, args: tuple[str, ...] = (), **sections: dict) -> dict:
    """A pool of tests/apps/fault_app.py children with short supervision timeouts."""
    config: dict = {
        "pool": {"bind": [f"unix:{workdir}/pool.sock"], "workers": 2},
        "child": {"command": [sys.executable, str(FAULT_APP), *args], "cwd": str(APPS),
                  "allow_root": True, "respawn_delay": 0.1},
        "timeouts": {"request": 2.0, "cancel": 1.0, "kill_grace": 1.0},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def pool_status(pool: PoolProcess) -> dict:
    """The pool's status document, through its control socket."""
    import json

    path = pool.config_path.parent / "pool.ctl"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b'{"command": "status"}\n')
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(data)["status"]


HEAVY_PROJECT = REPO / "demo" / "project" / "heavy.qgs"


@pytest.fixture(scope="session")
def heavy_project() -> Path:
    """demo/project/heavy.qgs with its generated 50,000 points."""
    data = REPO / "demo" / "project" / "data" / "heavy_points.geojson"
    if not data.exists():
        subprocess.run(["/usr/bin/python3", str(REPO / "demo" / "make_project.py"),
                        "--heavy-only"], check=True, capture_output=True, timeout=120)
    return HEAVY_PROJECT


def busy_request(pool: PoolProcess, workdir: Path, uri: str = "/?sleep=3000&layer=x"):
    """Start a slow request on the fault child; return its socket once a child has it."""
    from fcgipool import client, protocol

    marker = workdir / "busy-marker"
    sock = client.connect(pool.address)
    sock.sendall(protocol.encode_request(1, client.cgi_params(f"{uri}&touch={marker}")))
    wait_for(marker.exists, 20, "a child to take the slow request")
    return sock


@pytest.fixture
def harness() -> Iterator[Callable[..., object]]:
    """For the in-process tier (tests/unit): make a fakes.Harness (the real pool with fake
    children on a virtual clock); each is closed after the test."""
    from fakes import Harness  # tests/unit is on sys.path for its own tests

    made: list[Harness] = []

    def make(overrides: dict | None = None, **kwargs) -> Harness:
        made.append(Harness(overrides, **kwargs))
        return made[-1]

    yield make
    for harness in made:
        harness.close()
