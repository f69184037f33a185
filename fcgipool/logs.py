"""Structured logs (structlog) to stderr or a file, as console lines or JSON."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

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

    def write(self, text: str) -> int:
        self.lines.append(text)
        return len(text)

    def flush(self) -> None:
        """structlog's PrintLogger flushes after every line: ignored, see drain()."""

    def drain(self) -> None:
        if self.lines:
            text = "".join(self.lines)
            self.lines.clear()
            self.output.write(text)
            self.output.flush()


_output = _Output()
_access = _Batched(_output)
_access_logger: structlog.typing.FilteringBoundLogger | None = None


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
        logger_factory=structlog.PrintLoggerFactory(file=_output),
        cache_logger_on_first_use=False,
    )
    global _access_logger
    # A lean chain for the line written per request: console gets key=value (ConsoleRenderer
    # costs ~35 us a line, this ~13 us), json gets JSON.
    access_renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.processors.KeyValueRenderer(key_order=["timestamp", "event"])
    )
    _access_logger = structlog.wrap_logger(
        structlog.PrintLogger(_access),
        processors=[structlog.processors.TimeStamper(fmt="iso", utc=True), access_renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    )


def access() -> structlog.typing.FilteringBoundLogger:
    """The access logger (see _Batched); call flush_access() now and then."""
    assert _access_logger is not None, "logs.configure() first"
    return _access_logger


def flush_access() -> None:
    _access.drain()


def reopen() -> None:
    _access.drain()
    if _output.path:
        _output.open(_output.path)


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
