"""A single-threaded FastCGI child for fault-injection tests, built to behave like libfcgi/QGIS.

Standalone on purpose: it has its own tiny FastCGI codec (stdlib only) and never imports
fcgipool, so that a bug in fcgipool's codec cannot hide in it.

Like ``qgis_mapserv.fcgi`` it serves on fd 0, which must be a *listening* socket
(FCGI_LISTENSOCK_FILENO). It accepts one connection at a time and serves requests on it while
the web server sets FCGI_KEEP_CONN, else closes the connection after END_REQUEST. It never
multiplexes: records for another request id than the one being read are dropped (so is a
pipelined second BEGIN_REQUEST), FCGI_ABORT_REQUEST and management records (FCGI_GET_VALUES
...) are ignored (QGIS 3.22 still sends the whole response). EOF, EPIPE, ECONNRESET or junk
from the peer close the connection and it goes back to accept().

The answer is CGI: ``Status``, ``Content-Type: text/plain``, ``Content-Length``, ``X-Pid``,
``X-Served`` (requests this process has served, this one included), ``X-Request-Id`` (the
FastCGI request id), ``X-Stdin-Bytes`` and, with ``project``, ``X-Cache: hit|miss``; then
STDOUT records (at most 65535 bytes each, padded to 8), an empty STDOUT and END_REQUEST
(app status 0). A role other than RESPONDER gets END_REQUEST with FCGI_UNKNOWN_ROLE.

QUERY_STRING parameters (several may be combined; they act in this order):

``touch=PATH``          write this pid to PATH when the request starts
``crash=before``        die by SIGSEGV before writing anything
``crash=exit``          ``os._exit(3)`` before writing anything
``once=PATH``           with crash=before/exit: crash only if PATH does not exist yet (it is
                        created first), so a retried request succeeds
``hang=1``              never answer; SIGTERM still kills it (it dies by SIGTERM)
``hang=ignore_term``    ignore SIGTERM, then never answer (only SIGKILL ends it)
``project=NAME``        an LRU cache of ``--cache-size`` project names; a miss sleeps
``load_ms=MS``          (the project load time, default 0) before the name is inserted
``sleep=MS``            sleep MS milliseconds before answering
``work_ms=MS``          burn MS milliseconds of CPU time (bounded by time.process_time)
``grow=MB``             allocate, touch and keep MB megabytes more memory
``orphans=N``           double-fork N detached grandchildren (new session, fds 0-2 on
``orphan_sleep=SEC``    /dev/null) that sleep SEC seconds (default 3600) and exit; they
                        are re-parented to the nearest subreaper; the body lists their pids
``garbage=1``           write 64 bytes of non-FastCGI junk instead of the answer, then go
                        on (close, or read the next request when FCGI_KEEP_CONN was set)
``status=N``            the status code (default 200)
``size=N``              a body of N bytes: ``bytes(range(256))`` repeated (see ``body_of``)
``echo=1``              the body is the request's STDIN
``crash=after``         write the header and half of the body, then die by SIGSEGV

Without size/echo/orphans the body is ``ok <pid> <REQUEST_URI>\\n``. A parameter that does
not parse gets a 400. With ``FAULT_LOG_EVERY_REQUEST=1`` in the environment every request
writes ``fault_app pid=PID uri=URI`` to stderr.

Command line: ``--start-delay SECONDS`` (sleep before the first accept), ``--fail-start``
(print an error to stderr and exit 1), ``--ignore-term`` (SIGTERM ignored for the whole
life), ``--cache-size K`` (default 5), ``--crash-every N`` (die by SIGSEGV at the start of the
Nth request this process serves, before writing anything: a child that crashes every N
requests, as a leaking or buggy program does; its replacement counts from 0 again).

SIGTERM, like libfcgi: idle (in accept() or waiting for the next request on a kept
connection, or in the start delay) exits 0 at once; busy finishes the current request, closes
the connection and exits 0.
"""

from __future__ import annotations

import argparse
import http
import os
import resource
import signal
import socket
import struct
import sys
import time
from collections import OrderedDict
from urllib.parse import parse_qs

# ----------------------------------------------------------------- a tiny FastCGI codec

HEADER = struct.Struct("!BBHHBx")
BEGIN_REQUEST, ABORT_REQUEST, END_REQUEST, PARAMS, STDIN, STDOUT = 1, 2, 3, 4, 5, 6
RESPONDER, KEEP_CONN, UNKNOWN_ROLE = 1, 1, 3
MAX_CONTENT = 0xFFFF
PATTERN = bytes(range(256)) * 257  # any 65535-byte slice starting below 256 fits


class BadPeer(Exception):
    """The peer closed the connection or sent bytes that are not FastCGI."""


