"""QGIS-aware dispatch on the real thing: nginx → fcgipool → qgis_mapserv.fcgi."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import urllib.parse

from test_qgis_nginx import capabilities_ok, fetch, layer_names, ows

from conftest import DEMO_PROJECT, pool_status, qgis_config, wait_for
from fcgipool import client

HEAVY_BBOX = "2584500,6860500,2733700,6987500"


def heavy_map(project) -> str:
    return "/ows?" + urllib.parse.urlencode({
        "MAP": str(project), "SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap",
        "LAYERS": "heavy", "STYLES": "", "CRS": "EPSG:3857", "BBOX": HEAVY_BBOX,
        "WIDTH": "512", "HEIGHT": "436", "FORMAT": "image/png"})


def run_in_threads(calls):
    """Start each call in a thread; return (threads, results) with results[i] =
    (finish time, status)."""
    results: dict[int, tuple[float, int]] = {}

    def run(index, call):
        status = call()
        results[index] = (time.monotonic(), status)

    threads = [threading.Thread(target=run, args=(i, call), daemon=True)
               for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    return threads, results


def test_classes_are_resolved_from_real_ogc_requests(pool_factory, workdir, nginx_factory):
    pool = pool_factory(qgis_config(workdir, log={"format": "json"}))
    nginx = nginx_factory(pool.address)
    assert fetch(nginx.url(ows(REQUEST="GetCapabilities")))[0] == 200
    assert fetch(nginx.url(ows(REQUEST="GetLegendGraphic", LAYER="sites",
                               FORMAT="image/png")))[0] == 200
    assert fetch(nginx.url(ows(VERSION="1.3.0", REQUEST="GetMap", LAYERS="sites",
                               CRS="EPSG:3857", BBOX="2643108,6917006,2666315,6938475",
                               WIDTH="64", HEIGHT="64", FORMAT="image/png", STYLES="")))[0] == 200
    form = urllib.parse.urlencode({"MAP": str(DEMO_PROJECT), "SERVICE": "WMS",
                                   "REQUEST": "GetCapabilities"}).encode()
    status, _, body = fetch(nginx.url("/ows"), data=form)
    assert status == 200
    capabilities_ok(body)
    wait_for(lambda: pool.log().count('"event": "access"') >= 4, 10, "four access lines")
    lines = [json.loads(line) for line in pool.log().splitlines() if '"event": "access"' in line]
    assert [line["request_class"] for line in lines] == ["light", "light", "heavy", "light"]
    assert all(line["project"] == str(DEMO_PROJECT) for line in lines[:3])


def test_getcapabilities_goes_before_waiting_heavy_maps(pool_factory, workdir, nginx_factory,
                                                        heavy_project):
    pool = pool_factory(qgis_config(workdir, limits={"max_waiting": 64, "queue_timeout": 250},
                         timeouts={"request": 250}))
    nginx = nginx_factory(pool.address)
    heavy_url = nginx.url(heavy_map(heavy_project))
    first = fetch(heavy_url, timeout=280)
    assert first[0] == 200, (first, pool.log()[-3000:], nginx.error_log())  # loads the project
    threads, results = run_in_threads([lambda: fetch(heavy_url, timeout=280)[0]] * 6)
    wait_for(lambda: pool_status(pool)["pool"]["classes"]["heavy"]["waiting"] >= 3, 30,
             "heavy maps queued behind busy children")
    light = fetch(nginx.url(ows(REQUEST="GetCapabilities")))
    light_done = time.monotonic()
    assert light[0] == 200
    capabilities_ok(light[2])
    for thread in threads:
        thread.join(300)
    assert [status for _, status in results.values()] == [200] * 6
    heavy_after = sum(done > light_done for done, _ in results.values())
    assert heavy_after >= 3, "the GetCapabilities waited behind queued heavy maps"


def test_reserved_light_capacity_holds_under_a_heavy_flood(pool_factory, workdir,
                                                           nginx_factory, heavy_project):
    classes = [
        {"name": "light", "match": {"REQUEST": "GetCapabilities|GetLegendGraphic"},
         "priority": 10, "reserved": 1},
        {"name": "heavy", "match": {"REQUEST": "GetMap"}, "priority": 0},
    ]
    config = qgis_config(workdir, limits={"max_waiting": 64, "queue_timeout": 250},
                         timeouts={"request": 250})
    config["classes"] = classes
    pool = pool_factory(config)
    nginx = nginx_factory(pool.address)
    heavy_url = nginx.url(heavy_map(heavy_project))
    threads, results = run_in_threads([lambda: fetch(heavy_url, timeout=280)[0]] * 6)
    wait_for(lambda: pool_status(pool)["pool"]["classes"]["heavy"]["waiting"] >= 3, 60,
             "a flood of heavy maps")
    light = fetch(nginx.url(ows(REQUEST="GetCapabilities")))
    assert light[0] == 200
    # Answered by the reserved child while heavy maps still wait for the other one.
    assert pool_status(pool)["pool"]["classes"]["heavy"]["waiting"] >= 1
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # heavy never holds more than the unreserved child
        classes = pool_status(pool)["pool"]["classes"]
        assert classes["heavy"]["running"] <= 1, classes
        if not classes["heavy"]["waiting"]:
            break
        time.sleep(0.05)  # a sampling interval, not a synchronisation
    for thread in threads:
        thread.join(300)
    statuses = [status for _, status in results.values()]
    assert statuses == [200] * 6, (statuses, nginx.error_log()[-2000:], pool.log()[-3000:])


def test_project_outside_the_allowed_roots_gets_403_and_no_child_sees_it(
        pool_factory, workdir, nginx_factory):
    outside = workdir / "outside.qgs"
    shutil.copy(DEMO_PROJECT, outside)
    link = DEMO_PROJECT.parent / f"link-{os.getpid()}.qgs"
    os.symlink(outside, link)
    try:
        pool = pool_factory(qgis_config(
            workdir, projects={"allowed_roots": [str(DEMO_PROJECT.parent)]}))
        nginx = nginx_factory(pool.address)
        assert fetch(nginx.url(ows(REQUEST="GetCapabilities")))[0] == 200
        served = sum(row["requests"] for row in pool_status(pool)["children"])
        for project in (outside, link, DEMO_PROJECT.parent / ".." / ".." / outside.name):
            query = urllib.parse.urlencode({"MAP": str(project), "SERVICE": "WMS",
                                            "REQUEST": "GetCapabilities"})
            status, _, body = fetch(nginx.url("/ows?" + query))
            assert status == 403 and b"not served here" in body
        assert sum(row["requests"] for row in pool_status(pool)["children"]) == served
        assert pool.log().count("project_refused") == 3
    finally:
        link.unlink()


def test_by_default_map_cannot_override_the_web_servers_project_nor_name_other_files(
        pool_factory, workdir, nginx_factory, heavy_project):
    pool = pool_factory(qgis_config(workdir))
    assert "config_unsafe" in pool.log() and "projects.allowed_roots: empty" in pool.log()
    nginx = nginx_factory(pool.address)
    capabilities = {"SERVICE": "WMS", "REQUEST": "GetCapabilities"}

    def get(path: str, **params: str) -> tuple[int, bytes]:
        status, _, body = fetch(nginx.url(path + "?" + urllib.parse.urlencode(
            {**params, **capabilities})))
        return status, body

    status, body = get("/pinned")
    assert status == 200 and "districts" in layer_names(body)
    assert get("/pinned", MAP=str(DEMO_PROJECT))[0] == 200
    served = sum(row["requests"] for row in pool_status(pool)["children"])
    for path, project in (("/pinned", str(heavy_project)), ("/ows", "/etc/passwd"),
                          ("/ows", str(DEMO_PROJECT.parent))):
        status, body = get(path, MAP=project)
        assert status == 403 and b"not served here" in body, (path, project, body)
    assert sum(row["requests"] for row in pool_status(pool)["children"]) == served
    assert pool.log().count("project_refused") == 3
    status, body = get("/ows", MAP=str(heavy_project))  # a route that sets no project
    assert status == 200 and "heavy" in layer_names(body)


def test_allow_map_override_serves_the_project_the_request_names(
        pool_factory, workdir, nginx_factory, heavy_project):
    pool = pool_factory(qgis_config(workdir, projects={"allow_map_override": True}))
    nginx = nginx_factory(pool.address)
    query = urllib.parse.urlencode({"MAP": str(heavy_project), "SERVICE": "WMS",
                                    "REQUEST": "GetCapabilities"})
    status, _, body = fetch(nginx.url("/pinned?" + query))
    assert status == 200 and "heavy" in layer_names(body)
    assert "projects.allow_map_override: true" in pool.log()


def test_search_path_alias_is_resolved_for_the_child(pool_factory, workdir):
    pool = pool_factory(qgis_config(workdir, projects={
        "search_paths": {"/demo": str(DEMO_PROJECT.parent)},
        "allowed_roots": [str(DEMO_PROJECT.parent)]}))
    response = client.request(pool.address, "/ows?MAP=/demo/demo.qgs&SERVICE=WMS&"
                              "REQUEST=GetCapabilities")
    assert response.status == 200
    capabilities_ok(response.body)


def test_pinned_projects_are_loaded_before_a_respawned_child_serves(pool_factory, workdir):
    pool = pool_factory(qgis_config(workdir, projects={"pinned": [str(DEMO_PROJECT)]}))
    assert pool.log().count("warmups=1") == 2
    rows = pool_status(pool)["children"]
    assert all(row["projects"] == [str(DEMO_PROJECT)] for row in rows)
    victim = rows[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: pool.log().count("warmups=1") == 3, 60, "the replacement to warm up")
    new_rows = pool_status(pool)["children"]
    (new,) = [row for row in new_rows if row["pid"] not in {r["pid"] for r in rows}]
    assert new["projects"] == [str(DEMO_PROJECT)] and new["requests"] == 0
    assert new["state"] == "idle"
    # The pinned project answers at once on every child, the new one included.
    for _ in range(4):
        response = client.request(pool.address, ows(REQUEST="GetCapabilities"))
        assert response.status == 200


def test_a_pinned_project_that_fails_to_load_is_a_failed_start(pool_factory, workdir):
    config = qgis_config(workdir, projects={"pinned": [str(workdir / "missing.qgs")]},
                         pool={"max_failure_pressure": 1.0})
    pool = pool_factory(config, ready=False)
    assert pool.process.wait(120) == 3
    assert "child_start_failed" in pool.log()
