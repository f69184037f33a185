"""The demo (demo/): its page's vendored map client, and the page's requests through the
demo's own nginx.conf and fcgipool.toml (their paths moved into a scratch directory)."""

from __future__ import annotations

import concurrent.futures
import io
import json
import math
import os
import re
import socket
import subprocess
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from conftest import DEMO_PROJECT, REPO, free_port, wait_for

DEMO = REPO / "demo"
WWW = DEMO / "www"
PAGE = WWW / "index.html"
LEAFLET = WWW / "leaflet"
R = 6378137.0  # EPSG:3857's sphere


def page_extent() -> list[float]:
    match = re.search(r"var EXTENT = \[([^\]]+)\]", PAGE.read_text())
    assert match, "index.html has no EXTENT"
    return [float(v) for v in match.group(1).split(",")]


def project_extent() -> list[float]:
    text = DEMO_PROJECT.read_text()
    match = re.search(r"<WMSExtent[^>]*>((?:\s*<value>[^<]+</value>){4})", text)
    assert match, "demo.qgs has no WMSExtent"
    return [float(v) for v in re.findall(r"<value>([^<]+)</value>", match.group(1))]


def tile_url(x: int, y: int, z: int) -> str:
    """The GetMap of tile (x, y, z) as Leaflet 1.9's L.tileLayer.wms asks for it with the
    page's options (uppercase: true; its parameters in its order, then the BBOX)."""
    size = 2 * math.pi * R / 2**z
    minx, maxy = -math.pi * R + x * size, math.pi * R - y * size
    params = {"SERVICE": "WMS", "REQUEST": "GetMap", "LAYERS": "demo", "STYLES": "",
              "FORMAT": "image/png", "TRANSPARENT": "true", "VERSION": "1.3.0",
              "WIDTH": "256", "HEIGHT": "256", "CRS": "EPSG:3857"}  # fmt: skip
    bbox = ",".join(repr(v) for v in (minx, maxy - size, minx + size, maxy))
    return "/ows?" + urllib.parse.urlencode(params) + "&BBOX=" + bbox


