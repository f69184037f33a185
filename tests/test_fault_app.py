"""tests/apps/fault_app.py on its own (no pool): every fault it can inject really happens."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conftest import APPS, wait_for
from fcgipool import client, protocol
from fcgipool.protocol import EndRequest, RecordType, Stdout

FAULT_APP = APPS / "fault_app.py"


class FaultApp:
    """One fault_app process serving on its own listening socket."""

    def __init__(self, directory: Path, args: list[str], env: dict[str, str]):
        self.dir = directory
        self.path = str(directory / "app.sock")
        self.address = f"unix:{self.path}"
        self.stderr_path = directory / "stderr.log"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(16)
        self.started = time.monotonic()
        with listener, open(self.stderr_path, "wb") as stderr:
            # The child keeps the only copy of the listening socket: once it is dead, a
            # connect is refused instead of waiting in a backlog nobody reads.
            self.process = subprocess.Popen(
                [sys.executable, str(FAULT_APP), *args],
                stdin=listener.fileno(),
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**os.environ, **env},
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def request(self, query: str = "", timeout: float = 15.0, **kwargs) -> client.Response:
        return client.request(self.address, f"/fault?{query}", timeout=timeout, **kwargs)

    def connect(self, timeout: float = 15.0) -> socket.socket:
        return client.connect(self.address, timeout)

    def wait(self, timeout: float = 15.0) -> int:
        return self.process.wait(timeout)

    def sig_mask(self, field: str) -> int:
        """SigIgn / SigCgt of the process, as a bit mask."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1], 16)
        raise AssertionError(f"{field} not in /proc/{self.pid}/status")

    def ignores_term(self) -> bool:
        return bool(self.sig_mask("SigIgn") & 1 << (signal.SIGTERM - 1))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(15)


@pytest.fixture
def fault_app() -> Iterator:
    directory = Path(tempfile.mkdtemp(prefix="fault-"))  # short: unix socket paths are limited
    started: list[FaultApp] = []

    def start(*args: str, **env: str) -> FaultApp:
        subdir = directory / str(len(started))
        subdir.mkdir()
        app = FaultApp(subdir, list(args), env)
        started.append(app)
        return app

    yield start
    for app in started:
        app.stop()
    shutil.rmtree(directory, ignore_errors=True)


def params(query: str, **extra: str) -> dict[bytes, bytes]:
    return client.cgi_params(f"/fault?{query}", extra=extra)


def read_response(sock: socket.socket, request_id: int = 1) -> tuple[client.Response, bytes]:
    """The parsed answer to one request, and its raw STDOUT."""
    stdout = bytearray()
    end = None
    for event in client.iter_response(sock, request_id):
        if isinstance(event, Stdout):
            stdout += event.data
        elif isinstance(event, EndRequest):
            end = event
    assert end is not None
    parts = client.split_head(bytes(stdout))
    assert parts is not None, stdout[:200]
    status, headers = client.parse_head(parts[0])
    return client.Response(status, headers, parts[1], b"", end.app_status), bytes(stdout)


