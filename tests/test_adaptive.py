"""The adaptive number of children with real processes (tests/apps/fault_app.py): a burst
grows the pool to max_workers, idleness brings it back to min_workers, no request is lost
and no zombie is left while children come and go. Deadlines, no fixed sleeps."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import fault_config, pool_status, wait_for
from fcgipool import client


def defunct_children(pid: int) -> list[int]:
    """Zombies whose parent is ``pid``, from /proc/PID/stat (state Z, field 4 the ppid)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state == "Z" and int(ppid) == pid:
            found.append(int(entry.name))
    return found


def burst(pool, count: int, wave: int) -> list[int]:
    """``count`` slow requests at once; their statuses."""

    def one(n: int) -> int:
        return client.request(pool.address, f"/?sleep=600&wave={wave}&n={n}", timeout=60).status

    with ThreadPoolExecutor(count) as threads:
        return list(threads.map(one, range(count)))


def test_a_burst_grows_the_pool_to_max_and_idleness_brings_it_back_to_min(pool_factory, workdir):
    config = fault_config(
        workdir,
        pool={"workers": 1, "min_workers": 1, "max_workers": 4, "idle_timeout": 3.0},
        timeouts={"request": 30.0},
        limits={"queue_timeout": 60.0},
    )
    pool = pool_factory(config)
    assert len(pool.children()) == 1
    seen: set[int] = set()
    most = 0  # children not stopping, at any poll
    for wave in range(2):
        with ThreadPoolExecutor(1) as background:
            statuses = background.submit(burst, pool, 32, wave)

            def grown() -> bool:
                nonlocal most
                document = pool_status(pool)["pool"]
                counts = document["children"]
                most = max(most, sum(n for state, n in counts.items() if state != "stopping"))
                seen.update(pool.children())
                return document["workers"] == 4 and counts["busy"] == 4

            wait_for(grown, 30, "four children serving the burst")
            assert statuses.result(120) == [200] * 32, "no request lost while children came"
            assert most == 4, "never more than max_workers"
        assert defunct_children(pool.pid) == []

        def shrunk() -> bool:
            document = pool_status(pool)["pool"]
            return document["workers"] == 1 and len(pool.children()) == 1

        wait_for(shrunk, 30, "idle children retired down to min_workers")
        assert defunct_children(pool.pid) == [], "every retired child reaped"
        scaling = pool_status(pool)["pool"]["scaling"]
        assert scaling["last"]["action"] == "retired"
        assert scaling["last"]["reason"] == "idle_timeout"
        assert scaling["started"] == scaling["retired"] == 3 * (wave + 1)
        assert 0 < scaling["start_seconds"] < 10
    assert len(seen) >= 7, "the second burst started new children"
    log = pool.log()
    assert log.count("reason=idle_timeout") >= 6 and "reason=predicted_wait" in log
    assert "child_failure" not in log
    assert client.request(pool.address, "/?n=after").status == 200
