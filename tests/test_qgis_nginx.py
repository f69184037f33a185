"""The happy path on the real thing: nginx → fcgipool → qgis_mapserv.fcgi."""

from __future__ import annotations

import asyncio
import collections
import io
import resource
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET

import pytest
from PIL import Image

from conftest import DEMO_PROJECT, free_port, qgis_config, wait_for
from fcgipool import client

WMS = "http://www.opengis.net/wms"


def ows(**params: str) -> str:
    query = {"MAP": str(DEMO_PROJECT), "SERVICE": "WMS", **params}
    return "/ows?" + urllib.parse.urlencode(query)


def fetch(url: str, data: bytes | None = None, timeout: float = 60) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=data)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def layer_names(xml: bytes) -> set[str]:
    root = ET.fromstring(xml)
    return {node.text for node in root.iter(f"{{{WMS}}}Name") if node.text}


def capabilities_ok(body: bytes) -> None:
    root = ET.fromstring(body)
    assert root.tag == f"{{{WMS}}}WMS_Capabilities"
    assert {"districts", "sites"} <= layer_names(body)


def getmap_ok(body: bytes, size: int = 256) -> None:
    image = Image.open(io.BytesIO(body))
    image.load()
    assert image.format == "PNG"
    assert image.size == (size, size)
    colors = image.convert("RGBA").getcolors(maxcolors=1 << 16)
    assert colors is None or len(colors) > 10, "the map is blank"


def getmap_url(size: int = 256) -> str:
    return ows(VERSION="1.3.0", REQUEST="GetMap", LAYERS="districts,roads,sites",
               CRS="EPSG:3857", BBOX=DEMO_BBOX, WIDTH=str(size), HEIGHT=str(size),
               FORMAT="image/png", STYLES="")


def demo_bbox() -> str:
    """The demo project's extent in EPSG:3857, read from its own capabilities."""
    import re
    text = DEMO_PROJECT.read_text()
    match = re.search(r"<WMSExtent[^>]*>\s*<value>([^<]+)</value>\s*<value>([^<]+)</value>\s*"
                      r"<value>([^<]+)</value>\s*<value>([^<]+)</value>", text)
    assert match, "demo.qgs has no WMSExtent"
    return ",".join(value.strip() for value in match.groups())


DEMO_BBOX = demo_bbox()


@pytest.fixture
def qgis_pool(pool_factory, workdir):
    return pool_factory(qgis_config(workdir))


def test_capabilities_map_and_post_through_nginx(qgis_pool, nginx_factory):
    nginx = nginx_factory(qgis_pool.address)
    status, headers, body = fetch(nginx.url(ows(REQUEST="GetCapabilities")))
    assert status == 200 and "xml" in headers["Content-Type"]
    capabilities_ok(body)
    status, headers, body = fetch(nginx.url(getmap_url()))
    assert status == 200 and headers["Content-Type"] == "image/png"
    getmap_ok(body)
    form = urllib.parse.urlencode({"MAP": str(DEMO_PROJECT), "SERVICE": "WMS",
                                   "REQUEST": "GetCapabilities"}).encode()
    status, _, body = fetch(nginx.url("/ows"), data=form)
    assert status == 200
    capabilities_ok(body)


async def http_get(port: int, path: str) -> tuple[int, float, bytes]:
    """One HTTP/1.1 GET on its own connection: (status, seconds, body); status 0 when the
    connection failed."""
    started = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(-1), 120)
        writer.close()
    except (TimeoutError, OSError):
        return 0, time.monotonic() - started, b""
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, time.monotonic() - started, body