def tiles_of_the_extent(extent: list[float], z: int) -> list[tuple[int, int, int]]:
    size = 2 * math.pi * R / 2**z
    xs = range(int((extent[0] + math.pi * R) // size), int((extent[2] + math.pi * R) // size) + 1)
    ys = range(int((math.pi * R - extent[3]) // size), int((math.pi * R - extent[1]) // size) + 1)
    return [(x, y, z) for x in xs for y in ys]


# ---------------------------------------------------------------- the page, no processes


def test_the_page_loads_the_vendored_leaflet_and_nothing_from_elsewhere():
    html = PAGE.read_text()
    local = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert "leaflet/leaflet.js" in local and "leaflet/leaflet.css" in local
    for ref in local:
        if ref.startswith(("/ows", "/fcgipool-status", "https://leafletjs.com/", "data:")):
            continue
        assert not re.match(r"(https?:)?//", ref), f"{ref}: an external resource"
        assert (WWW / ref.lstrip("/")).is_file(), f"{ref}: no such file in demo/www"
    css = (LEAFLET / "leaflet.css").read_text()
    for ref in set(re.findall(r"url\((images/[^)]+)\)", css)):
        assert (LEAFLET / ref).is_file(), f"leaflet.css needs {ref}"
    assert "BSD 2-Clause" in (LEAFLET / "LICENSE").read_text()
    assert 'L.tileLayer.wms("/ows"' in html
    assert 'fetch("/fcgipool-status"' in html or 'get("/fcgipool-status"' in html


def test_the_vendored_version_is_the_one_the_docs_name():
    version = re.search(r'\.version="(\d+\.\d+\.\d+)"', (LEAFLET / "leaflet.js").read_text())
    assert version, "leaflet.js declares no version"
    assert f"Leaflet</a> {version[1]}" in PAGE.read_text()
    assert f"**{version[1]}**" in (DEMO / "README.md").read_text()


def test_the_page_starts_on_the_project_extent():
    assert page_extent() == pytest.approx(project_extent(), abs=0.01)


def test_the_demo_pool_answers_its_status_path():
    config = tomllib.loads((DEMO / "fcgipool.toml").read_text())
    path = config["admin"]["status_path"]
    nginx = (DEMO / "nginx.conf").read_text()
    assert f"location = {path} {{" in nginx
    assert f'get("{path}"' in PAGE.read_text()


# ---------------------------------------------------------------- the real thing


@pytest.fixture
def demo(workdir: Path, pool_factory, heavy_project):
    """nginx with demo/nginx.conf and the pool with demo/fcgipool.toml, their paths moved
    under ``workdir`` (as root, nginx's workers and the children run as root): the base URL."""
    run, logs, home = workdir / "run", workdir / "log", workdir / "home"
    for path in (run / "nginx", logs, home, run / "qgis-runtime", run / "qgis-tmp"):
        path.mkdir(parents=True, mode=0o700 if "qgis" in path.name else 0o755)
    port = free_port()

    config = tomllib.loads((DEMO / "fcgipool.toml").read_text())
    config["pool"]["bind"] = [f"unix:{run}/demo.sock"]
    config["pool"]["socket_mode"] = "0666"
    config["pool"].pop("socket_group")
    config["child"].pop("user")
    config["child"]["allow_root"] = True
    config["child"]["cwd"] = str(workdir)
    config["child"]["warmup"] = [w.replace("/opt/fcgipool/demo", str(DEMO))
                                 for w in config["child"]["warmup"]]  # fmt: skip
    config["child"]["env"].update(HOME=str(home), XDG_RUNTIME_DIR=str(run / "qgis-runtime"),
                                  TMPDIR=str(run / "qgis-tmp"))  # fmt: skip
    config["log"] = {"level": "info"}
    pool = pool_factory(config)

    conf = (DEMO / "nginx.conf").read_text()
    conf = conf.replace("user www-data;", "user root;" if os.geteuid() == 0 else "")
    conf = conf.replace("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("/opt/fcgipool/demo", str(DEMO)).replace("/run/fcgipool", str(run))
    conf = conf.replace("/var/log/nginx/fcgipool-demo", f"{logs}/fcgipool-demo")
    assert "/opt/" not in conf and "/var/" not in conf
    (workdir / "nginx.conf").write_text(conf)
    nginx = subprocess.Popen(["nginx", "-c", str(workdir / "nginx.conf"), "-g", "daemon off;"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip

    def listening() -> bool:
        if nginx.poll() is not None:
            raise AssertionError(f"nginx exited: {nginx.stderr.read().decode()}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for(listening, 20, "nginx to listen")
        yield f"http://127.0.0.1:{port}", pool
    finally:
        nginx.terminate()
        nginx.wait(10)


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


def test_the_page_its_tiles_and_its_status_line_through_the_demo_nginx(demo):
    base, _ = demo
    status, kind, body = get(base + "/")
    assert (status, kind) == (200, "text/html") and b"leaflet/leaflet.js" in body
    for path in ("/leaflet/leaflet.js", "/leaflet/leaflet.css", "/leaflet/images/layers.png"):
        assert get(base + path)[0] == 200, path

    # every tile of the town at zoom 12 (the page's first view on a ~1200x700 map) at once,
    # as the browser asks for them: each a 256x256 PNG, those in the town not blank
    tiles = tiles_of_the_extent(page_extent(), 12)
    assert len(tiles) >= 4
    with concurrent.futures.ThreadPoolExecutor(len(tiles)) as pool:
        answers = list(pool.map(lambda t: get(base + tile_url(*t)), tiles))
    for (status, kind, body), tile in zip(answers, tiles, strict=True):
        assert (status, kind) == (200, "image/png"), (tile, status, body[:200])
        image = Image.open(io.BytesIO(body))
        assert image.format == "PNG" and image.size == (256, 256)
    colors = [len(Image.open(io.BytesIO(b)).convert("RGBA").getcolors(1 << 16) or range(999))
              for _, _, b in answers]  # fmt: skip
    assert max(colors) > 10, "every tile is blank"

    status, kind, body = get(base + "/fcgipool-status")
    assert (status, kind) == (200, "application/json")
    doc = json.loads(body)
    pool = doc["pool"]
    assert {"busy", "idle"} <= set(pool["children"]) and pool["queue_length"] == 0
    assert pool["workers"] == 2 and pool["requests_served"] >= len(tiles)

    assert get(base + "/ows?MAP=/etc/passwd&SERVICE=WMS&REQUEST=GetCapabilities")[0] == 403
