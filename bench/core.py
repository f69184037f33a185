"""Core benchmark: nginx → fcgipool vs nginx → spawn-fcgi, the same 2 QGIS children.

Both set-ups run side by side (each with its own nginx), and `wrk` runs alternate between
them, so that drift on the machine hits both alike. Each figure is the median of the
repeats. Run as root on Debian bookworm after `bash scripts/test.sh` installed everything:

    .venv/bin/python bench/core.py --repeats 5 --duration 10

spawn-fcgi gets its usual nginx set-up (one connection per request: a kept-alive
connection would pin one of its children, which share one socket); fcgipool gets nginx's
keepalive upstream with `fastcgi_keep_conn on`, as its docs recommend.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QGIS = "/usr/lib/cgi-bin/qgis_mapserv.fcgi"
PROJECT = REPO / "demo" / "project" / "demo.qgs"


def qgis_env(home: Path) -> dict[str, str]:
    return {
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PATH": "/usr/local/bin:/usr/bin:/bin",
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
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout} s")


def demo_bbox() -> str:
    text = PROJECT.read_text()
    match = re.search(r"<WMSExtent[^>]*>((?:\s*<value>[^<]+</value>){4})", text)
    assert match, "demo.qgs has no WMSExtent"
    return ",".join(re.findall(r"<value>([^<]+)</value>", match.group(1)))


def scenarios() -> dict[str, str]:
    base = {"MAP": str(PROJECT), "SERVICE": "WMS", "VERSION": "1.3.0"}
    light_map = {
        **base,
        "REQUEST": "GetMap",
        "LAYERS": "districts,roads,sites",
        "STYLES": "",
        "CRS": "EPSG:3857",
        "BBOX": demo_bbox(),
        "WIDTH": "256",
        "HEIGHT": "256",
        "FORMAT": "image/png",
    }
    return {
        "GetCapabilities": "/ows?" + urllib.parse.urlencode({**base, "REQUEST": "GetCapabilities"}),
        "GetMap 256x256": "/ows?" + urllib.parse.urlencode(light_map),
    }


class Setup:
    """One FastCGI manager serving QGIS behind its own nginx."""

    name = ""

    def __init__(self, root: Path, workers: int) -> None:
        self.root = root / self.name
        self.root.mkdir(parents=True)
        self.root.chmod(0o755)
        (self.root / "home").mkdir()
        self.socket = self.root / "fcgi.sock"
        self.workers = workers
        self.port = free_port()
        self.processes: list[subprocess.Popen] = []

    def nginx_upstream(self) -> str:
        raise NotImplementedError

    def start(self) -> None:
        self.start_manager()
        conf = self.root / "nginx.conf"
        conf.write_text(
            textwrap.dedent(f"""
            user root;
            worker_processes 1;
            daemon off;
            pid {self.root}/nginx.pid;
            error_log {self.root}/nginx-error.log warn;
            events {{ worker_connections 4096; }}
            http {{
                access_log off;
                client_body_temp_path {self.root}/body;
                fastcgi_temp_path {self.root}/fastcgi;
                {self.nginx_upstream()}
                server {{
                    listen 127.0.0.1:{self.port};
                    location / {{
                        include /etc/nginx/fastcgi_params;
                        fastcgi_pass backend;
                        fastcgi_read_timeout 90s;
                        {self.nginx_location_extra()}
                    }}
                }}
            }}
            """)
        )
        self.processes.append(subprocess.Popen(["nginx", "-c", str(conf), "-p", str(self.root)]))

    def nginx_location_extra(self) -> str:
        return ""

    def start_manager(self) -> None:
        raise NotImplementedError

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


class Fcgipool(Setup):
    name = "fcgipool"

    def nginx_upstream(self) -> str:
        return f"upstream backend {{ server unix:{self.socket}; keepalive 16; }}"

    def nginx_location_extra(self) -> str:
        return "fastcgi_keep_conn on;"

    def start_manager(self) -> None:
        env_args = []
        for name, value in qgis_env(self.root / "home").items():
            env_args += ["--env", f"{name}={value}"]
        command = [
            sys.executable, "-m", "fcgipool", "serve", "--bind", f"unix:{self.socket}",
            "-w", str(self.workers), *env_args, "--", QGIS,
        ]  # fmt: skip
        log = open(self.root / "pool.log", "wb")  # noqa: SIM115 - kept for the process
        environ = {**os.environ, "FCGIPOOL_LOG__LEVEL": "warning"}
        self.processes.append(
            subprocess.Popen(command, stdout=log, stderr=log, env=environ, start_new_session=True)
        )


class SpawnFcgi(Setup):
    name = "spawn-fcgi"

    def nginx_upstream(self) -> str:
        return f"upstream backend {{ server unix:{self.socket}; }}"

    def start_manager(self) -> None:
        env = qgis_env(self.root / "home")
        command = [
            "spawn-fcgi", "-n", "-s", str(self.socket), "-M", "0666", "-F", str(self.workers),
            "--", QGIS,
        ]  # fmt: skip
        # spawn-fcgi -n with -F > 1 is refused; run it in the background instead.
        command.remove("-n")
        log = open(self.root / "spawn.log", "wb")  # noqa: SIM115 - kept for the process
        subprocess.run(command, env=env, stdout=log, stderr=log, check=True)

    def stop(self) -> None:
        subprocess.run(["pkill", "-f", f"^{QGIS}$"], check=False)
        super().stop()


@dataclass
class Result:
    requests_per_s: float
    p99_ms: float
    errors: int


def run_wrk(url: str, duration: float, connections: int) -> Result:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s", "--latency", url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    socket_errors = re.search(r"Socket errors: (.*)", out)
    if socket_errors:
        errors += sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1)))
    return Result(rate, float(p99.group(1)) * scale, errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="fcgipool-bench-"))
    root.chmod(0o755)
    setups: list[Setup] = [Fcgipool(root, args.workers), SpawnFcgi(root, args.workers)]
    results: dict[tuple[str, str], list[Result]] = {}
    try:
        for setup in setups:
            setup.start()
        paths = scenarios()
        for setup in setups:
            for path in paths.values():
                wait_http(setup.url(path))
                run_wrk(setup.url(path), 2, args.connections)  # warm-up
        for repeat in range(args.repeats):
            for scenario, path in paths.items():
                order = setups if repeat % 2 == 0 else list(reversed(setups))
                for setup in order:
                    result = run_wrk(setup.url(path), args.duration, args.connections)
                    results.setdefault((scenario, setup.name), []).append(result)
                    print(
                        f"# {repeat + 1}/{args.repeats} {scenario:<16} {setup.name:<10} "
                        f"{result.requests_per_s:8.1f} req/s  p99 {result.p99_ms:7.2f} ms  "
                        f"errors {result.errors}",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        for setup in setups:
            setup.stop()
        shutil.rmtree(root, ignore_errors=True)

    print(f"| scenario | {setups[0].name} req/s | {setups[1].name} req/s | ratio | "
          f"{setups[0].name} p99 ms | {setups[1].name} p99 ms | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for scenario in scenarios():
        ours = results[(scenario, setups[0].name)]
        theirs = results[(scenario, setups[1].name)]
        rate_ours = statistics.median(r.requests_per_s for r in ours)
        rate_theirs = statistics.median(r.requests_per_s for r in theirs)
        errors = sum(r.errors for r in ours + theirs)
        print(
            f"| {scenario} | {rate_ours:.0f} | {rate_theirs:.0f} | "
            f"{rate_ours / rate_theirs:.3f} | "
            f"{statistics.median(r.p99_ms for r in ours):.2f} | "
            f"{statistics.median(r.p99_ms for r in theirs):.2f} | {errors} |"
        )


if __name__ == "__main__":
    main()
