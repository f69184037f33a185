"""The self-tuning pool: the cost model, admission by predicted wait, cost order with its age
bound, protection of short requests, the bound on buffered request bytes. On the real pool
with fake children and a clock the test moves, the default configuration unless a test is
about a setting."""

from __future__ import annotations

import pytest

from fcgipool.config import Config, TuningSection
from fcgipool.costs import CostModel, bucket
from fcgipool.dispatch import lane

DEFAULTS = Config()
QUEUE_TIMEOUT = DEFAULTS.limits.queue_timeout
MAX_AGE = DEFAULTS.tuning.max_reorder_wait


def wms(layers: str, size: int, sleep: float) -> str:
    return (f"/ows?SERVICE=WMS&REQUEST=GetMap&MAP=/p.qgs&LAYERS={layers}"
            f"&WIDTH={size}&HEIGHT={size}&sleep={sleep}")  # fmt: skip


TILE = wms("roads", 256, 0.02)
PRINT = wms("roads", 4096, 5.0)


def burst(h, uri: str, count: int):
    return [h.connect().request(uri) for _ in range(count)]


def answered(responses) -> bool:
    return all(response.end is not None for response in responses)


# ---------------------------------------------------------------- the cost model


def kind(model: CostModel, query: dict[str, str], project: str = "/p.qgs"):
    return model.kind(query, project)


def test_a_kind_is_project_request_size_bucket_and_layers():
    model = CostModel(TuningSection())
    tile = kind(model, {"REQUEST": "GetMap", "LAYERS": "a", "WIDTH": "256", "HEIGHT": "256"})
    assert tile == ("/p.qgs", "GetMap", 256, "a")
    assert (
        kind(model, {"REQUEST": "GetMap", "LAYERS": "a", "WIDTH": "250", "HEIGHT": "200"}) == tile
    )
    big = kind(model, {"REQUEST": "GetMap", "LAYERS": "a", "WIDTH": "1024", "HEIGHT": "872"})
    assert big[2] == 1024
    assert kind(model, {"REQUEST": "GetMap", "WIDTH": "x", "HEIGHT": "1"})[2] == 0
    assert [bucket(n) for n in (0, 1, 65536, 65537, 2048 * 2048)] == [0, 1, 256, 512, 2048]
    long_layers = kind(model, {"REQUEST": "GetMap", "LAYERS": "x" * 5000})[3]
    assert len(long_layers) < 300, "a huge LAYERS value is kept short"


def test_learning_the_mean_and_p90_of_a_kind():
    model = CostModel(TuningSection())
    tile = ("/p.qgs", "GetMap", 256, "a")
    for seconds in [0.01] * 9 + [0.1]:
        model.learn(tile, "heavy", seconds)
    assert model.predict(tile, "heavy") == pytest.approx(0.019)
    (row,) = model.rows()
    assert row["count"] == 10 and row["mean_ms"] == pytest.approx(19.0)
    assert row["p90_ms"] == pytest.approx(100.0)
    assert row["size"] == 256 and row["request"] == "GetMap"


def test_the_mean_decays_to_follow_change():
    model = CostModel(TuningSection())
    tile = ("/p.qgs", "GetMap", 256, "a")
    for _ in range(100):
        model.learn(tile, "heavy", 0.01)
    for _ in range(30):  # the project got slower
        model.learn(tile, "heavy", 1.0)
    assert model.predict(tile, "heavy") > 0.9, "30 new measurements outweigh 100 old ones"


def test_kinds_not_seen_take_the_first_fallback_that_has_a_cost():
    model = CostModel(TuningSection())
    model.learn(("/p.qgs", "GetMap", 256, "a"), "heavy", 0.02)
    model.learn(("/q.qgs", "GetPrint", 0, ""), "heavy", 3.0)
    assert model.predict(("/p.qgs", "GetMap", 2048, "b"), "heavy") == 0.02  # project+REQUEST
    assert model.predict(("/new.qgs", "GetPrint", 0, ""), "heavy") == 3.0  # REQUEST
    assert model.predict(("/new.qgs", "GetFeature", 0, ""), "heavy") == pytest.approx(1.51)
    assert model.predict(("/new.qgs", "GetFeature", 0, ""), "light") == 0.0  # nothing known


