"""FCGI_ABORT_REQUEST against the real pool with real flup children: before a child has
the request, while a child runs it, after the answer. In each case exactly one END_REQUEST
comes back and the kept connection serves the next request with the same id."""

from __future__ import annotations

import time

import psutil

from conftest import wait_for, wsgi_config
from fcgipool import client, protocol
from fcgipool.protocol import RecordType, encode_begin_request, encode_params, encode_record


class Conversation:
    """One kept connection to the pool, read record by record."""

    def __init__(self, address: str) -> None:
        self.sock = client.connect(address, timeout=30)
        self.reader = protocol.RecordReader()
        self.records: list[tuple[int, int, bytes]] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, uri: str, request_id: int = 1) -> None:
        self.send(protocol.encode_request(request_id, client.cgi_params(uri), keep_conn=True))

    def abort(self, request_id: int = 1) -> None:
        self.send(encode_record(RecordType.ABORT_REQUEST, request_id))

    def until_end(self, request_id: int = 1) -> list[tuple[int, int, bytes]]:
        """Records up to this request's END_REQUEST."""
        while not any(t == RecordType.END_REQUEST and i == request_id for t, i, _ in self.records):
            data = self.sock.recv(65536)
            assert data, f"connection closed; records so far: {self.records}"
            self.records += self.reader.feed(data)
        mine, self.records = self.records, []
        return mine

    def quiet_for(self, seconds: float) -> bytes:
        """What arrives within ``seconds`` (nothing is expected)."""
        self.sock.settimeout(seconds)
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            return b""
        finally:
            self.sock.settimeout(30)

    def answer_of_next(self, uri: str, request_id: int = 1) -> bytes:
        self.request(uri, request_id)
        return b"".join(c for t, i, c in self.until_end(request_id) if t == RecordType.STDOUT)


def ends(records: list[tuple[int, int, bytes]]) -> int:
    return sum(1 for rtype, _, _ in records if rtype == RecordType.END_REQUEST)


def test_abort_before_a_child_frees_the_id(pool_factory, workdir):
    pool = pool_factory(wsgi_config(workdir))
    talk = Conversation(pool.address)
    params = client.cgi_params("/upload", "POST", b"x" * 100)
    talk.send(encode_begin_request(1, keep_conn=True) + encode_params(1, params)
              + encode_record(RecordType.STDIN, 1, b"x" * 10))  # the rest never comes
    talk.abort()
    records = talk.until_end()
    assert ends(records) == 1 and not any(t == RecordType.STDOUT for t, _, _ in records)
    assert b"hello from" in talk.answer_of_next("/next")
    assert talk.quiet_for(0.3) == b""


def test_abort_while_a_child_runs_cancels_it(pool_factory, workdir):
    pool = pool_factory(wsgi_config(workdir))
    marker = workdir / "started"
    talk = Conversation(pool.address)
    talk.request(f"/?sleep=3&touch={marker}")
    wait_for(marker.exists, 10, "the child started the request")
    talk.abort()
    records = talk.until_end()
    assert ends(records) == 1
    started = time.monotonic()
    assert b"hello from" in talk.answer_of_next("/next")
    assert time.monotonic() - started < 2, "the other child took it"
    wait_for(lambda: "child_cancelling" in pool.log(), 10, "the child was cancelled")
    assert talk.quiet_for(0.3) == b""


def test_abort_after_the_answer_gets_no_second_end_request(pool_factory, workdir):
    pool = pool_factory(wsgi_config(workdir))
    talk = Conversation(pool.address)
    assert b"hello from" in talk.answer_of_next("/first")
    talk.abort()
    assert talk.quiet_for(0.5) == b"", "an ABORT for an answered request gets nothing back"
    answer = talk.answer_of_next("/second")
    assert b"hello from" in answer
    assert talk.quiet_for(0.3) == b""
    assert len(psutil.Process(pool.pid).children()) == 2, "no child was stopped for it"
