"""What the benchmarks share: peers behind their own nginx, and wrk to load them.

Every set-up runs the same children; each gets its own nginx so that set-ups can stay up side
by side while wrk runs alternate between them (drift on the machine hits all alike).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QGIS = "/usr/lib/cgi-bin/qgis_mapserv.fcgi"
FAULT_APP = REPO / "tests" / "apps" / "fault_app.py"
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


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


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {_toml(v)}' for k, v in value.items()) + "}"
    return repr(value)


class Setup:
    """One FastCGI manager serving ``command`` behind its own nginx."""

    name = ""
    keepalive = False

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
        upstream = f"server unix:{self.socket};" + (" keepalive 32;" if self.keepalive else "")
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

    def start_manager(self) -> None:
        raise NotImplementedError

    def stop_manager(self) -> None:
        raise NotImplementedError

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

    def __init__(self, *args, settings: dict[str, dict] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = settings or {}

    def start_manager(self) -> None:
        config = {
            "pool": {"bind": [f"unix:{self.socket}"], "workers": self.workers},
            "child": {"command": self.command, "env": self.env, "allow_root": True},
            "limits": {"max_waiting": 4096},
            "log": {"level": "warning", "file": str(self.root / "pool.log")},
        }
        for section, values in self.settings.items():
            config.setdefault(section, {}).update(values)
        path = self.root / "pool.toml"
        path.write_text(
            "".join(
                f"[{section}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())
                for section, values in config.items()
            )
        )
        self.manager = subprocess.Popen(
            [sys.executable, "-m", "fcgipool", "serve", "-c", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "pool.stderr", "ab"),  # noqa: SIM115
        )

    def stop_manager(self) -> None:
        if self.manager is not None and self.manager.poll() is None:
            self.manager.terminate()
            try:
                self.manager.wait(60)
            except subprocess.TimeoutExpired:
                self.manager.kill()


class SpawnFcgi(Setup):
    """spawn-fcgi's usual set-up: N children share one socket; one connection per request
    (a kept-alive connection would pin one of the children, which share the socket)."""

    name = "spawn-fcgi"

    def start_manager(self) -> None:
        pid_file = self.root / "spawn.pid"
        command = ["spawn-fcgi", "-s", str(self.socket), "-M", "0666", "-F", str(self.workers),
                   "-P", str(pid_file), "--", *self.command]  # fmt: skip
        subprocess.run(command, env=self.env, stdout=subprocess.DEVNULL, check=True)

    def stop_manager(self) -> None:
        subprocess.run(["pkill", "-KILL", "-f", "^" + " ".join(self.command) + "$"], check=False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.socket.exists():
            try:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.connect(str(self.socket))
            except OSError:
                self.socket.unlink(missing_ok=True)
                return
            time.sleep(0.1)


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
