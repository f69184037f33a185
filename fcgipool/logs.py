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


_output = _Output()


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


def reopen() -> None:
    if _output.path:
        _output.open(_output.path)


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
