"""Supervisor memory (the suite's "m"): RSS of the pool with 64 children and 1,000 connections.

fcgipool only: the other managers hold no connections (spawn-fcgi and multiwatch are not in
the data path; Apache's memory is the web server's), so there is nothing alike to compare.
The children are the trivial libfcgi program bench/apps/hello.c (built here with gcc), so
that 64 of them fit on a small machine. The connections are real and go straight to the
pool's socket: each sends one request with FCGI_KEEP_CONN, reads its answer and stays open,
as nginx's keepalive connections do. Each repeat starts a fresh pool. A quick run uses 8
children and 50 connections.

Metrics: ``rss_idle_mib`` (all children up, no connection) and ``rss_mib`` (with the
connections open, after a second to settle). Goal (issue 6): <= 60 MB.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
from results import Context, Row, log, metric_rows

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fcgipool import client, protocol  # noqa: E402

KEY = "m"
NAME = "m-memory"
TITLE = "fcgipool's own memory with many children and connections"
HEADLINE = [("rss_mib", "pool RSS, MiB")]


def build_hello(directory: Path) -> Path:
    binary = directory / "hello-fcgi"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(REPO / "bench/apps/hello.c"), "-lfcgi"],
                   check=True)  # fmt: skip
    return binary


def size(ctx: Context) -> tuple[int, int]:
    """(children, connections)."""
    return (8, 50) if ctx.quick else (64, 1000)


def estimate(ctx: Context) -> float:
    return ctx.repeats * (3 if ctx.quick else 6)


def measure(root: Path, binary: Path, children: int, connections: int) -> tuple[float, float]:
    """(RSS idle, RSS with the connections open) of a fresh pool, in MiB."""
    address = f"unix:{root}/pool.sock"
    config = root / "pool.toml"
    config.write_text(
        f'[pool]\nbind = ["{address}"]\nworkers = {children}\n'
        f'[child]\ncommand = ["{binary}"]\nallow_root = true\n'
        f'[limits]\nmax_connections = {connections + 100}\n[log]\nlevel = "warning"\n'
    )
    pool = subprocess.Popen([sys.executable, "-m", "fcgipool", "serve", "-c", str(config)],
                            cwd=REPO, stderr=subprocess.DEVNULL)  # fmt: skip
    process = psutil.Process(pool.pid)
    sockets = []
    try:
        deadline = time.monotonic() + 120
        while len(process.children()) < children or not (root / "pool.sock").exists():
            if time.monotonic() > deadline or pool.poll() is not None:
                raise RuntimeError("the pool did not start its children")
            time.sleep(0.2)
        idle = process.memory_info().rss
        request = protocol.encode_request(1, client.cgi_params("/hello"), keep_conn=True)
        for _ in range(connections):
            sock = client.connect(address)
            sockets.append(sock)
            sock.sendall(request)
            codec = protocol.ClientConnection()
            while not any(isinstance(e, protocol.EndRequest) for e in codec.feed(sock.recv(65536))):
                pass
        time.sleep(1)  # let the loop settle before reading RSS
        return idle / 2**20, process.memory_info().rss / 2**20
    finally:
        for sock in sockets:
            sock.close()
        pool.terminate()
        pool.wait(60)
        (root / "pool.sock").unlink(missing_ok=True)


def run(ctx: Context) -> list[Row]:
    if not ctx.wants("fcgipool"):
        return []
    children, connections = size(ctx)
    case = f"{children} children, {connections} connections"
    binary = build_hello(ctx.root)
    rows: list[Row] = []
    for repeat in range(ctx.repeats):
        idle, loaded = measure(ctx.root, binary, children, connections)
        rows += metric_rows(NAME, case, "fcgipool", repeat,
                            {"rss_idle_mib": idle, "rss_mib": loaded})  # fmt: skip
        log(f"{NAME} {repeat + 1}/{ctx.repeats} {case}: pool RSS idle {idle:.1f} MiB, "
            f"loaded {loaded:.1f} MiB")  # fmt: skip
    return rows
