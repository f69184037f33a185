"""What operators talk to: the control socket (`fcgipool status|reload|scale|stop`) and the
optional HTTP listener (/metrics, /healthz, /readyz, /status). Both run on the pool's loop:
no thread, so nothing here may block for long (psutil reads are per child, on demand).
They act through :class:`Controls`, which the supervisor is.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import os
from typing import Any, Protocol

import h11

from . import listeners, logs
from .config import Address
from .status import PoolView, snapshot

log = logs.get("fcgipool.admin")

_MAX_COMMAND = 4096


class Controls(PoolView, Protocol):
    """The verbs operators have, besides what they can read."""

    def reload(self) -> str:
        """Re-read the config and replace every child; why not, or an empty string."""

    def scale(self, workers: int) -> str: ...
    def project_rows(self) -> list[dict[str, Any]]: ...
    def project_command(self, action: str, named: str, count: int = 0) -> tuple[str, int]: ...
    def stop(self, fast: bool) -> None: ...
    def metrics(self) -> bytes: ...


# ---------------------------------------------------------------- control socket


class ControlServer:
    """A unix socket of mode 0600: one JSON command per connection, one JSON answer."""

    def __init__(self, pool: Controls, path: str) -> None:
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
        except Exception as error:  # a bug: the operator gets an answer, the log the cause
            log.exception("control_failed", error=repr(error))
            answer = {"ok": False, "error": f"the pool failed to carry it out: {error!r}"}
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
            problem = pool.reload()
            return {"ok": False, "error": problem} if problem else {"ok": True}
        if name == "scale":
            workers = command.get("workers")
            if not isinstance(workers, int):
                return {"ok": False, "error": "scale needs an integer 'workers'"}
            problem = pool.scale(workers)
            return {"ok": False, "error": problem} if problem else {"ok": True, "workers": workers}
        if name == "projects":
            return self._projects(command)
        if name == "stop":
            asyncio.get_running_loop().call_soon(pool.stop, bool(command.get("fast")))
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {name!r}"}


    def _projects(self, command: dict[str, Any]) -> dict[str, Any]:
        action, path, count = command.get("action"), command.get("path"), command.get("count", 0)
        if action is None:
            return {"ok": True, "projects": self.pool.project_rows()}
        if not isinstance(path, str) or not path or not isinstance(count, int) or count < 0:
            return {"ok": False, "exit": 2, "error": "projects needs a 'path' (and a 'count' >= 0)"}
        problem, children = self.pool.project_command(str(action), path, count)
        if problem:
            return {"ok": False, "exit": 2, "error": problem}
        return {"ok": True, "action": action, "path": path, "children": children}


# ---------------------------------------------------------------- HTTP admin


class HttpAdmin(asyncio.Protocol):
    """HTTP/1.1 for a few GET routes, parsed by h11; one request per connection."""

    def __init__(self, pool: Controls) -> None:
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


def route(pool: Controls, method: str, path: str) -> tuple[int, str, bytes]:
    if method not in ("GET", "HEAD"):
        return 405, "text/plain", b"method not allowed\n"
    if path == "/metrics":
        from .metrics import CONTENT_TYPE

        return 200, CONTENT_TYPE, pool.metrics()
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
