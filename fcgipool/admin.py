"""What operators talk to: the control socket (`fcgipool status|reload|scale|stop`) and the
optional HTTP listener (/metrics, /healthz, /readyz, /status). Both run on the pool's loop:
no thread, so nothing here may block for long (psutil reads are per child, on demand).

The status document (``snapshot``) is a public contract, documented in docs/status.md:
fields are added, never renamed or removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import os
import time
from typing import TYPE_CHECKING, Any

import h11

from . import __version__, listeners, logs
from .child import State
from .config import Address

if TYPE_CHECKING:
    from .supervisor import Pool

log = logs.get("fcgipool.admin")

STATUS_VERSION = 1
_MAX_COMMAND = 4096


def snapshot(pool: Pool) -> dict[str, Any]:
    """The pool and one row per child, as `fcgipool status --json` prints it."""
    now = time.monotonic()
    counts = {state.value: 0 for state in State if state is not State.DEAD}
    rows = []
    for child in pool.children:
        if child.state is State.DEAD:
            continue
        counts[child.state.value] += 1
        request = child.request
        rows.append(
            {
                "pid": child.pid,
                "state": child.state.value,
                "requests": child.requests_served,
                "request": None
                if request is None
                else {
                    "method": request.params.get(b"REQUEST_METHOD", b"").decode("latin-1"),
                    "uri": request.uri,
                    "elapsed": round(now - (request.started or now), 3),
                },
                "rss": child.rss(),
                "cpu_percent": child.cpu_percent(),
                "age": round(now - child.started_at, 3),
                "retiring": child.retiring or None,
                "projects": list(child.projects),
            }
        )
    return {
        "version": STATUS_VERSION,
        "pool": {
            "pid": os.getpid(),
            "fcgipool": __version__,
            "uptime": round(pool.uptime(), 3),
            "generation": pool.reloads,
            "config_file": pool.config_path,
            "workers": pool.config.pool.workers,
            "children": counts,
            "queue_length": pool.dispatcher.waiting,
            "classes": {
                queue.name: {"waiting": len(queue.waiting), "running": queue.running}
                for queue in pool.dispatcher.by_priority
            },
            "max_waiting": pool.config.limits.max_waiting,
            "connections": len(pool.connections),
            "requests_served": pool.requests_served,
            "failure_pressure": round(pool.failure_pressure(), 4),
            "max_failure_pressure": pool.config.pool.max_failure_pressure,
            "stopping": pool.stopping,
            "ready": pool.ready(),
        },
        "children": rows,
    }


# ---------------------------------------------------------------- control socket


class ControlServer:
    """A unix socket of mode 0600: one JSON command per connection, one JSON answer."""

    def __init__(self, pool: Pool, path: str) -> None:
        self.pool, self.path = pool, path
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        address = Address("unix", path=self.path)
        sock = listeners.bind(address, 0o600, key="pool.control")
        self.server = await asyncio.start_unix_server(self._serve, sock=sock)
        log.info("control_socket", path=self.path)

    def close(self) -> None:
        if self.server is not None:  # else the file is not ours (e.g. another pool's)
            self.server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            answer = self.execute(line[:_MAX_COMMAND])
        except (TimeoutError, ConnectionError):
            answer = {"ok": False, "error": "no command received"}
        writer.write(json.dumps(answer).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    def execute(self, line: bytes) -> dict[str, Any]:
        try:
            command = json.loads(line)
            name = command["command"]
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": "expected a JSON object with a 'command'"}
        pool = self.pool
        if name == "status":
            return {"ok": True, "status": snapshot(pool)}
        if name == "reload":
            problem = pool.handle_hup()
            return {"ok": False, "error": problem} if problem else {"ok": True}
        if name == "scale":
            workers = command.get("workers")
            if not isinstance(workers, int):
                return {"ok": False, "error": "scale needs an integer 'workers'"}
            problem = pool.scale(workers)
            return {"ok": False, "error": problem} if problem else {"ok": True, "workers": workers}
        if name == "stop":
            asyncio.get_running_loop().call_soon(
                pool.handle_quit if command.get("fast") else pool.handle_term
            )
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {name!r}"}


# ---------------------------------------------------------------- HTTP admin


class HttpAdmin(asyncio.Protocol):
    """HTTP/1.1 for a few GET routes, parsed by h11; one request per connection."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.connection = h11.Connection(h11.SERVER)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.connection.receive_data(data)
        try:
            event = self.connection.next_event()
        except h11.RemoteProtocolError:
            self._send(400, "text/plain", b"bad request\n")
            return
        if isinstance(event, h11.Request):
            path = event.target.decode("latin-1").split("?", 1)[0]
            method = event.method.decode()
            status, content_type, body = route(self.pool, method, path)
            self._send(status, content_type, body, head=method == "HEAD")

    def _send(self, status: int, content_type: str, body: bytes, head: bool = False) -> None:
        headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
        ]
        try:
            out = self.connection.send(h11.Response(status_code=status, headers=headers))
            if not head:
                out += self.connection.send(h11.Data(data=body))
            out += self.connection.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            out = b""
        assert self.transport is not None
        self.transport.write(out)
        self.transport.close()