def read_until_eof(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def records(raw: bytes) -> list[tuple[int, int, bytes]]:
    """(type, request id, content) of the whole records in ``raw``; a torn tail is left out."""
    found, i = [], 0
    while i + 8 <= len(raw):
        version, rtype, request_id, length, padding = protocol.HEADER.unpack_from(raw, i)
        assert version == protocol.VERSION
        assert (length + padding) % 8 == 0
        if i + 8 + length + padding > len(raw):
            break
        found.append((rtype, request_id, raw[i + 8 : i + 8 + length]))
        i += 8 + length + padding
    return found


def stdout_of(raw: bytes) -> tuple[bytes, list[int]]:
    """The STDOUT bytes and the record types in ``raw``."""
    found = records(raw)
    out = b"".join(content for rtype, _, content in found if rtype == RecordType.STDOUT)
    return out, [rtype for rtype, _, _ in found]


def body_pattern(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


# ----------------------------------------------------------------- answers


def test_plain_answer_and_served_count(fault_app):
    app = fault_app()
    first = app.request("a=1")
    assert first.status == 200
    assert first.body == f"ok {app.pid} /fault?a=1\n".encode()
    assert first.headers["Content-Type"] == "text/plain"
    assert first.headers["X-Pid"] == str(app.pid)
    assert first.headers["X-Served"] == "1"
    assert first.headers["Content-Length"] == str(len(first.body))
    assert first.app_status == 0
    assert app.request().headers["X-Served"] == "2"


def test_keep_conn_serves_many_requests_on_one_connection(fault_app):
    app = fault_app()
    with app.connect() as sock:
        sock.sendall(protocol.encode_request(1, params("n=1"), keep_conn=True))
        one, _ = read_response(sock)
        sock.sendall(protocol.encode_request(7, params("n=2"), keep_conn=True))
        two, _ = read_response(sock, 7)
        sock.sendall(protocol.encode_request(3, params("n=3")))  # no keep-conn: closed after
        three, _ = read_response(sock, 3)
        assert sock.recv(100) == b""
    assert [r.headers["X-Served"] for r in (one, two, three)] == ["1", "2", "3"]
    assert two.headers["X-Request-Id"] == "7"
    assert {r.headers["X-Pid"] for r in (one, two, three)} == {str(app.pid)}


def test_without_keep_conn_the_connection_is_closed(fault_app):
    app = fault_app()
    with app.connect() as sock:
        sock.sendall(protocol.encode_request(1, params("")))
        read_response(sock)
        assert sock.recv(100) == b""


def test_size_status_and_echo(fault_app):
    app = fault_app()
    big = app.request("size=200000&status=404")
    assert big.status == 404
    assert big.body == body_pattern(200000)
    assert big.headers["Content-Length"] == "200000"
    assert app.request("size=0").body == b""
    echoed = app.request("echo=1", method="POST", body=b"x" * 70000)
    assert echoed.body == b"x" * 70000
    assert echoed.headers["X-Stdin-Bytes"] == "70000"


def test_records_are_at_most_65535_bytes_and_padded(fault_app):
    app = fault_app()
    with app.connect() as sock:
        sock.sendall(protocol.encode_request(1, params("size=150000")))
        raw = read_until_eof(sock)
    lengths = [(rtype, len(content)) for rtype, _, content in records(raw)]
    assert sum(8 + length + (-length % 8) for _, length in lengths) == len(raw)
    assert max(length for _, length in lengths) == 65535
    assert lengths[-2:] == [(RecordType.STDOUT, 0), (RecordType.END_REQUEST, 8)]


def test_bad_parameter_is_a_400(fault_app):
    app = fault_app()
    answer = app.request("sleep=abc")
    assert answer.status == 400
    assert b"bad parameter" in answer.body


def test_unknown_role_gets_unknown_role(fault_app):
    app = fault_app()
    with app.connect() as sock:
        sock.sendall(
            protocol.encode_begin_request(1, protocol.Role.AUTHORIZER)
            + protocol.encode_params(1, params(""))
            + protocol.encode_record(RecordType.STDIN, 1)
        )
        events = list(client.iter_response(sock))
    assert events == [EndRequest(1, 0, protocol.ProtocolStatus.UNKNOWN_ROLE)]


def test_log_every_request(fault_app):
    app = fault_app(FAULT_LOG_EVERY_REQUEST="1")
    app.request("x=1")
    wait_for(lambda: f"fault_app pid={app.pid} uri=/fault?x=1" in app.stderr(), 10, "log line")


# ----------------------------------------------------------------- libfcgi manners


def test_get_values_and_abort_are_ignored(fault_app):
    app = fault_app()
    get_values = protocol.encode_record(
        RecordType.GET_VALUES, 0, protocol.encode_pairs([(b"FCGI_MAX_CONNS", b"")])
    )
    with app.connect() as sock:
        sock.sendall(get_values + protocol.encode_request(1, params("sleep=200&size=10")))
        sock.sendall(protocol.encode_record(RecordType.ABORT_REQUEST, 1))
        raw = read_until_eof(sock)
    stdout, types = stdout_of(raw)
    assert RecordType.GET_VALUES_RESULT not in types
    assert types[0] == RecordType.STDOUT
    assert types[-1] == RecordType.END_REQUEST
    assert stdout.endswith(b"\r\n\r\n" + body_pattern(10))


def test_another_request_id_is_dropped(fault_app):
    app = fault_app()
    second = protocol.encode_request(2, params("n=2"))
    first = protocol.encode_request(1, params("n=1"))
    end_of_params = protocol.encode_record(RecordType.PARAMS, 1)
    cut = first.rindex(end_of_params)  # request 2 comes before request 1's PARAMS end
    with app.connect() as sock:
        sock.sendall(first[:cut] + second + first[cut:])
        raw = read_until_eof(sock)
    stdout, types = stdout_of(raw)
    assert {request_id for _, request_id, _ in records(raw)} == {1}
    assert types.count(RecordType.END_REQUEST) == 1
    assert b"/fault?n=1" in stdout


def test_survives_clients_that_go_away(fault_app):
    app = fault_app()
    with app.connect() as sock:  # half a record header, then EOF
        sock.sendall(b"\x01\x01")
    with app.connect() as sock:  # not FastCGI at all
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_until_eof(sock) == b""
    sock = app.connect()  # gone before the big answer is written: EPIPE / ECONNRESET
    sock.sendall(protocol.encode_request(1, params("size=5000000&sleep=100")))
    sock.close()
    assert app.request("after=1").status == 200
    assert app.process.poll() is None


# ----------------------------------------------------------------- delays and hangs


def test_sleep(fault_app):
    app = fault_app()
    app.request()  # started
    start = time.monotonic()
    assert app.request("sleep=300").status == 200
    assert time.monotonic() - start >= 0.3


def test_hang_times_out_and_sigterm_kills_it(fault_app, tmp_path):
    app = fault_app()
    marker = tmp_path / "hang"
    with pytest.raises(TimeoutError):
        app.request(f"hang=1&touch={marker}", timeout=0.5)
    assert marker.read_text() == str(app.pid)
    assert app.process.poll() is None
    app.process.send_signal(signal.SIGTERM)
    assert app.wait() == -signal.SIGTERM


def test_hang_ignore_term_needs_sigkill(fault_app):
    app = fault_app()
    with app.connect() as sock:
        sock.sendall(protocol.encode_request(1, params("hang=ignore_term")))
        wait_for(app.ignores_term, 10, "SIGTERM ignored")
        app.process.send_signal(signal.SIGTERM)  # discarded: ignored when sent
        assert app.process.poll() is None
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(100)
    assert app.process.poll() is None
    app.process.kill()
    assert app.wait() == -signal.SIGKILL


def test_start_delay(fault_app):
    app = fault_app("--start-delay", "1")
    answer = app.request(timeout=20)
    assert answer.status == 200
    assert time.monotonic() - app.started >= 1.0


def test_fail_start(fault_app):
    app = fault_app("--fail-start")
    assert app.wait() == 1
    assert "fail" in app.stderr()
    with pytest.raises(OSError):
        app.request()


# ----------------------------------------------------------------- crashes and junk


def test_crash_before_dies_by_sigsegv(fault_app):
    app = fault_app()
    with app.connect() as sock:
        sock.sendall(protocol.encode_request(1, params("crash=before")))
        assert read_until_eof(sock) == b""
    assert app.wait() == -signal.SIGSEGV


def test_crash_every_n_requests(fault_app):
    app = fault_app("--crash-every", "3")
    assert [app.request().headers["X-Served"] for _ in range(2)] == ["1", "2"]
    with app.connect() as sock:  # the 3rd request: dead before a byte of the answer
        sock.sendall(protocol.encode_request(1, params("")))
        assert read_until_eof(sock) == b""
    assert app.wait() == -signal.SIGSEGV


def test_crash_exit(fault_app):
    app = fault_app()
    with pytest.raises(ConnectionError):
        app.request("crash=exit")
    assert app.wait() == 3


def test_crash_after_writes_half_then_dies(fault_app):
    app = fault_app()
    with app.connect() as sock:
        sock.sendall(protocol.encode_request(1, params("crash=after&size=1000")))
        raw = read_until_eof(sock)
    stdout, types = stdout_of(raw)
    assert RecordType.END_REQUEST not in types
    head, body = client.split_head(stdout)
    assert b"Content-Length: 1000" in head
    assert body == body_pattern(500)
    assert app.wait() == -signal.SIGSEGV


def test_garbage_then_keeps_serving(fault_app):
    app = fault_app()
    with app.connect() as sock:
        sock.sendall(protocol.encode_request(1, params("garbage=1")))
        junk = read_until_eof(sock)
    assert len(junk) == 64
    assert junk[0] != protocol.VERSION
    with pytest.raises(protocol.ProtocolError):
        protocol.ClientConnection().feed(junk)
    assert app.request().headers["X-Served"] == "2"


# ----------------------------------------------------------------- resources


def test_grow_keeps_memory(fault_app):
    app = fault_app()
    app.request()
    process = psutil.Process(app.pid)
    before = process.memory_info().rss
    app.request("grow=40")
    app.request("grow=40")
    assert process.memory_info().rss - before >= 75 * 1024 * 1024


def test_work_ms_burns_cpu(fault_app):
    app = fault_app()
    app.request()
    process = psutil.Process(app.pid)
    before = sum(process.cpu_times()[:2])
    app.request("work_ms=300")
    assert sum(process.cpu_times()[:2]) - before >= 0.28


def test_touch(fault_app, tmp_path):
    app = fault_app()
    marker = tmp_path / "touched"
    app.request(f"touch={marker}")
    assert marker.read_text() == str(app.pid)


def test_orphans_are_reparented(fault_app):
    app = fault_app()
    answer = app.request("orphans=2&orphan_sleep=60")
    pids = [int(line) for line in answer.body.split()]
    try:
        assert len(pids) == 2
        assert app.pid not in pids
        for pid in pids:
            orphan = psutil.Process(pid)
            assert orphan.ppid() != app.pid
            assert orphan.status() != psutil.STATUS_ZOMBIE
            assert os.getsid(pid) == pid  # detached in its own session
        assert psutil.Process(app.pid).children() == []  # the middle children were reaped
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_project_cache_hits_misses_and_eviction(fault_app):
    app = fault_app("--cache-size", "2")

    def cache(project: str) -> str:
        return app.request(f"project={project}&load_ms=200").headers["X-Cache"]

    start = time.monotonic()
    assert cache("a") == "miss"
    assert time.monotonic() - start >= 0.2
    assert cache("a") == "hit"
    assert cache("b") == "miss"  # [a, b]
    assert cache("a") == "hit"  # [b, a]
    assert cache("c") == "miss"  # b evicted: [a, c]
    assert cache("a") == "hit"
    assert cache("b") == "miss"  # c evicted: [a, b]
    assert cache("c") == "miss"
    assert "X-Cache" not in app.request().headers


# ----------------------------------------------------------------- signals


def test_sigterm_when_idle_exits_0(fault_app):
    app = fault_app()
    app.request()  # answered: the handler is installed, the process is back in accept()
    assert app.sig_mask("SigCgt") & 1 << (signal.SIGTERM - 1)
    app.process.send_signal(signal.SIGTERM)
    assert app.wait() == 0


def test_sigterm_idle_on_kept_connection_exits_0(fault_app):
    app = fault_app()
    with app.connect() as sock:
        sock.sendall(protocol.encode_request(1, params(""), keep_conn=True))
        read_response(sock)
        app.process.send_signal(signal.SIGTERM)
        assert app.wait() == 0
        assert sock.recv(100) == b""


def test_sigterm_while_busy_finishes_the_request(fault_app, tmp_path):
    app = fault_app()
    marker = tmp_path / "busy"
    with app.connect() as sock:
        sock.sendall(
            protocol.encode_request(1, params(f"touch={marker}&sleep=700"), keep_conn=True)
        )
        wait_for(marker.exists, 10, "the request to start")
        app.process.send_signal(signal.SIGTERM)
        answer, _ = read_response(sock)
        assert answer.status == 200
        assert answer.body == f"ok {app.pid} /fault?touch={marker}&sleep=700\n".encode()
        assert sock.recv(100) == b""  # closed despite keep-conn
    assert app.wait() == 0


def test_ignore_term(fault_app):
    app = fault_app("--ignore-term")
    wait_for(app.ignores_term, 10, "SIGTERM ignored")
    app.process.send_signal(signal.SIGTERM)
    assert app.request().status == 200
    assert app.process.poll() is None
    app.process.kill()
    assert app.wait() == -signal.SIGKILL
