"""Core benchmark: nginx → fcgipool vs nginx → spawn-fcgi, the same 2 QGIS children.

    .venv/bin/python bench/core.py --repeats 5 --duration 10

Both set-ups stay up side by side; wrk runs alternate between them, each figure is the
median of the repeats. spawn-fcgi gets its usual nginx set-up (a connection per request);
fcgipool gets nginx's keepalive upstream with `fastcgi_keep_conn on`, as its docs recommend.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import urllib.parse
from pathlib import Path

from common import QGIS, REPO, Fcgipool, Result, SpawnFcgi, machine, qgis_env, run_wrk, wait_http

PROJECT = REPO / "demo" / "project" / "demo.qgs"


def demo_bbox() -> str:
    text = PROJECT.read_text()
    match = re.search(r"<WMSExtent[^>]*>((?:\s*<value>[^<]+</value>){4})", text)
    assert match, "demo.qgs has no WMSExtent"
    return ",".join(re.findall(r"<value>([^<]+)</value>", match.group(1)))


def scenarios() -> dict[str, str]:
    base = {"MAP": str(PROJECT), "SERVICE": "WMS", "VERSION": "1.3.0"}
    light_map = {**base, "REQUEST": "GetMap", "LAYERS": "districts,roads,sites", "STYLES": "",
                 "CRS": "EPSG:3857", "BBOX": demo_bbox(), "WIDTH": "256", "HEIGHT": "256",
                 "FORMAT": "image/png"}  # fmt: skip
    return {
        "GetCapabilities": "/ows?" + urllib.parse.urlencode({**base, "REQUEST": "GetCapabilities"}),
        "GetMap 256x256": "/ows?" + urllib.parse.urlencode(light_map),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="fcgipool-bench-"))
    root.chmod(0o755)
    (root / "home").mkdir()
    env = qgis_env(root / "home")
    setups = [Fcgipool(root, args.workers, [QGIS], env), SpawnFcgi(root, args.workers, [QGIS], env)]
    results: dict[tuple[str, str], list[Result]] = {}
    try:
        for setup in setups:
            setup.start()
        paths = scenarios()
        for setup in setups:
            for path in paths.values():
                wait_http(setup.url(path))
                run_wrk(setup.url(path), 2, args.connections)  # warm-up
        for repeat in range(args.repeats):
            for scenario, path in paths.items():
                for setup in setups if repeat % 2 == 0 else setups[::-1]:
                    result = run_wrk(setup.url(path), args.duration, args.connections)
                    results.setdefault((scenario, setup.name), []).append(result)
                    print(f"# {repeat + 1}/{args.repeats} {scenario:<16} {setup.name:<10} "
                          f"{result.requests_per_s:8.1f} req/s  p99 {result.p99_ms:7.2f} ms  "
                          f"errors {result.errors}", file=sys.stderr, flush=True)  # fmt: skip
    finally:
        for setup in setups:
            setup.stop()
        shutil.rmtree(root, ignore_errors=True)

    ours, theirs = setups[0].name, setups[1].name
    print(f"Machine: {machine()}. wrk -t1 -c{args.connections}, {args.duration:g} s runs, "
          f"median of {args.repeats}, {args.workers} children.\n")  # fmt: skip
    print(f"| scenario | {ours} req/s | {theirs} req/s | ratio | {ours} p99 ms | "
          f"{theirs} p99 ms | p99 ratio | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for scenario in scenarios():
        mine, peer = results[(scenario, ours)], results[(scenario, theirs)]
        rate = statistics.median(r.requests_per_s for r in mine)
        peer_rate = statistics.median(r.requests_per_s for r in peer)
        p99 = statistics.median(r.p99_ms for r in mine)
        peer_p99 = statistics.median(r.p99_ms for r in peer)
        errors = sum(r.errors for r in mine + peer)
        print(f"| {scenario} | {rate:.0f} | {peer_rate:.0f} | {rate / peer_rate:.3f} | "
              f"{p99:.2f} | {peer_p99:.2f} | {p99 / peer_p99:.2f} | {errors} |")


if __name__ == "__main__":
    main()