def route(pool: Pool, method: str, path: str) -> tuple[int, str, bytes]:
    if method not in ("GET", "HEAD"):
        return 405, "text/plain", b"method not allowed\n"
    if path == "/metrics":
        from .metrics import CONTENT_TYPE

        return 200, CONTENT_TYPE, pool.metrics.render()
    if path == "/healthz":
        return 200, "text/plain", b"ok\n"
    if path == "/readyz":
        ready, reason = pool.readiness()
        return (200 if ready else 503), "text/plain", (reason + "\n").encode()
    if path in ("/status", "/status/"):
        return 200, "text/html; charset=utf-8", status_page(snapshot(pool)).encode()
    if path == "/status.json":
        return 200, "application/json", json.dumps(snapshot(pool)).encode()
    return 404, "text/plain", b"not found\n"


def status_page(status: dict[str, Any]) -> str:
    """A self-refreshing HTML page: the pool, then one row per child."""
    pool = status["pool"]
    escape = html.escape
    children = "".join(
        "<tr>"
        f"<td>{row['pid']}</td><td class='{row['state']}'>{row['state']}</td>"
        f"<td>{row['requests']}</td>"
        f"<td>{escape(row['request']['method'] + ' ' + row['request']['uri']) if row['request'] else ''}</td>"  # noqa: E501
        f"<td>{row['request']['elapsed'] if row['request'] else ''}</td>"
        f"<td>{row['rss'] / 2**20:.1f}</td><td>{row['cpu_percent']:.1f}</td>"
        f"<td>{row['age']:.0f}</td><td>{escape(row['retiring'] or '')}</td>"
        "</tr>"
        for row in status["children"]
    )
    states = ", ".join(f"{count} {state}" for state, count in pool["children"].items() if count)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<title>fcgipool status</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-top: 1em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; }}
th {{ background: #eee; }} .busy {{ color: #b35c00; font-weight: bold; }}
.idle {{ color: #2a7a2a; }} .starting, .recovering, .stopping {{ color: #666; }}
dt {{ font-weight: bold; float: left; width: 12em; }}
</style></head><body>
<h1>fcgipool status</h1>
<dl>
<dt>pid</dt><dd>{pool["pid"]}</dd>
<dt>uptime</dt><dd>{pool["uptime"]:.0f} s</dd>
<dt>generation</dt><dd>{pool["generation"]}</dd>
<dt>children</dt><dd>{pool["workers"]} configured: {escape(states) or "none"}</dd>
<dt>queue</dt><dd>{pool["queue_length"]} of {pool["max_waiting"]}</dd>
<dt>requests served</dt><dd>{pool["requests_served"]}</dd>
<dt>failure pressure</dt><dd>{pool["failure_pressure"]} (limit {pool["max_failure_pressure"]})</dd>
<dt>config file</dt><dd>{escape(str(pool["config_file"] or "-"))}</dd>
</dl>
<table id="children">
<tr><th>pid</th><th>state</th><th>requests</th><th>current request</th><th>elapsed s</th>
<th>RSS MiB</th><th>CPU %</th><th>age s</th><th>retiring</th></tr>
{children}
</table>
</body></html>
"""
