"""The pool core with real flup children: relay, limits, queue, flow control."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
import struct
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import fault_config, pool_status, wait_for, wsgi_config
from fcgipool import client, config, protocol
from fcgipool.processes import SAFE_PATH


def send_request(address: str, uri: str, method: str = "GET", body: bytes = b"",
                 keep_conn: bool = False, request_id: int = 1, timeout: float = 30):
    sock = client.connect(address, timeout)
    sock.sendall(protocol.encode_request(request_id, client.cgi_params(uri, method, body), body,
                                         keep_conn))
    return sock


def read_response(sock: socket.socket, request_id: int = 1) -> tuple[int, dict, bytes]:
    stdout = bytearray()
    for event in client.iter_response(sock, request_id):
        if isinstance(event, protocol.Stdout):
            stdout += event.data
    head, body = client.split_head(bytes(stdout))
    status, headers = client.parse_head(head)
    return status, headers, body


def closed_by_peer(sock: socket.socket, timeout: float = 10) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_get_and_post_are_relayed(pool_factory, workdir):
    pool = pool_factory(wsgi_config(workdir))
    response = client.request(pool.address, "/hello?name=x")
    assert response.status == 200
    assert response.body.startswith(b"hello from ")
    assert b"/hello?name=x" in response.body
    body = os.urandom(300_000)
    echoed = client.request(pool.address, "/echo?echo=1", "POST", body)
    assert echoed.status == 200
    assert echoed.body == body


def test_children_get_only_the_configured_environment(pool_factory, workdir):
    config = wsgi_config(workdir, child={"env": {"MARK": "yes"}, "pass_env": ["PASSED"]})
    pool = pool_factory(config, env={"PASSED": "1", "NOT_PASSED": "1"})
    environ = json.loads(client.request(pool.address, "/?env=1").body)
    assert environ["MARK"] == "yes"
    assert environ["PASSED"] == "1"
    assert "NOT_PASSED" not in environ
    assert environ["PATH"] == SAFE_PATH


def test_child_socket_is_a_private_listening_socket(pool_factory, workdir):
    runtime = workdir / "run"
    runtime.mkdir()
    pool = pool_factory(wsgi_config(workdir, pool={"runtime_dir": str(runtime)}))
    (private,) = runtime.iterdir()
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    sockets = sorted(private.iterdir())
    assert len(sockets) == 2
    for pid in pool.children():
        assert os.readlink(f"/proc/{pid}/fd/0").startswith("socket:")
        # Only fds 0-2 cross exec: no pool socket, no sibling's socket. Besides fd 0 the
        # child may hold one socket: the pool's kept connection, which it accepted itself.
        links = {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert links["1"].startswith("pipe:") and links["2"].startswith("pipe:")
        other_sockets = [fd for fd, link in links.items() if link.startswith("socket:")
                         and link != links["0"]]  # flup dups fd 0
        assert len(other_sockets) <= 1, links


def test_child_output_is_logged_with_its_pid_and_the_request_it_serves(pool_factory, workdir):
    pool = pool_factory(wsgi_config(workdir))
    # The line is written, then the child works 1 s more on the request: it is read meanwhile.
    response = client.request(pool.address, "/?stderr=marker-line-42&sleep=1")
    pid = response.headers["X-Pid"]
    wait_for(lambda: "marker-line-42" in pool.log(), 10, "the child's stderr line in the log")
    line = next(line for line in pool.log().splitlines() if "marker-line-42" in line)
    assert f"pid={pid}" in line and "child_output" in line
    assert "uri='/?stderr=marker-line-42&sleep=1'" in line and "request=1 " in line


def test_queue_overflow_gets_503_at_once(pool_factory, workdir):
    pool = pool_factory(wsgi_config(workdir, pool={"workers": 1}, limits={"max_waiting": 1}))
    marker = workdir / "busy"
    busy = send_request(pool.address, f"/?sleep=20&touch={marker}")
    wait_for(marker.exists, 20, "the only child to take the slow request")
    started = time.monotonic()
    second = send_request(pool.address, "/?n=2")
    third = send_request(pool.address, "/?n=3")
    answers = {}

    def collect(name, sock):
        with contextlib.suppress(OSError):  # closed by the test once it has its answer
            answers[name] = read_response(sock)

    threads = [threading.Thread(target=collect, args=(n, s), daemon=True)
               for n, s in (("second", second), ("third", third))]
    for thread in threads:
        thread.start()
    wait_for(lambda: answers, 10, "one of the two queued requests to be refused")
    elapsed = time.monotonic() - started
    (status, headers, _body), = answers.values()
    assert status == 503
    assert headers["Retry-After"] == "5"
    assert elapsed < 5
    for sock in (busy, second, third):
        sock.close()


def test_queue_timeout_gets_503(pool_factory, workdir):
    config = wsgi_config(workdir, pool={"workers": 1}, limits={"queue_timeout": 1.0})
    pool = pool_factory(config)
    marker = workdir / "busy"
    busy = send_request(pool.address, f"/?sleep=20&touch={marker}")
    wait_for(marker.exists, 20, "the only child to take the slow request")
    started = time.monotonic()
    status, _headers, body = read_response(send_request(pool.address, "/?n=2"))
    assert status == 503
    assert b"in time" in body
    assert 0.9 < time.monotonic() - started < 10
    busy.close()


def test_large_response_to_a_slow_client_keeps_pool_memory_bounded(pool_factory, workdir):
    pool = pool_factory(wsgi_config(workdir, pool={"workers": 1}))
    process = psutil.Process(pool.pid)
    baseline = process.memory_info().rss
    size = 50 * 2**20
    sock = send_request(pool.address, f"/?size={size}")
    peak = baseline
    # Read nothing for a while: a pool that buffered would swallow the 50 MB now.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        peak = max(peak, process.memory_info().rss)
        time.sleep(0.05)
    # Then a slow reader, then a fast one.
    received = 0
    codec = protocol.ClientConnection()
    done = False
    sock.settimeout(30)
    slow_until = time.monotonic() + 2
    while not done:
        data = sock.recv(4096 if time.monotonic() < slow_until else 1 << 20)
        assert data, "connection closed early"
        for event in codec.feed(data):
            if isinstance(event, protocol.Stdout):
                received += len(event.data)
            elif isinstance(event, protocol.EndRequest):
                done = True
        if time.monotonic() < slow_until:
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.01)
    sock.close()
    assert received > size  # the body plus the CGI head
    assert peak - baseline < 16 * 2**20, f"pool RSS grew by {(peak - baseline) >> 20} MiB"


def test_malformed_bytes_close_only_that_connection(pool_factory, workdir):
    pool = pool_factory(wsgi_config(workdir))
    good = client.connect(pool.address)
    bad = client.connect(pool.address)
    bad.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert closed_by_peer(bad)
    good.sendall(protocol.encode_request(1, client.cgi_params("/after"), keep_conn=True))
    status, _, body = read_response(good)
    assert status == 200 and b"/after" in body
    wait_for(lambda: "protocol error" in pool.log(), 10, "a log line for the bad connection")


def test_too_large_params_close_the_connection(pool_factory, workdir):
    pool = pool_factory(wsgi_config(workdir, limits={"max_params_size": 2048}))
    params = client.cgi_params("/", extra={"HTTP_COOKIE": "x" * 5000})
    sock = client.connect(pool.address)
    sock.sendall(protocol.encode_request(1, params))
    assert closed_by_peer(sock)
    assert client.request(pool.address, "/ok").status == 200


def test_too_large_body_gets_413(pool_factory, workdir):
    config = wsgi_config(workdir, pool={"workers": 1}, limits={"max_body_size": "100KiB"})
    pool = pool_factory(config)
    response = client.request(pool.address, "/?echo=1", "POST", b"x" * (2 * 2**20))
    assert response.status == 413
    # A body larger than announced is cut off too, here while it waits for a child.
    marker = workdir / "busy"
    busy = send_request(pool.address, f"/?sleep=2&touch={marker}")
    wait_for(marker.exists, 20, "the only child to take the slow request")
    sock = client.connect(pool.address)
    params = client.cgi_params("/?echo=1", "POST", b"", {"CONTENT_LENGTH": "10"})
    sock.sendall(protocol.encode_begin_request(1) + protocol.encode_params(1, params)
                 + protocol.encode_stream(protocol.RecordType.STDIN, 1, b"y" * (2 * 2**20))
                 + protocol.encode_record(protocol.RecordType.STDIN, 1))
    status, _, _ = read_response(sock)
    assert status == 413
    assert read_response(busy)[0] == 200
    assert client.request(pool.address, "/ok").status == 200


def test_stalled_request_is_closed_after_read_timeout(pool_factory, workdir):
    pool = pool_factory(wsgi_config(workdir, limits={"read_timeout": 1.0}))
    sock = client.connect(pool.address)
    sock.sendall(protocol.encode_begin_request(1))  # and then nothing
    started = time.monotonic()
    assert closed_by_peer(sock, timeout=15)
    assert time.monotonic() - started >= 0.9
    assert "read timeout" in pool.log()


def test_connections_over_the_limit_are_refused(pool_factory, workdir):
    pool = pool_factory(wsgi_config(workdir, limits={"max_connections": 2}))
    first, second = client.connect(pool.address), client.connect(pool.address)
    first.sendall(protocol.encode_request(1, client.cgi_params("/1"), keep_conn=True))
    assert read_response(first)[0] == 200
    second.sendall(protocol.encode_request(1, client.cgi_params("/2"), keep_conn=True))
    assert read_response(second)[0] == 200
    third = client.connect(pool.address)
    assert closed_by_peer(third)
    first.close()
    wait_for(lambda: client.request(pool.address, "/again").status == 200, 10,
             "a connection slot to free up")


def test_get_values_answered_by_the_pool(pool_factory, workdir):
    pool = pool_factory(wsgi_config(workdir))
    sock = client.connect(pool.address)
    names = {b"FCGI_MPXS_CONNS": b"", b"FCGI_MAX_CONNS": b""}
    sock.sendall(protocol.encode_record(protocol.RecordType.GET_VALUES, 0,
                                        protocol.encode_pairs(names.items())))
    codec = protocol.ClientConnection()
    events = wait_for(lambda: codec.feed(sock.recv(4096)), 10, "GET_VALUES_RESULT")
    limit = str(config.Config().limits.max_connections).encode()  # the default's
    assert events[0].values == {b"FCGI_MPXS_CONNS": b"1", b"FCGI_MAX_CONNS": limit}
    sock.sendall(protocol.encode_record(42, 0, b"\0" * 8))
    events = wait_for(lambda: codec.feed(sock.recv(4096)), 10, "UNKNOWN_TYPE")
    assert events[0] == protocol.UnknownTypeResult(42)


def test_multiplexed_requests_on_one_connection(pool_factory, workdir):
    pool = pool_factory(wsgi_config(workdir))
    sock = client.connect(pool.address)
    first = protocol.encode_request(1, client.cgi_params("/?sleep=0.5&n=1"), keep_conn=True)
    second = protocol.encode_request(2, client.cgi_params("/?n=2"), keep_conn=True)
    sock.sendall(first + second)
    bodies: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
    ended: list[int] = []
    codec = protocol.ClientConnection()
    while len(ended) < 2:
        for event in codec.feed(sock.recv(65536)):
            if isinstance(event, protocol.Stdout):
                bodies[event.request_id] += event.data
            elif isinstance(event, protocol.EndRequest):
                ended.append(event.request_id)
    assert ended == [2, 1]  # the quick one is not held behind the slow one
    assert b"n=1" in bodies[1] and b"n=2" in bodies[2]


def test_connection_without_keep_conn_is_closed_after_the_answer(pool_factory, workdir):
    pool = pool_factory(wsgi_config(workdir))
    sock = send_request(pool.address, "/", keep_conn=False)
    assert read_response(sock)[0] == 200
    assert closed_by_peer(sock)


def test_unknown_role_is_refused(pool_factory, workdir):
    pool = pool_factory(wsgi_config(workdir))
    sock = client.connect(pool.address)
    sock.sendall(protocol.encode_begin_request(1, protocol.Role.AUTHORIZER, True))
    (event,) = list(client.iter_response(sock))
    assert event.protocol_status == protocol.ProtocolStatus.UNKNOWN_ROLE


def test_dead_child_is_replaced(pool_factory, workdir):
    pool = pool_factory(wsgi_config(workdir))
    before = set(pool.children())
    victim = next(iter(before))
    os.kill(victim, 9)
    wait_for(lambda: len(set(pool.children()) - before) == 1 and victim not in pool.children(),
             20, "a replacement child")
    wait_for(lambda: pool.log().count("child_ready") >= 3, 20, "the replacement to be ready")
    pids = {client.request(pool.address, f"/?n={i}").headers["X-Pid"] for i in range(6)}
    assert str(victim) not in pids


def test_graceful_stop_answers_requests_in_flight(pool_factory, workdir):
    pool = pool_factory(wsgi_config(workdir))
    marker = workdir / "busy"
    sock = send_request(pool.address, f"/?sleep=1&touch={marker}")
    wait_for(marker.exists, 20, "the request to reach a child")
    pool.process.send_signal(15)
    status, _, body = read_response(sock)
    assert status == 200 and b"hello" in body
    assert pool.process.wait(30) == 0
    assert not Path(pool.address.removeprefix("unix:")).exists()


def test_unix_socket_mode_and_group(pool_factory, workdir):
    import grp
    group = grp.getgrnam("www-data")
    pool = pool_factory(wsgi_config(workdir, pool={"socket_mode": "0660",
                                                   "socket_group": "www-data"}))
    info = Path(pool.address.removeprefix("unix:")).stat()
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == group.gr_gid


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 200_000])
def test_response_sizes_relay_exactly(pool_factory, workdir, size):
    pool = pool_factory(wsgi_config(workdir, pool={"workers": 1}))
    response = client.request(pool.address, f"/?size={size}")
    assert response.status == 200
    assert response.body == b"x" * size


def test_encode_record_for_struct_sanity():
    assert struct.calcsize("!BBHHBx") == 8


@pytest.mark.parametrize("size", [600_000, 1_500_000])
def test_child_is_read_again_after_an_answer_to_a_slow_reader(pool_factory, workdir, size):
    """A large answer to a slow reader pauses reading from the child; the next request on
    that child's kept connection must find it reading again (it used to hang until the
    request timeout)."""
    from conftest import fault_config
    pool = pool_factory(fault_config(workdir, pool={"workers": 1},
                                     timeouts={"request": 10.0}))
    sock = send_request(pool.address, f"/?size={size}", keep_conn=True)
    marker_deadline = time.monotonic() + 0.5
    while time.monotonic() < marker_deadline:  # the scenario: a reader that lags behind
        time.sleep(0.05)
    status, _, body = read_response(sock)
    assert status == 200 and len(body) == size
    started = time.monotonic()
    response = client.request(pool.address, "/?n=next", timeout=30)
    assert response.status == 200
    assert time.monotonic() - started < 5


def test_a_request_that_burns_200_ms_of_cpu_shows_about_200_ms(pool_factory, workdir):
    pool = pool_factory(fault_config(workdir, pool={"workers": 1}))
    assert client.request(pool.address, "/?work_ms=200").status == 200
    assert client.request(pool.address, "/?n=idle").status == 200
    wait_for(lambda: "n=idle" in pool.log(), 10, "the access lines")
    lines = [line for line in pool.log().splitlines() if "event='access'" in line]
    burnt = next(line for line in lines if "work_ms=200" in line)
    idle = next(line for line in lines if "n=idle" in line)
    cpu = int(re.search(r"cpu_ms=(\d+)", burnt).group(1))
    assert 180 <= cpu <= 300, burnt
    assert int(re.search(r"cpu_ms=(\d+)", idle).group(1)) <= 20, idle
    assert int(re.search(r"rss_mib=(\d+)", burnt).group(1)) > 1
    (row,) = pool_status(pool)["children"]
    assert row["last_request"]["cpu_ms"] <= 20
