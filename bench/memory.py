"""Supervisor memory: RSS of the pool with 64 children and 1,000 front-end connections.

    .venv/bin/python bench/memory.py --children 64 --connections 1000

The children are the trivial libfcgi program bench/apps/hello.c (built here with gcc), so
that 64 of them fit on a small machine. The connections are real: each sends one request
with FCGI_KEEP_CONN, reads its answer and stays open, as nginx's keepalive connections do.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fcgipool import client, protocol  # noqa: E402


def build_hello(directory: Path) -> Path:
    binary = directory / "hello-fcgi"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(REPO / "bench/apps/hello.c"), "-lfcgi"],
                   check=True)  # fmt: skip
    return binary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--children", type=int, default=64)
    parser.add_argument("--connections", type=int, default=1000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fcgipool-bench-"))
    binary = build_hello(root)
    address = f"unix:{root}/pool.sock"
    config = root / "pool.toml"
    config.write_text(
        f'[pool]\nbind = ["{address}"]\nworkers = {args.children}\n'
        f'[child]\ncommand = ["{binary}"]\nallow_root = true\n'
        f'[limits]\nmax_connections = {args.connections + 100}\n[log]\nlevel = "warning"\n'
    )
    pool = subprocess.Popen([sys.executable, "-m", "fcgipool", "serve", "-c", str(config)],
                            stderr=subprocess.DEVNULL)  # fmt: skip
    process = psutil.Process(pool.pid)
    try:
        deadline = time.monotonic() + 120
        while len(process.children()) < args.children or not Path(root / "pool.sock").exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the pool did not start its children")
            time.sleep(0.2)
        idle_rss = process.memory_info().rss
        request = protocol.encode_request(1, client.cgi_params("/hello"), keep_conn=True)
        sockets = []
        for _ in range(args.connections):
            sock = client.connect(address)
            sock.sendall(request)
            codec = protocol.ClientConnection()
            while not any(isinstance(e, protocol.EndRequest) for e in codec.feed(sock.recv(65536))):
                pass
            sockets.append(sock)
        time.sleep(1)  # let the loop settle before reading RSS
        loaded_rss = process.memory_info().rss
        print(f"| children | connections | pool RSS idle (MiB) | pool RSS loaded (MiB) |\n"
              f"|---:|---:|---:|---:|\n| {args.children} | {len(sockets)} | "
              f"{idle_rss / 2**20:.1f} | {loaded_rss / 2**20:.1f} |")  # fmt: skip
        for sock in sockets:
            sock.close()
    finally:
        pool.terminate()
        pool.wait(60)


if __name__ == "__main__":
    main()