def record(rtype: int, request_id: int, content: bytes = b"") -> bytes:
    padding = -len(content) % 8
    head = HEADER.pack(1, rtype, request_id, len(content), padding)
    return head + content + b"\0" * padding


def stdout_records(request_id: int, data: bytes) -> bytes:
    view = memoryview(data)
    return b"".join(
        record(STDOUT, request_id, bytes(view[i : i + MAX_CONTENT]))
        for i in range(0, len(data), MAX_CONTENT)
    )


def end_request(request_id: int, protocol_status: int = 0) -> bytes:
    return record(END_REQUEST, request_id, struct.pack("!IB3x", 0, protocol_status))


def decode_pairs(data: bytes) -> dict[str, str]:
    pairs, i = {}, 0

    def length() -> int:
        nonlocal i
        if data[i] & 0x80:
            (n,) = struct.unpack_from("!I", data, i)
            i += 4
            return n & 0x7FFFFFFF
        i += 1
        return data[i - 1]

    try:
        while i < len(data):
            name_len, value_len = length(), length()
            name = data[i : i + name_len]
            value = data[i + name_len : i + name_len + value_len]
            i += name_len + value_len
            if i > len(data):
                raise BadPeer("truncated name-value pair")
            pairs[name.decode("latin-1")] = value.decode("latin-1")
    except (IndexError, struct.error) as error:
        raise BadPeer(f"bad name-value pairs: {error}") from None
    return pairs


class Connection:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = bytearray()

    def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            data = self.sock.recv(65536)
            if not data:
                raise BadPeer("EOF")
            self.buffer += data
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    def read_record(self) -> tuple[int, int, bytes]:
        version, rtype, request_id, length, padding = HEADER.unpack(self.read(8))
        if version != 1:
            raise BadPeer(f"FastCGI version {version}")
        content = self.read(length + padding)[:length]
        return rtype, request_id, content

    def read_request(self) -> tuple[int, int, int, dict[str, str], bytes]:
        """The next request: (request_id, role, flags, params, stdin)."""
        global state
        while True:  # management records, aborts and strays before a BEGIN_REQUEST
            rtype, request_id, content = self.read_record()
            if rtype == BEGIN_REQUEST and request_id != 0 and len(content) == 8:
                break
        state = "busy"
        role, flags = struct.unpack("!HB5x", content)
        params, stdin = bytearray(), bytearray()
        params_done = stdin_done = False
        while not (params_done and stdin_done):
            rtype, rid, content = self.read_record()
            if rid != request_id:
                continue  # never multiplexes: another request's records are dropped
            if rtype == PARAMS and not params_done:
                params += content
                params_done = not content
            elif rtype == STDIN and not stdin_done:
                stdin += content
                stdin_done = not content
        return request_id, role, flags, decode_pairs(bytes(params)), bytes(stdin)


# ----------------------------------------------------------------- the application

state = "idle"  # idle | busy | hang: what SIGTERM does
term_pending = False
served = 0
kept_memory: list[bytearray] = []
project_cache: OrderedDict[str, None] = OrderedDict()
cache_size = 5
crash_every = 0  # --crash-every: 0 is never


def on_term(signum, frame):
    global term_pending
    term_pending = True
    if state == "idle":
        raise SystemExit(0)
    if state == "hang":
        die(signal.SIGTERM)


def die(signum: int) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core files in the tests' cwd
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    os.kill(os.getpid(), signum)
    time.sleep(10)
    os._exit(128 + signum)


def body_of(size: int) -> bytes:
    """The body ``size=N`` answers: bytes 0, 1, ..., 255, 0, 1, ... (N of them)."""
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


def spawn_orphans(count: int, sleep: float) -> list[int]:
    pids = []
    for _ in range(count):
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:  # the short-lived child: fork the grandchild, report it, exit
            try:
                os.close(read_end)
                grandchild = os.fork()
                if grandchild == 0:
                    orphan_life(sleep)
                os.write(write_end, str(grandchild).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            pids.append(int(pipe.read() or 0))
        os.waitpid(child, 0)
    return pids


def orphan_life(sleep: float) -> None:
    try:
        os.setsid()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, 65536)
        time.sleep(sleep)
    finally:
        os._exit(0)


def spin(ms: float) -> None:
    end = time.process_time() + ms / 1000
    while time.process_time() < end:
        pass


