"""The pool's own Python cost per request, without sockets or processes: the real
FrontConnection, Request, Dispatcher, ChildConnection and Pool, on the real event loop, with
transports that hand the bytes over in memory.

    .venv/bin/python bench/hotpath.py --requests 200000
    .venv/bin/python bench/hotpath.py --profile        # and where the time goes (cProfile)
    .venv/bin/python bench/hotpath.py --instructions   # instructions per request (valgrind)
    .venv/bin/python bench/hotpath.py --instructions --without params   # what a part costs

A request is what nginx sends for ``GET /x`` (BEGIN_REQUEST with FCGI_KEEP_CONN, nginx's
fastcgi_params, the end of STDIN); the child answers at once, on the next turn of the loop,
with a one-line body. One request at a time, on one kept connection each side: the path a
request takes on a pool that is not saturated (a saturated pool queues the request first).
The figure is CPU time per request, deterministic to a few per cent where end-to-end runs
on a shared VM move by ±20 %: it is the interpreter's share of the pool's cost, the part
code changes can lower; the system calls (about 20 µs a request on this VM, see
docs/benchmarks.md) come on top.

``--instructions`` counts the instructions a request costs instead (valgrind's callgrind:
the count of a run of 3N requests less that of N, over 2N): repeatable to about 0.5 % (hash
randomisation moves it a little) on any machine, so a change of a few per cent shows.
``--without PART`` takes one part's cost away, to see what it is: ``params`` (PARAMS
decoding: each distinct PARAMS stream is decoded once and copied after), ``access`` (the
access log, switched off as an operator would), ``metrics`` (the per-request counters) or
``status`` (reading the answer's status) or ``cost`` (log.request_cost: the child's CPU and
memory read from /proc at the start and end of each request).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fcgipool import accounting, logs, protocol, request  # noqa: E402
from fcgipool import config as configuration  # noqa: E402
from fcgipool.child import Child, ChildConnection, State  # noqa: E402
from fcgipool.cli import _event_loop_runner  # noqa: E402
from fcgipool.processes import read_usage  # noqa: E402
from fcgipool.supervisor import Pool  # noqa: E402

NGINX_PARAMS = {
    "QUERY_STRING": "", "REQUEST_METHOD": "GET", "CONTENT_TYPE": "", "CONTENT_LENGTH": "",
    "SCRIPT_NAME": "/x", "REQUEST_URI": "/x", "DOCUMENT_URI": "/x",
    "DOCUMENT_ROOT": "/usr/share/nginx/html", "SERVER_PROTOCOL": "HTTP/1.1",
    "REQUEST_SCHEME": "http", "GATEWAY_INTERFACE": "CGI/1.1", "SERVER_SOFTWARE": "nginx/1.22.1",
    "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "40000", "REMOTE_USER": "",
    "SERVER_ADDR": "127.0.0.1", "SERVER_PORT": "8080", "SERVER_NAME": "",
    "REDIRECT_STATUS": "200", "HTTP_HOST": "127.0.0.1:8080", "HTTP_USER_AGENT": "wrk",
}  # fmt: skip
REQUEST = protocol.encode_request(
    1, {k.encode(): v.encode() for k, v in NGINX_PARAMS.items()}, keep_conn=True
)
ANSWER = protocol.encode_response(1, 200, b"hello /x\n", (), "text/plain")
STDIN_END = protocol.encode_record(protocol.RecordType.STDIN, 1)


class MemoryTransport:
    """What a protocol needs of a transport; writes go to ``sink``."""

    def __init__(self, sink) -> None:
        self.sink = sink

    def write(self, data: bytes) -> None:
        self.sink(data)

    def get_extra_info(self, name: str, default=None):
        return default

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


PARTS = ("params", "access", "metrics", "status", "cost")


def take_away(part: str) -> None:
    """Make ``part`` of the request path cost (almost) nothing; see the module docstring."""
    if part == "params":
        decoded: dict[bytes, dict[bytes, bytes]] = {}
        decode = protocol.decode_pairs

        def decode_once(data: bytes) -> dict[bytes, bytes]:
            if data not in decoded:
                decoded[data] = decode(data)
            return dict(decoded[data])

        protocol.decode_pairs = decode_once
    elif part == "metrics":
        accounting.Accounting.observe = lambda self, *values: None  # type: ignore[method-assign]
    elif part == "status":
        request.response_status = lambda head: 200
        request.stdout_content = lambda records, starts, limit: b""


def measure(requests: int, profile: bool, without: tuple[str, ...] = ()) -> float:
    """CPU seconds per request over ``requests`` requests, on the pool's event loop."""
    for part in without:
        take_away(part)
    config = configuration.build(
        None,
        {"child": {"command": ["/bin/true"], "allow_root": True},
         "log": {"level": "warning", "file": "/dev/null", "access": "access" not in without,
                 "request_cost": "cost" not in without}},
        {},
    )  # fmt: skip
    logs.configure(config.log.format, config.log.level, config.log.file)
    return _event_loop_runner(config.pool.event_loop)[1](_measure(config, requests, profile))


