"""timeouts.slow: one slow_request report per request that runs past it, none for the
others; off by default."""

from __future__ import annotations

import structlog


def test_a_request_past_timeouts_slow_is_reported_once(harness):
    h = harness({"timeouts": {"slow": 2.0}})
    with structlog.testing.capture_logs() as logged:
        web = h.connect()
        slow = web.request("/?sleep=5", request_id=1)
        fast = web.request("/?sleep=1", request_id=2)
        h.until(lambda: slow.end is not None and fast.end is not None, 20)
    reports = [entry for entry in logged if entry["event"] == "slow_request"]
    assert [entry["uri"] for entry in reports] == ["/?sleep=5"]
    assert reports[0]["elapsed"] >= 2.0 and {"wchan", "syscall", "stack"} <= set(reports[0])
    assert h.pool.diagnostics.reported == 1


def test_off_by_default(harness):
    h = harness()
    assert h.get("/?sleep=30").status == 200
    assert h.pool.diagnostics.reported == 0
