"""What a stuck child was doing: the slow-request report.

A request running longer than ``timeouts.slow`` gets one ``slow_request`` line: the child,
the request (id, URI, class, project, elapsed) and what /proc says of the child (where it
sleeps in the kernel, its current system call, its kernel stack where readable, its CPU
time and memory). The same report is written just before a child that did not come back
after a timeout is stopped, since the evidence goes with it. ``timeouts.slow_command``
(e.g. ``eu-stack -p {pid}``) adds the user-space stacks: it runs as a subprocess whose
output is read off the loop's back, bounded in time and size, and logged as
``slow_request_command``. The /proc reads are a few small files, and only for slow
requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import subprocess
from typing import TYPE_CHECKING, Any

from . import logs

if TYPE_CHECKING:
    from .child import Child
    from .config import Config
    from .request import Request

log = logs.get("fcgipool.diagnostics")

OUTPUT_LIMIT = 65536  # bytes of slow_command output kept; the rest is cut
STACK_LINES = 32
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _read(path: str, limit: int = 4096) -> str:
    try:
        with open(path, "rb") as file:
            return file.read(limit).decode("latin-1").strip()
    except OSError:
        return ""


def proc_state(pid: int) -> dict[str, Any]:
    """What /proc says of ``pid``: wchan, the current system call, the kernel stack (root
    only), CPU seconds so far and resident MiB. A field that cannot be read is empty."""
    stat = _read(f"/proc/{pid}/stat")
    fields = stat[stat.rfind(")") + 2 :].split()
    cpu, rss = 0.0, 0
    if len(fields) > 21:
        cpu = (int(fields[11]) + int(fields[12])) / _TICKS
        rss = int(fields[21]) * _PAGE // 2**20
    syscall = _read(f"/proc/{pid}/syscall").split(" ", 1)[0]
    stack = _read(f"/proc/{pid}/stack", 8192).splitlines()[:STACK_LINES]
    return {
        "state": fields[0] if fields else "",
        "wchan": _read(f"/proc/{pid}/wchan"),
        "syscall": syscall,
        "stack": " | ".join(line.split("] ", 1)[-1] for line in stack),
        "cpu_seconds": round(cpu, 2),
        "rss_mib": rss,
    }


class Diagnostics:
    """Slow-request reports for one pool."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.reported = 0  # slow_request lines written
        self.running: set[subprocess.Popen[bytes]] = set()
        self.configure(config)

    def configure(self, config: Config) -> None:
        section = config.timeouts
        self.slow = section.slow
        self.command = shlex.split(section.slow_command)
        self.command_timeout = section.slow_command_timeout

    def check(self, requests: list[Request], now: float) -> None:
        """Report each request past ``timeouts.slow``, once (a few times a second)."""
        if not self.slow:
            return
        for request in requests:
            if not request.slow_reported and request.started and (
                now - request.started > self.slow
            ):
                request.slow_reported = True
                child = request.child
                if child is not None:
                    self.report(child, request, "slow_request", now)

    def before_stop(self, child: Child, request: Request | None) -> None:
        """A child that did not come back after a timeout is about to be stopped."""
        self.report(child, request, "stuck_child", self.loop.time())

    def report(self, child: Child, request: Request | None, event: str, now: float) -> None:
        self.reported += event == "slow_request"
        about: dict[str, Any] = {}
        if request is not None:
            about = {"request": request.id, "uri": request.uri,
                     "request_class": request.request_class, "project": request.project,
                     "elapsed": round(now - (request.started or now), 3)}  # fmt: skip
        log.warning(event, pid=child.pid, **about, **proc_state(child.pid))
        if self.command:
            self._run(child.pid, about.get("request"), event)

    def _run(self, pid: int, request_id: str | None, event: str) -> None:
        argv = [part.replace("{pid}", str(pid)) for part in self.command]
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, close_fds=True)  # fmt: skip
        except OSError as error:
            log.warning("slow_request_command", pid=pid, request=request_id,
                        error=f"could not run {argv[0]}: {error.strerror or error}")  # fmt: skip
            return
        self.running.add(process)
        self.loop.create_task(self._collect(process, pid, request_id, event))

    async def _collect(
        self, process: subprocess.Popen[bytes], pid: int, request_id: str | None, event: str
    ) -> None:
        """Read the command's output off the loop's back, at most OUTPUT_LIMIT bytes and
        ``slow_command_timeout`` seconds; then it is killed. Its exit status goes to the
        pool's one reaper (children.py), which logs it as an orphan."""
        assert process.stdout is not None
        reader = asyncio.StreamReader(limit=OUTPUT_LIMIT * 2)
        transport, _ = await self.loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), process.stdout
        )
        output, timed_out = b"", False
        try:
            deadline = self.loop.time() + self.command_timeout
            while len(output) <= OUTPUT_LIMIT:
                left = deadline - self.loop.time()
                if left <= 0:
                    timed_out = True
                    break
                try:
                    chunk = await asyncio.wait_for(reader.read(16384), left)
                except TimeoutError:
                    timed_out = True
                    break
                if not chunk:
                    break
                output += chunk
        finally:
            transport.close()
            self.running.discard(process)
        cut = len(output) > OUTPUT_LIMIT
        if timed_out or cut:  # still running (after EOF it is gone, its pid maybe reused)
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
        text = output[:OUTPUT_LIMIT].decode("utf-8", "replace")
        log.info("slow_request_command", pid=pid, request=request_id, about=event,
                 timed_out=timed_out, truncated=cut, output=text)  # fmt: skip