def respond(request_id: int, params: dict[str, str], stdin: bytes, conn: Connection) -> None:
    global served
    served += 1
    uri = params.get("REQUEST_URI", "")
    if os.environ.get("FAULT_LOG_EVERY_REQUEST") == "1":
        print(f"fault_app pid={os.getpid()} uri={uri}", file=sys.stderr, flush=True)
    if crash_every and served % crash_every == 0:
        die(signal.SIGSEGV)
    query = {k: v[-1] for k, v in parse_qs(params.get("QUERY_STRING", "")).items()}
    headers = {"X-Served": str(served), "X-Request-Id": str(request_id)}
    try:
        status, body = behave(query, headers, stdin, uri)
    except ValueError as error:
        status, body = 400, f"bad parameter: {error}\n".encode()
    except OSError as error:
        status, body = 500, f"{error}\n".encode()
    if query.get("garbage") == "1":
        conn.sock.sendall((b"HTTP/1.1 200 OK junk, not FastCGI! " * 2)[:64])
        return
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    head = [f"Status: {status} {reason}".rstrip(), "Content-Type: text/plain"]
    head += [f"Content-Length: {len(body)}", f"X-Pid: {os.getpid()}"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    head_bytes = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
    if query.get("crash") == "after":
        conn.sock.sendall(stdout_records(request_id, head_bytes + body[: len(body) // 2]))
        die(signal.SIGSEGV)
    conn.sock.sendall(
        stdout_records(request_id, head_bytes + body)
        + record(STDOUT, request_id)
        + end_request(request_id)
    )


def behave(query: dict[str, str], headers: dict[str, str], stdin: bytes, uri: str):
    global state
    if "touch" in query:
        with open(query["touch"], "w") as marker:
            marker.write(str(os.getpid()))
    crash = query.get("crash", "")
    if "once" in query:  # crash only the first time: the next child serves the retry
        if os.path.exists(query["once"]):
            crash = ""
        else:
            with open(query["once"], "w") as marker:
                marker.write(str(os.getpid()))
    if crash == "before":
        die(signal.SIGSEGV)
    if crash == "exit":
        os._exit(3)
    hang = query.get("hang", "")
    if hang in ("1", "ignore_term"):
        if hang == "ignore_term":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            state = "hang"
            if term_pending:
                die(signal.SIGTERM)
        while True:
            time.sleep(3600)
    project = query.get("project")
    if project is not None:
        load_ms = float(query.get("load_ms", 0))
        if project in project_cache:
            project_cache.move_to_end(project)
            headers["X-Cache"] = "hit"
        else:
            time.sleep(load_ms / 1000)
            project_cache[project] = None
            while len(project_cache) > cache_size:
                project_cache.popitem(last=False)
            headers["X-Cache"] = "miss"
    if "sleep" in query:
        time.sleep(float(query["sleep"]) / 1000)
    if "work_ms" in query:
        spin(float(query["work_ms"]))
    if "grow" in query:
        block = bytearray(int(float(query["grow"]) * 1024 * 1024))
        for i in range(0, len(block), 4096):
            block[i] = 1
        kept_memory.append(block)
    headers["X-Stdin-Bytes"] = str(len(stdin))
    body = f"ok {os.getpid()} {uri}\n".encode()
    if "orphans" in query:
        pids = spawn_orphans(int(query["orphans"]), float(query.get("orphan_sleep", 3600)))
        body = "".join(f"{pid}\n" for pid in pids).encode()
    if "size" in query:
        body = body_of(int(query["size"]))
    if query.get("echo") == "1":
        body = stdin
    return int(query.get("status", 200)), body


def serve_connection(conn: Connection) -> None:
    global state
    while True:
        request_id, role, flags, params, stdin = conn.read_request()  # idle until BEGIN
        if role != RESPONDER:
            conn.sock.sendall(end_request(request_id, UNKNOWN_ROLE))
        else:
            respond(request_id, params, stdin, conn)
        state = "idle"  # before the check: a SIGTERM from now on exits at once
        if term_pending or not flags & KEEP_CONN:
            return


def main(argv: list[str] | None = None) -> None:
    global cache_size, crash_every, state
    parser = argparse.ArgumentParser(description="FastCGI fault-injection child")
    parser.add_argument("--start-delay", type=float, default=0.0)
    parser.add_argument("--fail-start", action="store_true")
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--cache-size", type=int, default=5)
    parser.add_argument("--crash-every", type=int, default=0)
    args = parser.parse_args(argv)
    if args.fail_start:
        print("fault_app: --fail-start: failing at start-up on purpose", file=sys.stderr)
        sys.exit(1)
    cache_size = args.cache_size
    crash_every = args.crash_every
    signal.signal(signal.SIGTERM, signal.SIG_IGN if args.ignore_term else on_term)
    if args.start_delay:
        time.sleep(args.start_delay)
    listener = socket.socket(fileno=0)
    while True:
        state = "idle"
        if term_pending:
            sys.exit(0)
        sock, _ = listener.accept()
        try:
            serve_connection(Connection(sock))
        except (BadPeer, OSError):
            pass  # EOF, EPIPE, ECONNRESET, junk: drop the connection, accept the next
        finally:
            sock.close()


if __name__ == "__main__":
    main()
