"""What the benchmarks share: peers behind their own nginx, and wrk or a Python client to
load them.

Every set-up runs the same children; each gets its own nginx so that set-ups can stay up side
by side while runs alternate between them (drift on the machine hits all alike). Set-ups:
fcgipool, spawn-fcgi (N children on one socket) and nginx round-robin over N single-child
sockets (the systemd-template set-up). ``run_wrk`` loads one URL; ``run_load`` mixes URLs and
keeps each answer's latency by kind; ``ForeignCpu`` measures other work on the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
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
            if isinstance(values, list):  # an array of tables: [[classes]]
                config[section] = values
            else:
                config.setdefault(section, {}).update(values)
        path = self.root / "pool.toml"
        text = ""
        for section, values in config.items():
            tables = values if isinstance(values, list) else [values]
            head = f"[[{section}]]" if isinstance(values, list) else f"[{section}]"
            for table in tables:
                text += head + "\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in table.items())
        path.write_text(text)
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


def _spawn(
    socket_path: Path, children: int, pid_file: Path, command: list[str], env: dict[str, str]
) -> None:
    pid_file.unlink(missing_ok=True)
    spawn = ["spawn-fcgi", "-s", str(socket_path), "-M", "0666", "-F", str(children),
             "-P", str(pid_file), "--", *command]  # fmt: skip
    subprocess.run(spawn, env=env, stdout=subprocess.DEVNULL, check=True)


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


def _kill(pid_file: Path, socket_path: Path) -> None:
    """SIGKILL the children spawn-fcgi started (their pids are in its pid file; never a
    kill by name: other work on the machine may run the same command), then remove the
    socket once nothing listens on it."""
    pids = _pids(pid_file)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    pid_file.unlink(missing_ok=True)
    while time.monotonic() < deadline and socket_path.exists():
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(socket_path))
        except OSError:
            socket_path.unlink(missing_ok=True)
            return
        time.sleep(0.1)


class SpawnFcgi(Setup):
    """spawn-fcgi's usual set-up: N children share one socket; one connection per request
    (a kept-alive connection would pin one of the children, which share the socket)."""

    name = "spawn-fcgi"

    def start_manager(self) -> None:
        _spawn(self.socket, self.workers, self.root / "spawn.pid", self.command, self.env)

    def stop_manager(self) -> None:
        _kill(self.root / "spawn.pid", self.socket)

    def own_pids(self) -> set[int]:
        return _pids(self.root / "spawn.pid")


class NginxRoundRobin(Setup):
    """The systemd-template set-up (qgis-server@N.socket + qgis-server@N.service): N
    single-child FastCGI servers, each on its own socket, and nginx's round-robin upstream
    over the N sockets, a connection per request (a kept-alive connection to a single-child
    socket would block the next connection nginx opens to it). spawn-fcgi -F 1 stands in
    for systemd: it too hands the child a listening socket on fd 0.

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

    def upstream(self) -> str:
        servers = " ".join(f"server unix:{path};" for path in self.sockets())
        return f"{self.balance} {servers}".strip()

    def start_manager(self) -> None:
        for i, path in enumerate(self.sockets()):
            _spawn(path, 1, self.root / f"spawn-{i}.pid", self.command, self.env)

    def stop_manager(self) -> None:
        for i, path in enumerate(self.sockets()):
            _kill(self.root / f"spawn-{i}.pid", path)

    def own_pids(self) -> set[int]:
        pids: set[int] = set()
        for i in range(self.workers):
            pids |= _pids(self.root / f"spawn-{i}.pid")
        return pids


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
                            idle_closed = isinstance(error, asyncio.IncompleteReadError) and (
                                not error.partial
                            )
                            if reused and attempt == 0 and idle_closed:
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


# ---------------------------------------------------------------- other work on the machine


def _proc_cpu() -> dict[int, tuple[int, int]]:
    """pid → (ppid, utime + stime in clock ticks) of every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        out[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return out


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


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def pool_events(path: Path) -> dict[str, int]:
    """How many times fcgipool logged each event but access (a JSON log: ``[log] format =
    "json"``), as "level event"."""
    import json

    counts: dict[str, int] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return counts
    for line in lines:
        try:
            entry = json.loads(line)
            if entry.get("event") == "access":
                continue
            key = f"{entry.get('level', '?')} {entry.get('event', '?')}"
        except (ValueError, AttributeError):
            key = "unparsed " + line[:60]
        counts[key] = counts.get(key, 0) + 1
    return counts


def parse_settings(assignments: list[str]) -> dict[str, dict]:
    """``["limits.write_buffer=4194304", 'child.keep_conn=false']`` → settings for Fcgipool
    (each value is TOML)."""
    import tomllib

    settings: dict[str, dict] = {}
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        section, dot, key = name.strip().partition(".")
        if not (sep and dot and section and key):
            raise SystemExit(f"--set {assignment!r}: expected SECTION.KEY=VALUE")
        settings.setdefault(section, {})[key] = tomllib.loads(f"v = {value}")["v"]
    return settings


def merge_settings(base: dict, extra: dict[str, dict]) -> dict:
    out = {section: (list(values) if isinstance(values, list) else dict(values))
           for section, values in base.items()}  # fmt: skip
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out
