"""The operating system's side of the children: start, connect, signal, reap, measure.

children.py decides what happens to a child; this module makes it happen with real
processes (the in-process tests hand children.py a fake with the same methods).

Each child gets a *listening* unix socket as fd 0 (FCGI_LISTENSOCK_FILENO): libfcgi falls
back to CGI on anything else. The pool connects to that socket's path for each connection;
only the pool can reach it, because it lies in a private directory of mode 0700. One
reaper: the supervisor learns of exits from SIGCHLD (or, under uvloop, which keeps SIGCHLD
for itself, from a pidfd per child) and calls :meth:`OsProcesses.reap`, which collects
every status with waitpid(-1), orphans adopted as a subreaper included.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import pwd
import signal
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import psutil

from . import hostcpu, logs, memcap
from .child import Child, ChildConnection
from .config import ChildSection, Config

log = logs.get("fcgipool.child")

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_PR_SET_PDEATHSIG = 1
_MAX_LINE = 4096


def child_environment(section: ChildSection, pool_env: Mapping[str, str]) -> dict[str, str]:
    """Built from config alone (like php-fpm's clear_env): an inherited PATH can break a
    child's embedded interpreter, so nothing passes unless named."""
    env = {"PATH": SAFE_PATH, "HOME": "/nonexistent", "LANG": "C.UTF-8"}
    env.update({name: pool_env[name] for name in section.pass_env if name in pool_env})
    env.update(section.env)
    return env


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def _prepare_child(entry: memcap.Entry) -> None:
    """Runs in the child between fork and exec: die with the pool, even by SIGKILL; enter
    the memory cap."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    entry.apply()


def read_usage(stat: int) -> tuple[int, int]:
    """(CPU clock ticks, resident pages) from an open /proc/PID/stat; (0, 0) if unreadable."""
    if stat < 0:
        return 0, 0
    try:
        data = os.pread(stat, 1024, 0)
    except OSError:
        return 0, 0
    fields = data[data.rfind(b")") + 2 :].split(b" ", 22)  # after "pid (comm) ", to rss
    try:
        return int(fields[11]) + int(fields[12]), int(fields[21])
    except (IndexError, ValueError):
        return 0, 0


class _OutputLines(asyncio.Protocol):
    """Reads a child's stdout or stderr and logs it line by line, each line bounded, at most
    ``rate`` lines a second on average (a token bucket holding 10 s worth): a child that
    floods its stderr must not flood the pool's log or its loop."""

    def __init__(
        self, child: Child, stream: str, enabled: bool, rate: float, clock: Callable[[], float]
    ) -> None:
        self.child = child
        self.pid, self.stream, self.enabled = child.pid, stream, enabled
        self.partial = b""
        self.rate = rate
        self.tokens = self.burst = rate * 10
        self.clock = clock
        self.refilled = clock()
        self.suppressed = 0

    def data_received(self, data: bytes) -> None:
        if not self.enabled:
            return
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()[-_MAX_LINE:]
        for line in lines:
            self._emit(line)

    def _emit(self, line: bytes) -> None:
        text = line[:_MAX_LINE].decode("utf-8", "replace").rstrip()
        if not text:
            return
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        if self.tokens < 1:
            self.suppressed += 1
            return
        self.tokens -= 1
        if self.suppressed:
            log.warning("child_output_suppressed", pid=self.pid, lines=self.suppressed)
            self.suppressed = 0
        request = self.child.request  # one at a time: the line is about the one it serves
        if request is None:
            log.info("child_output", pid=self.pid, stream=self.stream, line=text)
        else:
            log.info("child_output", pid=self.pid, stream=self.stream, line=text,
                     request=request.id, uri=request.uri)  # fmt: skip

    def connection_lost(self, exc: Exception | None) -> None:
        if self.partial:
            self._emit(self.partial)
        if self.suppressed:
            log.warning("child_output_suppressed", pid=self.pid, lines=self.suppressed)


def _same(protocol: _OutputLines) -> _OutputLines:
    return protocol


@dataclass
class _Process:
    popen: subprocess.Popen[bytes]
    measured: psutil.Process | None
    pidfd: int = -1
    stat: int = -1  # /proc/PID/stat, kept open: one pread per reading
    readers: list[asyncio.Task[Any]] = field(default_factory=list)


class OsProcesses:
    """Real processes for the children, their sockets in ``runtime_dir``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, runtime_dir: str, config: Config) -> None:
        self.loop = loop
        self.runtime_dir = runtime_dir
        self.cap = memcap.MemoryCap()
        self.cpu = hostcpu.CpuMeter(loop.time)
        self.configure(config)
        self.exited: Callable[[], None] | None = None  # set: learn of exits from pidfds
        self._processes: dict[int, _Process] = {}

    def configure(self, config: Config) -> None:
        """What the next children are started with (a reload changes it)."""
        self.section = config.child
        self.env = child_environment(config.child, os.environ)
        self.log_output = config.log.child_output
        self.output_rate = config.log.child_output_rate
        limit = int(config.child.max_memory)
        if limit and self.cap.mechanism == "off":
            self.cap = memcap.choose(limit)  # once: the mechanism does not change
        self.cap.limit = limit

    def cpu_busy(self, waiting: bool) -> float | None:
        return self.cpu.busy(waiting)

    def cpu_count(self) -> int:
        return len(self.cpu.cpus)

    def watch_pidfds(self, exited: Callable[[], None]) -> None:
        """SIGCHLD is not ours (uvloop): call ``exited`` when a child's pidfd says so."""
        self.exited = exited

    def spawn(self, child: Child) -> None:
        """Fork and exec the command with its private listening socket as fd 0; sets
        ``child.pid``. Raises OSError or SubprocessError when it cannot."""
        section = self.section
        child.socket_path = os.path.join(self.runtime_dir, f"child-{child.number}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(child.socket_path)
        identity: dict[str, Any] = {}
        if section.user:
            identity = {"user": section.user, "extra_groups": []}
            identity["group"] = section.group or pwd.getpwnam(section.user).pw_gid
        elif section.group:
            identity = {"group": section.group}
        entry = self.cap.enter(child.number) if self.cap.limit else memcap.Entry()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(child.socket_path)
            listener.listen(section.backlog)
            popen = subprocess.Popen(
                section.command,
                stdin=listener.fileno(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=section.cwd,
                env=self.env,
                close_fds=True,
                preexec_fn=partial(_prepare_child, entry),
                **identity,
            )
        finally:
            listener.close()
            self.cap.entered(entry)
        child.pid = popen.pid
        measured = None
        with contextlib.suppress(psutil.Error):
            measured = psutil.Process(popen.pid)
        process = self._processes[popen.pid] = _Process(popen, measured)
        for stream, pipe in (("stdout", popen.stdout), ("stderr", popen.stderr)):
            lines = _OutputLines(child, stream, self.log_output, self.output_rate, self.loop.time)
            process.readers.append(
                self.loop.create_task(self.loop.connect_read_pipe(partial(_same, lines), pipe))
            )
        with contextlib.suppress(OSError):
            process.stat = os.open(f"/proc/{popen.pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        if self.exited is not None:
            process.pidfd = os.pidfd_open(popen.pid)
            self.loop.add_reader(process.pidfd, self._pidfd_ready, process)

    def _pidfd_ready(self, process: _Process) -> None:
        self._close_pidfd(process)
        if self.exited is not None:
            self.exited()

    def _close_pidfd(self, process: _Process) -> None:
        if process.pidfd >= 0:
            self.loop.remove_reader(process.pidfd)
            os.close(process.pidfd)
            process.pidfd = -1

    async def connect(
        self, child: Child, factory: Callable[[], ChildConnection]
    ) -> ChildConnection:
        """A new connection to the child's socket; OSError when nobody listens."""
        _, connection = await self.loop.create_unix_connection(factory, child.socket_path)
        return connection

    def signal(self, child: Child, signum: int) -> None:
        if child.pid in self._processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    def reap(self) -> list[tuple[int, int]]:
        """Every exit status there is to collect now, as (pid, waitpid status)."""
        reaped = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            reaped.append((pid, status))
            process = self._processes.pop(pid, None)
            if process is not None:
                process.popen.returncode = os.waitstatus_to_exitcode(status)
                self._close_pidfd(process)
                if process.stat >= 0:
                    os.close(process.stat)
        return reaped

    def forget(self, child: Child) -> None:
        """The child was reaped: its socket file and its memory cap's leaf go."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(child.socket_path)
        self.cap.release(child.number)

    def killed_for_memory(self, child: Child) -> bool:
        """Whether the kernel killed the (reaped) child at child.max_memory."""
        return self.cap.killed(child.number)

    def close(self) -> None:
        """The pool stops: the memory cap's cgroups go."""
        self.cap.close()

    def usage(self, child: Child) -> tuple[int, int]:
        """CPU time (user and system, all threads) in clock ticks and resident pages, from
        /proc/PID/stat (one pread of a kept file, a few microseconds); (0, 0) when it cannot
        be read."""
        process = self._processes.get(child.pid)
        return read_usage(process.stat) if process is not None else (0, 0)

    def rss(self, child: Child) -> int:
        """Resident memory in bytes (0 when it cannot be read)."""
        process = self._processes.get(child.pid)
        try:
            return process.measured.memory_info().rss if process and process.measured else 0
        except psutil.Error:
            return 0

    def cpu_percent(self, child: Child) -> float:
        """CPU use since the previous call (psutil's way; the first call says 0)."""
        process = self._processes.get(child.pid)
        try:
            measured = process.measured if process else None
            return measured.cpu_percent(interval=None) if measured else 0.0
        except psutil.Error:
            return 0.0