def test_the_table_of_kinds_is_bounded_least_recent_forgotten_first():
    model = CostModel(TuningSection(kinds=16))
    for n in range(40):
        model.learn(("/p.qgs", "GetMap", 256, f"layer{n}"), "heavy", 0.01 * (n + 1))
    model.learn(("/p.qgs", "GetMap", 256, "layer30"), "heavy", 0.31)  # seen again
    assert len(model.kinds) == 16 and len(model.by_project) == 1
    assert ("/p.qgs", "GetMap", 256, "layer0") not in model.kinds
    model.learn(("/p.qgs", "GetMap", 256, "fresh"), "heavy", 0.5)
    assert ("/p.qgs", "GetMap", 256, "layer30") in model.kinds, "used recently: kept"
    assert ("/p.qgs", "GetMap", 256, "layer24") not in model.kinds


def test_lanes_double_with_the_cost():
    assert [lane(c) for c in (0.0, 0.0005, 0.001, 0.003, 0.02, 1.0, 1e6)] == [0, 0, 1, 2, 5, 10, 15]


def test_the_pool_learns_what_its_children_take(harness):
    h = harness()
    for _ in range(3):
        assert h.get(TILE).status == 200
    assert h.get(PRINT).status == 200
    costs = {(row["size"], row["count"]): row["mean_ms"] for row in h.pool.status()["costs"]}
    assert costs[(256, 3)] == pytest.approx(20, abs=1)
    assert costs[(4096, 1)] == pytest.approx(5000, abs=5)
    waits = h.pool.status()["pool"]["classes"]
    assert waits["heavy"]["predicted_wait"] == 0.0, "nothing waits"
    assert "fcgipool_class_predicted_wait_seconds" in h.pool.metrics().decode()


# ---------------------------------------------------------------- admission


def test_a_burst_of_1000_that_fits_within_the_queue_timeout_is_all_served(harness):
    """2 children, 1,000 tiles of 20 ms at once: 10 s of work, well within 30 s."""
    h = harness()
    h.get(TILE)
    responses = burst(h, TILE, 1000)
    h.until(lambda: answered(responses), within=QUEUE_TIMEOUT)
    assert [r.status for r in responses] == [200] * 1000


def test_a_burst_before_anything_is_learned_is_admitted(harness):
    h = harness()
    responses = burst(h, TILE, 500)
    h.until(lambda: answered(responses), within=QUEUE_TIMEOUT)
    assert [r.status for r in responses] == [200] * 500


def test_overload_is_refused_at_once_by_predicted_wait(harness):
    """Maps of 2 s on 2 children: the 31st waiting one would wait 30 s."""
    h = harness()
    slow = wms("roads", 1024, 2.0)
    h.get(slow)
    sent = h.now()
    responses = burst(h, slow, 100)
    h.run(0.01)
    refused = [r for r in responses if r.end is not None]
    assert len(refused) == 100 - 2 - 31, "2 running, 31 waiting (predicted 0..30 s)"
    assert all(r.status == 503 and r.headers["Retry-After"] == "5" for r in refused)
    assert b"predicted wait" in refused[0].body
    assert h.pool.status()["pool"]["refused_predicted_wait"] == len(refused)
    h.until(lambda: answered(responses), within=QUEUE_TIMEOUT + 5)
    served = [r for r in responses if r.status == 200]
    assert len(served) >= 2 + 29, "what was admitted is served (the last may time out)"
    assert h.now() - sent <= QUEUE_TIMEOUT + 2


def test_count_admission_only_bounds_the_queue(harness):
    h = harness({"tuning": {"admission": "count"}, "limits": {"max_waiting": 50}})
    slow = wms("roads", 1024, 2.0)
    h.get(slow)
    responses = burst(h, slow, 100)
    h.run(0.01)
    assert sum(r.end is not None for r in responses) == 100 - 2 - 50


# ---------------------------------------------------------------- cost order


def test_cheaper_requests_go_first_in_a_class(harness):
    h = harness({"pool": {"workers": 1}})
    for uri in (TILE, PRINT):
        h.get(uri)
    h.connect().request(wms("roads", 1024, 1.0))  # the child is busy for 1 s
    h.run(0.1)
    long = h.connect().request(PRINT)
    h.run(0.1)
    short = h.connect().request(TILE)
    h.until(lambda: short.end is not None, within=2)
    assert long.end is None, "the tile, queued later, went first"


