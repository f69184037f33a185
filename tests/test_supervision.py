"""Supervision with the fault-injection child: timeouts, crashes, pressure, reaping,
recycling, signals. Real processes, real signals; no fixed sleeps as synchronisation."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import fault_config, pool_status, wait_for
from fcgipool import client, protocol


def zombies_of(pid: int) -> list[int]:
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [c.pid for c in children if _status(c) == psutil.STATUS_ZOMBIE]


def _status(process: psutil.Process) -> str:
    try:
        return process.status()
    except psutil.NoSuchProcess:
        return ""


def test_hung_request_gets_504_and_the_child_is_replaced(pool_factory, workdir):
    pool = pool_factory(fault_config(workdir))
    before = set(pool.children())
    started = time.monotonic()
    response = client.request(pool.address, "/?hang=1")
    elapsed = time.monotonic() - started
    assert response.status == 504
    assert elapsed < 2.0 + 1.0
    # The hung child cannot answer the probe: SIGTERM after the cancel timeout, a new one.
    wait_for(lambda: len(set(pool.children()) - before) >= 1, 20, "a replacement child")
    wait_for(lambda: "child_cancel_failed" in pool.log(), 10, "the cancel to fail")
    for i in range(6):
        assert client.request(pool.address, f"/?n={i}").status == 200
    assert "child_failure" in pool.log()


def test_slow_request_that_ends_during_the_cancel_window_keeps_its_child(pool_factory, workdir):
    config = fault_config(workdir, pool={"workers": 1},
                          timeouts={"request": 0.5, "cancel": 5.0})
    pool = pool_factory(config)
    (pid,) = pool.children()
    assert client.request(pool.address, "/?sleep=1500").status == 504
    wait_for(lambda: "child_recovered" in pool.log(), 15, "the child to prove it is free")
    response = client.request(pool.address, "/?n=after")
    assert response.status == 200 and response.headers["X-Pid"] == str(pid)


def test_hang_ignoring_sigterm_is_killed_and_reaped(pool_factory, workdir):
    pool = pool_factory(fault_config(workdir, pool={"workers": 1}))
    (victim,) = pool.children()
    assert client.request(pool.address, "/?hang=ignore_term").status == 504
    wait_for(lambda: not psutil.pid_exists(victim) or _status(psutil.Process(victim)) == "",
             20, "the SIGTERM-proof child to be killed and reaped")
    assert "child_kill" in pool.log()
    assert zombies_of(pool.pid) == []
    wait_for(lambda: pool.log().count("child_ready") >= 2, 20, "a replacement")
    assert client.request(pool.address, "/").status == 200


def test_client_gone_cancels_the_request(pool_factory, workdir):
    pool = pool_factory(fault_config(workdir, pool={"workers": 1},
                                     timeouts={"request": 60.0, "cancel": 1.0}))
    marker = workdir / "started"
    sock = client.connect(pool.address)
    sock.sendall(protocol.encode_request(1, client.cgi_params(f"/?hang=1&touch={marker}")))
    wait_for(marker.exists, 20, "the child to take the request")
    sock.close()
    wait_for(lambda: "child_cancel_failed" in pool.log(), 15,
             "the abandoned child to be cancelled well before the request timeout")
    wait_for(lambda: pool.log().count("child_ready") >= 2, 20, "a replacement")
    assert client.request(pool.address, "/").status == 200


def test_crash_before_answering_a_post_gets_502_and_a_respawn(pool_factory, workdir):
    pool = pool_factory(fault_config(workdir, pool={"workers": 1}))
    (victim,) = pool.children()
    response = client.request(pool.address, "/?crash=before", "POST", b"data")
    assert response.status == 502
    wait_for(lambda: pool.children() and victim not in pool.children(), 20, "a respawn")
    assert client.request(pool.address, "/").status == 200
    assert "killed by SIGSEGV" in pool.log()


def test_get_is_retried_on_another_child_after_a_crash_before_headers(pool_factory, workdir):
    pool = pool_factory(fault_config(workdir))
    once = workdir / "crashed-once"
    response = client.request(pool.address, f"/?crash=before&once={once}")
    assert response.status == 200
    assert once.exists()
    assert "request_retried" in pool.log()


def test_crash_after_headers_closes_the_response(pool_factory, workdir):
    pool = pool_factory(fault_config(workdir, pool={"workers": 1}))
    with pytest.raises(ConnectionError):
        client.request(pool.address, "/?crash=after&size=100000")
    wait_for(lambda: pool.log().count("child_ready") >= 2, 20, "a respawn")
    assert client.request(pool.address, "/").status == 200


def test_garbage_from_a_child_is_a_502_and_the_child_is_replaced(pool_factory, workdir):
    pool = pool_factory(fault_config(workdir, pool={"workers": 1}))
    (victim,) = pool.children()
    assert client.request(pool.address, "/?garbage=1", "POST").status == 502
    wait_for(lambda: pool.children() and victim not in pool.children(), 20, "a new child")
    assert "child_protocol_error" in pool.log()


def test_crash_storm_exits_with_code_3(pool_factory, workdir):
    config = fault_config(workdir, ("--fail-start",), pool={"max_failure_pressure": 2.0})
    pool = pool_factory(config, ready=False)
    assert pool.process.wait(60) == 3
    assert "failure_pressure_exceeded" in pool.log()


def test_failed_warmup_is_a_failed_start(pool_factory, workdir):
    config = fault_config(workdir, child={"warmup": ["/?status=500"]},
                          pool={"max_failure_pressure": 1.0})
    pool = pool_factory(config, ready=False)
    assert pool.process.wait(60) == 3
    assert "child_start_failed" in pool.log()


def test_warmup_runs_before_a_child_takes_traffic(pool_factory, workdir):
    marker = workdir / "warmed"
    pool = pool_factory(fault_config(workdir, child={"warmup": [f"/?touch={marker}&n=1"]}))
    assert marker.exists()
    response = client.request(pool.address, "/")
    assert int(response.headers["X-Served"]) >= 3  # probe, warm-up, this request


def test_slow_start_within_start_timeout(pool_factory, workdir):
    config = fault_config(workdir, ("--start-delay", "1.5"), child={"start_timeout": 10})
    pool = pool_factory(config)
    assert client.request(pool.address, "/").status == 200


def test_start_timeout_counts_as_a_failure(pool_factory, workdir):
    config = fault_config(workdir, ("--start-delay", "30"),
                          child={"start_timeout": 0.5}, pool={"max_failure_pressure": 1.0})
    pool = pool_factory(config, ready=False)
    assert pool.process.wait(60) == 3


def test_memory_growth_recycles_between_requests(pool_factory, workdir):
    config = fault_config(workdir, pool={"workers": 1},
                          child={"max_rss": "80MiB", "rss_interval": 0.2})
    pool = pool_factory(config)
    (first,) = pool.children()
    pids = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = client.request(pool.address, "/?grow=10")
        assert response.status == 200  # no request is lost
        pids.append(response.headers["X-Pid"])
        if pids[-1] != str(first):
            break
    assert pids[-1] != str(first), "the growing child was never recycled"
    assert "reason=max_rss" in pool.log()


def test_max_requests_recycles_with_the_replacement_ready_first(pool_factory, workdir):
    config = fault_config(workdir, pool={"workers": 1}, child={"max_requests": 5})
    pool = pool_factory(config)
    (first,) = pool.children()
    pids = [client.request(pool.address, f"/?n={i}").headers["X-Pid"] for i in range(5)]
    assert set(pids) == {str(first)}
    # The old child keeps serving until its replacement is ready, then retires.
    wait_for(lambda: "child_retired" in pool.log(), 20, "the replacement to take over")
    log = pool.log()
    assert "reason=max_requests" in log
    assert log.index("child_recycling") < log.rindex("child_ready") < log.index("child_retired")
    response = client.request(pool.address, "/?n=after")
    assert response.status == 200 and response.headers["X-Pid"] != str(first)
    wait_for(lambda: first not in pool.children(), 20, "the old child to exit")


def test_reaping_leaves_no_zombie_and_adopts_orphans(pool_factory, workdir):
    pool = pool_factory(fault_config(workdir))
    body = client.request(pool.address, "/?orphans=2&orphan_sleep=0.3").body
    orphans = [int(line) for line in body.split()]
    assert len(orphans) == 2
    wait_for(lambda: pool.log().count("orphan_reaped") >= 2, 20, "the orphans to be reaped")
    assert all(not psutil.pid_exists(pid) for pid in orphans)
    assert zombies_of(pool.pid) == []


def test_sigkill_of_the_supervisor_leaves_no_child(pool_factory, workdir):
    pool = pool_factory(fault_config(workdir))
    children = pool.children()
    assert len(children) == 2
    os.kill(pool.pid, signal.SIGKILL)
    wait_for(lambda: not any(psutil.pid_exists(pid) and _status(psutil.Process(pid)) not in
                             ("", psutil.STATUS_ZOMBIE) for pid in children),
             20, "the children to die with their parent")


def test_pool_as_pid_1_reaps_orphans_and_stops_on_term(workdir):
    config_path = workdir / "pool.toml"
    from conftest import to_toml
    config_path.write_text(to_toml(fault_config(workdir)))
    log_path = workdir / "pool.log"
    with open(log_path, "wb") as log:
        unshare = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "fcgipool",
             "serve", "-c", str(config_path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "pool_ready" in log_path.read_text(), 60, "the pool in its namespace")
        (pid1,) = psutil.Process(unshare.pid).children()
        assert f"NSpid:\t{pid1.pid}\t1" in Path(f"/proc/{pid1.pid}/status").read_text()
        body = client.request(f"unix:{workdir}/pool.sock", "/?orphans=3&orphan_sleep=0.3").body
        assert len(body.split()) == 3
        wait_for(lambda: log_path.read_text().count("orphan_reaped") >= 3, 20, "reaped orphans")
        assert zombies_of(pid1.pid) == []
        pid1.send_signal(signal.SIGTERM)
        assert unshare.wait(30) == 0
        assert "pool_stopped" in log_path.read_text()
    finally:
        if unshare.poll() is None:
            unshare.kill()


def test_ttin_and_ttou_add_and_remove_a_child(pool_factory, workdir):
    pool = pool_factory(fault_config(workdir))
    os.kill(pool.pid, signal.SIGTTIN)
    wait_for(lambda: len(pool.children()) == 3 and pool.log().count("child_ready") >= 3, 20,
             "a third child")
    # Signals of one kind do not queue: send the next only once the first took effect.
    os.kill(pool.pid, signal.SIGTTOU)
    wait_for(lambda: len(pool.children()) == 2, 20, "two children left")
    os.kill(pool.pid, signal.SIGTTOU)
    wait_for(lambda: len(pool.children()) == 1, 20, "one child left")
    assert client.request(pool.address, "/").status == 200


def test_usr1_reopens_the_log_file(pool_factory, workdir):
    log_file = workdir / "fcgipool.log"
    pool = pool_factory(fault_config(workdir, log={"file": str(log_file)}), ready=False)
    wait_for(lambda: log_file.exists() and "pool_ready" in log_file.read_text(), 30, "ready")
    rotated = workdir / "fcgipool.log.1"
    log_file.rename(rotated)
    os.kill(pool.pid, signal.SIGUSR1)
    wait_for(lambda: log_file.exists() and "logs_reopened" in log_file.read_text(), 10,
             "a new log file")
    assert "logs_reopened" not in rotated.read_text()


def test_hup_reload_applies_the_new_config_to_new_children(pool_factory, workdir):
    pool = pool_factory(fault_config(workdir, child={"env": {"GENERATION": "1"}}))
    old = set(pool.children())
    text = pool.config_path.read_text().replace('"GENERATION" = "1"', '"GENERATION" = "2"')
    assert '"GENERATION" = "2"' in text
    pool.config_path.write_text(text)
    os.kill(pool.pid, signal.SIGHUP)
    wait_for(lambda: not (set(pool.children()) & old) and len(pool.children()) == 2, 30,
             "every child replaced")
    for pid in pool.children():
        assert psutil.Process(pid).environ().get("GENERATION") == "2", pool.log()


def test_bad_config_on_hup_keeps_the_pool_running(pool_factory, workdir):
    pool = pool_factory(fault_config(workdir))
    old = set(pool.children())
    pool.config_path.write_text("[pool]\nworkers = -1\n")
    os.kill(pool.pid, signal.SIGHUP)
    wait_for(lambda: "reload_failed" in pool.log(), 10, "the reload to be refused")
    assert set(pool.children()) == old
    assert client.request(pool.address, "/").status == 200


def test_children_run_as_the_configured_user(pool_factory, workdir):
    config = fault_config(workdir)
    config["child"].pop("allow_root")
    config["child"]["user"] = "nobody"
    pool = pool_factory(config)
    for pid in pool.children():
        assert psutil.Process(pid).username() == "nobody"
    assert client.request(pool.address, "/").status == 200


def test_root_pool_refuses_root_children_unless_allowed(workdir):
    from conftest import to_toml
    config = fault_config(workdir)
    config["child"].pop("allow_root")
    path = workdir / "pool.toml"
    path.write_text(to_toml(config))
    result = subprocess.run([sys.executable, "-m", "fcgipool", "serve", "-c", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "child.user: the pool runs as root" in result.stderr


def test_graceful_stop_under_load_answers_every_accepted_request(pool_factory, workdir):
    pool = pool_factory(fault_config(workdir, timeouts={"request": 30.0}))
    results: list[int | str] = []
    marker = workdir / "first"

    def one(i: int) -> None:
        try:
            results.append(client.request(pool.address, f"/?sleep=300&n={i}&touch={marker}")
                           .status)
        except (ConnectionRefusedError, FileNotFoundError):
            results.append("refused")  # arrived after the socket closed: never accepted
        except OSError as error:
            results.append(repr(error))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    wait_for(marker.exists, 20, "requests in flight")
    pool.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(60)
    accepted = [r for r in results if r != "refused"]
    assert accepted and all(r == 200 for r in accepted), results
    assert pool.process.wait(30) == 0


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_reaping_on_either_event_loop(pool_factory, workdir, event_loop):
    """asyncio lets the pool handle SIGCHLD; uvloop keeps it, so the pool watches pidfds."""
    pool = pool_factory(fault_config(workdir, pool={"event_loop": event_loop}))
    assert ("method=pidfd" in pool.log()) == (event_loop == "uvloop")
    body = client.request(pool.address, "/?orphans=2&orphan_sleep=0.2").body
    assert len(body.split()) == 2
    wait_for(lambda: pool.log().count("orphan_reaped") >= 2, 20, "orphans reaped")
    victim = pool.children()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: "killed by SIGKILL" in pool.log(), 20, "the child's death noticed")
    wait_for(lambda: pool.log().count("child_ready") >= 3, 20, "a replacement")
    assert zombies_of(pool.pid) == []
    assert client.request(pool.address, "/").status == 200
    pool.process.send_signal(signal.SIGTERM)
    assert pool.process.wait(30) == 0


def test_an_idle_child_that_stopped_answering_is_replaced_by_the_idle_probe(pool_factory,
                                                                              workdir):
    pool = pool_factory(fault_config(workdir, child={"probe_interval": 1.0},
                                     timeouts={"cancel": 2.0, "kill_grace": 1.0}))
    wedged, other = pool.children()
    os.kill(wedged, signal.SIGSTOP)  # alive, its socket accepts, it answers nothing
    try:
        wait_for(lambda: "child_probe_failed" in pool.log(), 30, "the probe to fail")
        wait_for(lambda: wedged not in pool.children() and len(pool.children()) == 2, 30,
                 "the wedged child replaced")  # fmt: skip
    finally:
        if psutil.pid_exists(wedged):
            os.kill(wedged, signal.SIGKILL)
    assert other in pool.children()
    assert f"pid={wedged}" in next(
        line for line in pool.log().splitlines() if "child_probe_failed" in line)
    for n in range(4):
        assert client.request(pool.address, f"/?n={n}").status == 200


def test_a_hanging_request_is_reported_slow_then_stuck_with_proc_and_a_bounded_command(
        pool_factory, workdir):
    command = "sh -c 'echo stack-of-{pid}; head -c 200000 /dev/zero | tr \"\\0\" x'"
    pool = pool_factory(fault_config(workdir, timeouts={
        "request": 3.0, "cancel": 1.0, "slow": 1.0, "slow_command": command}))
    started = time.monotonic()
    response = client.request(pool.address, "/?hang=1&n=slow")
    assert response.status == 504 and time.monotonic() - started >= 3.0
    wait_for(lambda: "stuck_child" in pool.log(), 20, "the report before the child is stopped")
    wait_for(lambda: pool.log().count("slow_request_command") == 2, 20, "both commands")
    lines = pool.log().splitlines()
    slow = next(line for line in lines if "slow_request " in line)
    timeout = next(i for i, line in enumerate(lines) if "request_timeout" in line)
    assert lines.index(slow) < timeout, "the slow report comes before the 504"
    pid = re.search(r"pid=(\d+)", slow).group(1)
    for field in ("request=", "uri='/?hang=1&n=slow'", "request_class=default", "wchan=",
                  "syscall=", "cpu_seconds=", "rss_mib=", "elapsed="):
        assert field in slow, (field, slow)
    stuck = next(line for line in lines if "stuck_child" in line)
    assert f"pid={pid}" in stuck and "uri='/?hang=1&n=slow'" in stuck
    outputs = [line for line in lines if "slow_request_command" in line]
    assert all(f"stack-of-{pid}" in line and "truncated=True" in line for line in outputs)
    assert all(len(line) < 70_000 for line in outputs), "the output is bounded to 64 KiB"
    assert pool_status(pool)["pool"]["slow_requests"] == 1
    assert client.request(pool.address, "/?n=after").status == 200


@pytest.mark.parametrize("user", [None, "nobody"])
def test_a_child_over_max_memory_is_killed_by_the_kernel_and_replaced(pool_factory, workdir,
                                                                     user):  # fmt: skip
    config = fault_config(workdir, pool={"workers": 2}, child={"max_memory": "100MiB"})
    if user:  # the child drops root before exec: it enters its cgroup all the same
        config["child"].pop("allow_root")
        config["child"]["user"] = user
    pool = pool_factory(config)
    cap = pool_status(pool)["pool"]["memory_cap"]
    assert cap["mechanism"] in ("cgroup2", "cgroup1"), f"not enforced by a cgroup: {cap}"
    leaves = sorted(Path(cap["cgroup"]).glob("child-*"))
    assert len(leaves) == 2
    before = set(pool.children())
    assert client.request(pool.address, "/?grow=10").status == 200, "under the cap: served"
    response = client.request(pool.address, "/?grow=300", "POST", b"x")
    assert response.status == 502, "not repeatable: a clean 502"
    wait_for(lambda: len(set(pool.children()) - before) == 1 and len(pool.children()) == 2,
             20, "the killed child replaced")  # fmt: skip
    log = pool.log()
    assert re.search(r"child_exited .*reason=max_memory.*status='?killed by SIGKILL", log) or (
        re.search(r"child_exited .*status='?killed by SIGKILL.*reason=max_memory", log)
    ), log[-2000:]
    assert "uri='/?grow=300'" in log or "uri=/?grow=300" in log
    status = pool_status(pool)
    assert status["pool"]["restarts"] == {"max_memory": 1}
    assert client.request(pool.address, "/").status == 200, "the next request is served"
    wait_for(lambda: len(sorted(Path(cap["cgroup"]).glob("child-*"))) == 2, 10,
             "the dead child's leaf removed")  # fmt: skip
    assert pool.process.poll() is None, "the pool stays up"
    assert pool.stop() == 0
    assert not list(Path(cap["cgroup"]).glob("child-*")), "every leaf removed at stop"
    if cap["mechanism"] == "cgroup1":
        assert not Path(cap["cgroup"]).exists(), "and the pool's own v1 group"