def many_files() -> None:
    """A thousand connections at once need more descriptors than the default 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 16384)), hard))


def test_1000_concurrent_requests_all_succeed_with_the_defaults(qgis_pool, nginx_factory):
    """A burst of 1,000 (GetCapabilities and GetMap) on 2 children: all served, none
    refused, with the default configuration (issue 12: 478 of 1,000 were served before)."""
    many_files()
    nginx = nginx_factory(qgis_pool.address)
    paths = [ows(REQUEST="GetCapabilities") if i % 2 else getmap_url(64) for i in range(1000)]

    async def burst() -> list[tuple[int, float, bytes]]:
        return await asyncio.gather(*(http_get(nginx.port, path) for path in paths))

    results = asyncio.run(burst())
    failures = collections.Counter(status for status, _, _ in results if status != 200)
    assert not failures, (failures, nginx.error_log()[-2000:], qgis_pool.log()[-3000:])
    assert "Resource temporarily unavailable" not in nginx.error_log()
    for (_, _, body), path in zip(results[:50], paths[:50], strict=True):
        if "GetMap" in path:
            getmap_ok(body, 64)
        else:
            capabilities_ok(body)


def test_sustained_overload_keeps_goodput_and_answers_at_once(qgis_pool, nginx_factory):
    """Open loop at 3x what 2 children serve, for 10 s, with the defaults: the pool keeps
    serving at capacity, and whatever it refuses is refused at once (a 503 in < 100 ms)."""
    many_files()
    nginx = nginx_factory(qgis_pool.address)
    path = getmap_url(256)

    async def closed_loop(seconds: float) -> float:
        done, deadline = 0, time.monotonic() + seconds

        async def client() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                status, _, _ = await http_get(nginx.port, path)
                done += status == 200
        await asyncio.gather(*(client() for _ in range(4)))
        return done / seconds

    async def open_loop(rate: float, seconds: float) -> list[tuple[int, float, float]]:
        tasks, start = [], time.monotonic()

        async def one(at: float) -> tuple[int, float, float]:
            status, took, _ = await http_get(nginx.port, path)
            return status, took, at + took
        for n in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
            tasks.append(asyncio.ensure_future(one(time.monotonic() - start)))
        return await asyncio.gather(*tasks)

    asyncio.run(closed_loop(2.0))  # warm: the project loaded, the costs learned
    capacity = asyncio.run(closed_loop(4.0))
    results = asyncio.run(open_loop(3 * capacity, 10.0))
    statuses = collections.Counter(status for status, _, _ in results)
    assert set(statuses) <= {200, 503}, (statuses, nginx.error_log()[-2000:])
    refusals = sorted(took for status, took, _ in results if status == 503)
    if refusals:
        assert refusals[int(0.99 * (len(refusals) - 1))] < 0.1, refusals[-10:]
    served_in_time = sum(1 for status, _, end in results if status == 200 and end <= 10.0)
    assert served_in_time / 10.0 >= 0.75 * capacity, (served_in_time, capacity, statuses)
    waited = max(took for status, took, _ in results if status == 200)
    assert waited < 30 + 5, "what was admitted was served within the queue timeout"


def test_kept_child_connection_survives_idle_time(qgis_pool):
    """libfcgi drops a silent connection after ~2 s; the pool reconnects transparently."""
    first = client.request(qgis_pool.address, ows(REQUEST="GetCapabilities"))
    assert first.status == 200
    time.sleep(3)  # the scenario itself: the kept connection sits idle past libfcgi's limit
    second = client.request(qgis_pool.address, ows(REQUEST="GetCapabilities"))
    assert second.status == 200
    capabilities_ok(second.body)
    assert "child_exited" not in qgis_pool.log()


def test_through_tcp(pool_factory, workdir, nginx_factory):
    port = free_port()
    pool = pool_factory(qgis_config(workdir, bind=[f"tcp:127.0.0.1:{port}"]))
    nginx = nginx_factory(f"127.0.0.1:{port}")
    status, _, body = fetch(nginx.url(ows(REQUEST="GetCapabilities")))
    assert status == 200
    capabilities_ok(body)
    direct = client.request(pool.address, getmap_url())
    assert direct.status == 200
    getmap_ok(direct.body)


def test_socket_handed_over_by_systemd(pool_factory, workdir, nginx_factory):
    path = workdir / "activated.sock"
    config = qgis_config(workdir, bind=[f"unix:{workdir}/unused.sock"])
    pool = pool_factory(config, ready=False,
                        wrap=["systemd-socket-activate", "-l", str(path), "--"])
    wait_for(path.exists, 20, "systemd-socket-activate to create the socket")
    nginx = nginx_factory(f"unix:{path}")
    status, _, body = fetch(nginx.url(ows(REQUEST="GetCapabilities")))
    assert status == 200
    capabilities_ok(body)
    log = pool.log()
    assert "sockets_inherited" in log
    assert not (workdir / "unused.sock").exists()


def test_request_command_prints_status_headers_and_body(qgis_pool, workdir):
    out = subprocess.run(
        [sys.executable, "-m", "fcgipool", "request", qgis_pool.address,
         ows(REQUEST="GetCapabilities")],
        capture_output=True, check=True, timeout=60,
    ).stdout
    head, _, body = out.partition(b"\n\n")
    assert head.startswith(b"Status: 200")
    assert b"Content-Type: text/xml" in head
    capabilities_ok(body)
    target = workdir / "map.png"
    subprocess.run(
        [sys.executable, "-m", "fcgipool", "request", qgis_pool.address, getmap_url(),
         "-o", str(target)],
        capture_output=True, check=True, timeout=60,
    )
    getmap_ok(target.read_bytes())


def test_ten_reloads_under_load_fail_no_request(pool_factory, workdir, nginx_factory):
    import collections
    import os
    import signal
    import threading

    pool = pool_factory(qgis_config(workdir))
    nginx = nginx_factory(pool.address)
    urls = [nginx.url(ows(REQUEST="GetCapabilities")), nginx.url(getmap_url(64))]
    stop = threading.Event()
    statuses: collections.Counter = collections.Counter()
    deadline = time.monotonic() + 240  # the load stops by itself

    def load(index: int) -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            status, _, _ = fetch(urls[index % 2])
            statuses[status] += 1
            index += 1

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: statuses[200] >= 20, 60, "the load to run")
        for count in range(1, 11):
            os.kill(pool.pid, signal.SIGHUP)
            # Signals do not queue: send the next once this one was taken.
            wait_for(lambda c=count: pool.log().count("[info     ] reload ") >= c, 30,
                     f"reload {count} to be taken")
        def last_reload_done() -> bool:
            log = pool.log()
            return "reload_done" in log[log.rindex("[info     ] reload "):]

        wait_for(last_reload_done, 180, "the last rolling restart to finish")
        served_during = sum(statuses.values())
        wait_for(lambda: sum(statuses.values()) >= served_during + 20, 60, "more load after")
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    assert set(statuses) == {200}, statuses
    assert pool.log().count("child_retired") >= 2