def test_no_request_is_passed_over_past_the_age_bound(harness):
    """One child, tiles arriving faster than it serves them: the print still starts once it
    has waited max_reorder_wait."""
    h = harness({"pool": {"workers": 1}})
    for uri in (TILE, PRINT):
        h.get(uri)
    tiles = [h.connect().request(TILE)]
    h.settle()
    queued = h.now()
    long = h.connect().request(PRINT)
    program = h.programs()[0]
    while h.now() - queued < MAX_AGE + 1:
        tiles.append(h.connect().request(TILE))
        h.run(0.01)  # one tile every 10 ms, each takes 20 ms: tiles always wait
    printing = [p for p in program.served if b"4096" in p[b"QUERY_STRING"]]
    assert len(printing) == 2, "the print started"
    started = next(i for i, p in enumerate(program.served) if p is printing[1])
    tiles_before = started - 3  # the warm-up requests: a tile and a print
    assert MAX_AGE / 0.02 - 3 <= tiles_before <= MAX_AGE / 0.02 + 3
    assert long.end is None


# ---------------------------------------------------------------- protection


def test_long_requests_never_take_the_last_child_while_short_ones_keep_coming(harness):
    h = harness({"pool": {"workers": 4}})
    for uri in (TILE, PRINT):
        h.get(uri)
    for _ in range(30):  # short requests keep coming: they have needed a child lately
        h.connect().request(TILE)
        h.run(0.05)
    prints = burst(h, PRINT, 12)
    slowest = 0.0
    for _ in range(100):
        sent = h.now()
        tile = h.connect().request(TILE)
        h.until(lambda tile=tile: tile.end is not None, within=10)
        slowest = max(slowest, h.now() - sent)
        busy_printing = sum(1 for row in h.pool.status()["children"]
                            if row["request"] and "4096" in row["request"]["uri"])  # fmt: skip
        assert busy_printing <= 3
        h.run(0.05)
    assert slowest < 0.05, "a tile never waits for a print"
    assert h.pool.status()["pool"]["reserved_for_short"] == 1
    h.until(lambda: answered(prints), within=60)
    assert all(r.status == 200 for r in prints)


def test_long_requests_take_every_child_when_no_short_ones_come(harness):
    h = harness({"pool": {"workers": 4}})
    h.get(PRINT)
    h.run(120)  # what short requests there were is long forgotten
    burst(h, PRINT, 8)
    h.run(0.1)
    assert len(h.busy()) == 4


def test_an_explicit_reservation_turns_the_learned_one_off(harness):
    h = harness(
        {
            "pool": {"workers": 4},
            "classes": [{"name": "light", "match": {"REQUEST": "GetCapabilities"}, "reserved": 2}],
        }
    )
    assert not h.pool.dispatcher.protect


# ---------------------------------------------------------------- buffered bytes


def test_request_bytes_of_waiting_requests_are_bounded_and_accounted(harness):
    h = harness({"pool": {"workers": 1}, "limits": {"max_buffered": "64KiB"}})
    h.connect().request("/?sleep=1")
    h.settle()
    body = b"x" * 70000
    posts = []
    for _ in range(3):
        web = h.connect()
        posts.append((web, web.request("/upload", method="POST", body=body)))
    h.settle()
    ctx = h.pool.frontend.context
    assert ctx.buffered > 65536
    held = [c for c in h.pool.frontend.connections if c.reading_held_by]
    assert held, "past max_buffered, waiting requests' connections are not read"
    h.until(lambda: answered([r for _, r in posts]), within=10)
    assert all(r.status == 200 for _, r in posts)
    bodies = [p for p in h.programs()[0].served if p.get(b"REQUEST_METHOD") == b"POST"]
    assert len(bodies) == 3
    assert ctx.buffered == 0


def test_long_requests_held_back_for_short_ones_grow_an_adaptive_pool(harness):
    """The child kept free for short requests is idle, yet long ones wait: that is a lack
    of capacity, and an adaptive pool starts children for it."""
    h = harness({"pool": {"workers": 2, "min_workers": 2, "max_workers": 4}})
    for uri in (TILE, PRINT):
        h.get(uri)
    for _ in range(30):
        h.connect().request(TILE)
        h.run(0.05)
    prints = burst(h, PRINT, 8)
    h.until(lambda: h.pool.children.workers == 4, within=10, what="the pool grown")
    assert h.pool.dispatcher.reserve() == 1
    h.until(lambda: answered(prints), within=60)
    assert all(r.status == 200 for r in prints)
