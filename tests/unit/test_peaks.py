"""High-water marks: peaks kept where the value changes (a scrape misses a 1 s burst),
since start and over the last 30-60 s; moments all children were busy; refusals."""

from __future__ import annotations

from fcgipool.status import snapshot


def test_a_short_burst_leaves_its_peaks_in_status_and_they_age_out_of_the_last_minute(harness):
    h = harness({"limits": {"max_waiting": 5}})
    web = h.connect()
    answers = [web.request(f"/?sleep=1&n={i}", request_id=i + 1) for i in range(9)]
    h.until(lambda: all(a.end is not None for a in answers), 30, "the burst answered")
    statuses = sorted(a.status for a in answers)
    assert statuses == [200] * 7 + [503] * 2  # 2 served at once, 5 waited, 2 refused
    peaks = snapshot(h.pool)["pool"]["peaks"]
    assert peaks["waiting"] == {"since_start": 5, "last_minute": 5}
    assert peaks["busy"] == {"since_start": 2, "last_minute": 2}
    assert peaks["all_busy"] >= 4 and peaks["refused"]["queue_full"] == 2
    assert snapshot(h.pool)["pool"]["queue_length"] == 0, "the gauge has forgotten it"
    h.run(61)
    peaks = snapshot(h.pool)["pool"]["peaks"]
    assert peaks["waiting"] == {"since_start": 5, "last_minute": 0}
    assert peaks["busy"]["last_minute"] == 0 and peaks["busy"]["since_start"] == 2
    text = h.pool.metrics().decode()
    assert 'fcgipool_peak_waiting{window="since_start"} 5.0' in text
    assert "fcgipool_queue_full_total 2.0" in text
