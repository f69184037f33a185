"""log.request_cost: the child's CPU time on each request and its memory after it, in the
access log, in status (its last request) and in a CPU histogram per class."""

from __future__ import annotations

from fcgipool.status import snapshot


def test_cpu_and_memory_of_a_request_reach_status_and_metrics(harness):
    h = harness({"pool": {"workers": 1}}, start=False)
    h.processes.on_spawn = lambda program: setattr(program, "cpu_ticks", 500)  # start-up
    h.pool.start()
    h.until(lambda: h.pool.children.ready() == 1)
    (child,) = h.pool.children.all
    program = h.processes.programs[child.pid]
    web = h.connect()
    answer = web.request("/?sleep=1")
    h.busy()
    program.cpu_ticks += 20  # 200 ms of CPU while it serves it
    program.rss = 300 * 2**20
    h.until(lambda: answer.end is not None, 10)
    (row,) = snapshot(h.pool)["children"]
    assert row["last_request"] == {"cpu_ms": 200, "rss_mib": 300}
    text = h.pool.metrics().decode()
    assert 'fcgipool_request_cpu_seconds_sum{class="default"} 0.2' in text
    assert 'fcgipool_request_cpu_seconds_count{class="default"} 1.0' in text


def test_request_cost_off_reads_nothing(harness):
    h = harness({"log": {"request_cost": False}})
    assert h.get("/?n=1").status == 200
    assert all(row["last_request"] is None for row in snapshot(h.pool)["children"])
