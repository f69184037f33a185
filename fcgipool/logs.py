"""Structured logs (structlog) to stderr or a file, as console lines or JSON."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO, cast

import structlog


class _Output:
    """The log destination; a file is reopened on SIGUSR1 (after logrotate moved it)."""

    def __init__(self) -> None:
        self.path = ""
        self.stream: TextIO = sys.stderr

    def open(self, path: str) -> None:
        self.close()
        self.path = path
        self.stream = open(path, "a", buffering=1, encoding="utf-8") if path else sys.stderr  # noqa: SIM115

    def close(self) -> None:
        if self.stream is not sys.stderr:
            self.stream.close()

    def write(self, text: str) -> int:
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


class _Batched:
    """Access-log lines are collected and written together a few times a second (and at
    exit): one write per batch instead of one per request, off the request's own path."""

    def __init__(self, output: _Output) -> None:
        self.output = output
        self.lines: list[str] = []

    def drain(self) -> None:
        if self.lines:
            text = "".join(self.lines)
            self.lines.clear()
            self.output.write(text)
            self.output.flush()


ACCESS_FIELDS = ("id", "client", "method", "uri", "project", "request_class", "pid",
                 "wait_ms", "ms", "status", "bytes", "cpu_ms", "rss_mib")  # fmt: skip
_MILLISECONDS = ("wait_ms", "ms")  # floats, written with two decimals
_CONSOLE_LINE = (
    "timestamp=%r event='access' "
    + " ".join(f"{name}=%.2f" if name in _MILLISECONDS else f"{name}=%r" for name in ACCESS_FIELDS)
    + "\n"
)


class _AccessLog:
    """The line written per request, formatted by hand: through structlog's processor chain
    it cost ~13 us, a third of the pool's Python time per request. Same look as the other
    lines: key=value (console) or JSON, an ISO UTC timestamp, event "access"."""

    def __init__(self, batch: _Batched) -> None:
        self.batch = batch
        self.json = False
        self._second = -1
        self._stamp = ""

    def write(self, values: tuple[Any, ...]) -> None:
        """One request's values, in the order of ACCESS_FIELDS; wait_ms and ms unrounded (the
        console line formats them with two decimals, which costs less than round())."""
        now = time.time()
        second = int(now)
        if second != self._second:  # strftime once a second
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        stamp = f"{self._stamp}.{int((now - second) * 1e6):06d}Z"
        if self.json:
            entry: dict[str, Any] = {"timestamp": stamp, "event": "access"}
            entry.update(zip(ACCESS_FIELDS, values, strict=True))
            for name in _MILLISECONDS:
                entry[name] = round(entry[name], 2)
            self.batch.lines.append(json.dumps(entry) + "\n")
        else:
            self.batch.lines.append(_CONSOLE_LINE % (stamp, *values))


_output = _Output()
_access = _Batched(_output)
_access_log = _AccessLog(_access)


def configure(fmt: str = "console", level: str = "info", path: str = "") -> None:
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    if path != _output.path:
        _output.open(path)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _output)),
        cache_logger_on_first_use=False,
    )
    _access_log.json = fmt == "json"


# Log one request (values in the order of ACCESS_FIELDS); see _Batched for when it is
# written: call flush_access() now and then. The method itself: one call less per request.
access = _access_log.write


def flush_access() -> None:
    _access.drain()


def reopen() -> None:
    _access.drain()
    if _output.path:
        _output.open(_output.path)


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    return cast(structlog.typing.FilteringBoundLogger, structlog.get_logger(name))
