"""A child's output lines carry the request it was serving (one at a time), none when idle."""

from __future__ import annotations

from types import SimpleNamespace

import structlog

from fcgipool.processes import _OutputLines


def test_each_line_names_the_request_the_child_serves_and_none_when_idle():
    child = SimpleNamespace(pid=42, request=None)
    lines = _OutputLines(child, "stderr", True, 50.0, lambda: 0.0)  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logged:
        lines.data_received(b"starting up\n")
        child.request = SimpleNamespace(id="abc", uri="/ows?REQUEST=GetMap")
        lines.data_received(b"rendering\nhalf a li")
        child.request = None
        lines.data_received(b"ne\n")
    assert [(entry["line"], entry.get("request"), entry.get("uri")) for entry in logged] == [
        ("starting up", None, None),
        ("rendering", "abc", "/ows?REQUEST=GetMap"),
        ("half a line", None, None),
    ]
    assert {entry["pid"] for entry in logged} == {42}