class NoProcesses:
    """The one child below is made by hand: nothing is spawned. Its CPU and memory are
    read as the real ones are (log.request_cost), from this process's /proc/PID/stat."""

    def __init__(self) -> None:
        self.stat = os.open("/proc/self/stat", os.O_RDONLY)

    def usage(self, child: Child) -> tuple[int, int]:
        return read_usage(self.stat)

    def cpu_busy(self, waiting: bool) -> float | None:
        return None  # a fixed pool of one: never asked

    def cpu_count(self) -> int:
        return 1


async def _measure(config: configuration.Config, requests: int, profile: bool) -> float:
    loop = asyncio.get_running_loop()
    pool = Pool(config, loop=loop, processes=NoProcesses())  # type: ignore[arg-type]
    child = Child(1, [], loop.time())
    child.pid, child.state = 1, State.IDLE
    connection = ChildConnection(child, lambda child: None, loop.time)

    def child_receives(data: bytes) -> None:
        if data.endswith(STDIN_END):  # the whole request is there: answer on the next turn
            loop.call_soon(connection.data_received, ANSWER)

    connection.connection_made(MemoryTransport(child_receives))
    child.connection = connection
    pool.children.all.append(child)
    pool.dispatcher.child_idle(child)
    front = pool.frontend.connection()
    finished = loop.create_future()
    done = 0

    def web_server_receives(data: bytes) -> None:
        nonlocal done
        if data.endswith(ANSWER[-16:]):  # END_REQUEST: send the next request
            done += 1
            if done % 1000 == 0:
                logs.flush_access()  # the pool does this a few times a second
            if done < requests:
                loop.call_soon(front.data_received, REQUEST)
            elif not finished.done():
                finished.set_result(None)

    front.connection_made(MemoryTransport(web_server_receives))
    profiler = cProfile.Profile() if profile else None
    loop.call_soon(front.data_received, REQUEST)
    start = time.process_time()
    if profiler:
        profiler.enable()
    await finished
    if profiler:
        profiler.disable()
    used = time.process_time() - start
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return used / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="once, under cProfile")
    parser.add_argument("--instructions", action="store_true",
                        help="instructions per request (valgrind); N = --requests, at most 2000")
    parser.add_argument("--without", action="append", choices=PARTS, default=[],
                        help="take this part's cost away (repeatable)")
    args = parser.parse_args()
    without = tuple(args.without)
    if args.instructions:
        requests = min(args.requests, 2000)
        print(f"pool instructions per request: {instructions(requests, without):,}"
              + (f" (without {', '.join(without)})" if without else ""))  # fmt: skip
        return
    if args.profile:
        measure(args.requests, profile=True, without=without)
        return
    times = sorted(measure(args.requests, profile=False, without=without)
                   for _ in range(args.repeats))  # fmt: skip
    print(f"pool Python CPU per request: {times[len(times) // 2] * 1e6:.1f} µs "
          f"(median of {args.repeats} x {args.requests} requests; "
          f"min {times[0] * 1e6:.1f}, max {times[-1] * 1e6:.1f})")  # fmt: skip


def instructions(requests: int, without: tuple[str, ...]) -> int:
    """Instructions per request: callgrind's total for 3N requests less that for N, over 2N
    (start-up and shut-down cancel out)."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (apt-get install valgrind)")
    totals = []
    for count in (requests, 3 * requests):
        command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                   sys.executable, __file__, "--requests", str(count), "--repeats", "1"]
        for part in without:
            command += ["--without", part]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        totals.append(int(re.search(r"Collected : (\d+)", done.stderr).group(1)))  # type: ignore[union-attr]
    return (totals[1] - totals[0]) // (2 * requests)


if __name__ == "__main__":
    main()
