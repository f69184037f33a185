"""Admission: classes (from the query string or a small POST body), the project allow-list
and aliases, and what the child is sent."""

from __future__ import annotations

import structlog

from fcgipool.client import cgi_params
from fcgipool.protocol import RecordType, encode_begin_request, encode_params, encode_record


def test_default_classes_from_the_query_string(harness):
    h = harness()
    capabilities = h.get("/ows?SERVICE=WMS&REQUEST=GetCapabilities")
    tile = h.get("/ows?SERVICE=WMS&REQUEST=GetMap&LAYERS=a")
    other = h.get("/index.html")
    assert [capabilities.status, tile.status, other.status] == [200, 200, 200]
    classes = {klass for (_, klass) in h.pool.accounting.requests}
    assert classes == {"light", "heavy", "default"}


def test_a_post_is_classified_from_its_body(harness):
    h = harness()
    body = b'<?xml version="1.0"?><GetCapabilities service="WMS" version="1.3.0"/>'
    response = h.get("/ows", method="POST", body=body,
                     extra={"CONTENT_TYPE": "text/xml"})  # fmt: skip
    assert response.status == 200
    assert h.pool.accounting.requests == {(200, "light"): 1}
    (program,) = [p for p in h.programs() if p.served]
    assert program.received.count(body) == 1, "the body reached the child whole, once"


def test_a_project_outside_the_allowed_roots_is_refused_before_any_child(harness, tmp_path):
    root = tmp_path / "projects"
    root.mkdir()
    h = harness({"projects": {"allowed_roots": [str(root)]}})
    refused = h.get("/ows?MAP=/etc/passwd&REQUEST=GetCapabilities")
    sneaky = h.get(f"/ows?MAP={root}/../../etc/passwd&REQUEST=GetCapabilities")
    allowed = h.get(f"/ows?MAP={root}/a.qgs&REQUEST=GetCapabilities")
    assert [refused.status, sneaky.status, allowed.status] == [403, 403, 200]
    assert sum(len(p.served) for p in h.programs()) == 1


def test_by_default_a_request_may_not_name_another_project_than_the_web_servers(harness):
    h = harness()
    pinned = {"QGIS_PROJECT_FILE": "/srv/a/a.qgs"}
    with structlog.testing.capture_logs() as logged:
        other = h.get("/ows?MAP=/srv/b/secret.qgs&REQUEST=GetCapabilities", extra=pinned)
    same = h.get("/ows?MAP=/srv/a/a.qgs&REQUEST=GetCapabilities", extra=pinned)
    plain = h.get("/ows?REQUEST=GetCapabilities", extra=pinned)
    unpinned = h.get("/ows?MAP=/srv/b/secret.qgs&REQUEST=GetCapabilities")
    assert [other.status, same.status, plain.status, unpinned.status] == [403, 200, 200, 200]
    assert b"not served here" in other.body
    assert sum(len(p.served) for p in h.programs()) == 3
    assert [e["reason"] for e in logged if e["event"] == "project_refused"] == [
        "the web server set another project"]


def test_allow_map_override_lets_a_request_name_another_project(harness):
    h = harness({"projects": {"allow_map_override": True}})
    pinned = {"QGIS_PROJECT_FILE": "/srv/a/a.qgs"}
    assert h.get("/ows?MAP=/srv/b/b.qgs&REQUEST=GetMap", extra=pinned).status == 200


def test_only_project_files_may_be_named_by_default(harness):
    h = harness()
    with structlog.testing.capture_logs() as logged:
        statuses = [
            h.get(f"/ows?MAP={name}&REQUEST=GetCapabilities").status
            for name in ("/etc/passwd", "/srv/a/", "/srv/a/a.QGZ", "/srv/a/a.qgs",
                         "postgresql:?service=x&project=p")
        ]
    assert statuses == [403, 403, 200, 200, 403]
    assert sum(len(p.served) for p in h.programs()) == 2
    assert [e["reason"] for e in logged if e["event"] == "project_refused"] == [
        "not a project file"] * 3


def test_storage_schemes_let_a_request_name_a_project_in_a_database(harness, tmp_path):
    h = harness({"projects": {"storage_schemes": ["postgresql"], "allowed_roots": [str(tmp_path)]}})
    assert h.get("/ows?MAP=postgresql:?service=x%26project=p&REQUEST=GetMap").status == 200
    assert h.get("/ows?MAP=geopackage:/tmp/x.gpkg?projectName=p&REQUEST=GetMap").status == 403


def test_the_web_servers_project_needs_no_file_ending(harness):
    h = harness()
    assert h.get("/ows?REQUEST=GetMap", extra={"QGIS_PROJECT_FILE": "/srv/a/project"}).status == 200


def test_an_alias_is_rewritten_to_the_real_file(harness, tmp_path):
    h = harness({"projects": {"search_paths": {"/cadastre": str(tmp_path)}}})
    response = h.get("/ows?map=/cadastre/town.qgs&REQUEST=GetMap")
    assert response.status == 200
    (program,) = [p for p in h.programs() if p.served]
    (params,) = program.served
    assert params[b"QUERY_STRING"] == f"map={tmp_path}/town.qgs&REQUEST=GetMap".encode()
    assert params[b"REQUEST_URI"] == b"/ows?map=/cadastre/town.qgs&REQUEST=GetMap"


def test_affinity_sends_a_project_to_the_child_that_holds_it(harness):
    h = harness()
    for project in ("a", "b", "a", "b", "a"):
        assert h.get(f"/ows?MAP=/p/{project}.qgs&REQUEST=GetMap").status == 200
    served = {
        tuple(params[b"QUERY_STRING"].split(b"&")[0] for params in program.served)
        for program in h.programs()
    }
    assert served == {(b"MAP=/p/a.qgs",) * 3, (b"MAP=/p/b.qgs",) * 2}


def test_what_the_child_is_sent(harness):
    """BEGIN_REQUEST with FCGI_KEEP_CONN and id 1, the web server's PARAMS as they came, the
    body, the end of STDIN."""
    h = harness()
    web = h.connect()
    params = cgi_params("/x?a=1", "POST", b"hello")
    web.send(encode_begin_request(7, keep_conn=True) + encode_params(7, params)
             + encode_record(RecordType.STDIN, 7, b"hello") + encode_record(RecordType.STDIN, 7))
    h.until(lambda: 7 in web.responses and web.responses[7].end is not None)
    (program,) = [p for p in h.programs() if p.served]
    expected = (encode_begin_request(1, keep_conn=True) + encode_params(1, params)
                + encode_record(RecordType.STDIN, 1, b"hello") + encode_record(RecordType.STDIN, 1))
    assert program.received.endswith(expected)
