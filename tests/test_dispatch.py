"""Classification and the picking order, on the real Dispatcher and Classifier with small
stand-ins for requests and children (the real ones need sockets; the integration tests in
test_qgis_dispatch.py run those)."""

from __future__ import annotations

import os
import time
from collections import OrderedDict

import pytest

from fcgipool import config
from fcgipool.classify import Classifier, ogc_from_body
from fcgipool.dispatch import Dispatcher


class FakeChild:
    def __init__(self, name: str) -> None:
        self.name = name
        self.projects: OrderedDict[str, None] = OrderedDict()
        self.stale: set[str] = set()
        self.request = None  # the one it serves (dispatch.py's holding reads it)

    def __repr__(self) -> str:
        return self.name


class FakeRequest:
    def __init__(self, klass: str, project: str = "", client: bytes = b"10.0.0.1") -> None:
        self.request_class = klass
        self.project = project
        self.params = {b"REMOTE_ADDR": client}
        self.uri = f"/{klass}"
        self.counted = False
        self.queued_at = 0.0
        self.kind = (project, klass, 0, "")
        self.cost = 0.0
        self.lane = 0
        self.long = False
        self.finished_by_child = False
        self.cold = False
        self.started = 0.0
        self.created = 0.0
        self.child: FakeChild | None = None
        self.answer: int | None = None

    def start(self, child: FakeChild) -> None:
        self.child = child

    def respond(self, status: int, body: bytes, headers=()) -> None:
        self.answer = status


def make(overrides: dict | None = None) -> tuple[Dispatcher, Classifier]:
    cfg = config.build(None, overrides or {}, {})
    classifier = Classifier(cfg)
    return Dispatcher(cfg, classifier.rules, time.monotonic), classifier


def classify(classifier: Classifier, query: str, **params: str) -> str:
    """The class as a request gets it: through the cache by query string, asked twice."""
    raw = {b"QUERY_STRING": query.encode(), **{k.encode(): v.encode() for k, v in params.items()}}
    first = classifier.of_query(raw)[1].name
    assert classifier.of_query(raw)[1].name == first
    assert classifier.classify(classifier.ogc(raw), raw).name == first
    return first


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("SERVICE=WMS&REQUEST=GetCapabilities", "light"),
        ("service=wms&request=getcapabilities", "light"),
        ("SERVICE=WMS&REQUEST=GetLegendGraphic&LAYER=x", "light"),
        ("SERVICE=WMS&REQUEST=GetFeatureInfo", "light"),
        ("SERVICE=WFS&REQUEST=DescribeFeatureType", "light"),
        ("SERVICE=WMS&REQUEST=GetMap&LAYERS=a", "heavy"),
        ("SERVICE=WMS&REQUEST=GetPrint", "heavy"),
        ("SERVICE=WFS&REQUEST=GetFeature", "heavy"),
        ("SERVICE=WCS&REQUEST=GetCoverage", "heavy"),
        ("SERVICE=WMTS&REQUEST=GetTile", "heavy"),
        ("SERVICE=WMS&REQUEST=GetMapX", "default"),  # the whole value must match
        ("", "default"),
        ("MAP=/a.qgs&REQUEST=GetMap%20", "default"),
    ],
)
def test_default_classes(query, expected):
    _, classifier = make()
    assert classify(classifier, query) == expected


def test_rules_on_fastcgi_params_and_first_match_wins():
    _, classifier = make({"classes": [
        {"name": "admin", "match": {"param:SCRIPT_NAME": "/admin/.*"}, "priority": 20},
        {"name": "posts", "match": {"param:REQUEST_METHOD": "POST", "SERVICE": "WFS"}},
        {"name": "light", "match": {"REQUEST": "GetCapabilities"}},
    ]})
    assert classify(classifier, "REQUEST=GetCapabilities", SCRIPT_NAME="/admin/x") == "admin"
    assert classify(classifier, "REQUEST=GetCapabilities", SCRIPT_NAME="/ows") == "light"
    assert classify(classifier, "SERVICE=WFS", REQUEST_METHOD="POST") == "posts"
    assert classify(classifier, "SERVICE=WFS", REQUEST_METHOD="GET") == "default"


def test_ogc_requests_in_post_bodies():
    wanted = ("SERVICE", "REQUEST", "MAP")
    form = ogc_from_body(b"service=WMS&request=GetMap&map=/x.qgs",
                         "application/x-www-form-urlencoded", wanted)
    assert form == {"SERVICE": "WMS", "REQUEST": "GetMap", "MAP": "/x.qgs"}
    xml = ogc_from_body(b'<?xml version="1.0"?>\n<!-- c --><wfs:GetFeature service="WFS" '
                        b'version="1.1.0" xmlns:wfs="http://www.opengis.net/wfs"/>',
                        "text/xml", wanted)
    assert xml == {"REQUEST": "GetFeature", "SERVICE": "WFS"}
    assert ogc_from_body(b"\x00\x01", "application/octet-stream", wanted) == {}


def test_projects_allowed_roots_and_search_paths(tmp_path):
    root = tmp_path / "projects"
    (root / "city").mkdir(parents=True)
    (root / "city" / "a.qgs").write_text("x")
    outside = tmp_path / "secret.qgs"
    outside.write_text("x")
    os.symlink(outside, root / "link.qgs")
    _, classifier = make({"projects": {"allowed_roots": [str(root)],
                                       "search_paths": {"/maps": str(root / "city")}}})
    assert classifier.check(str(root / "city" / "a.qgs")).allowed
    assert not classifier.check(str(outside)).allowed
    assert not classifier.check(str(root / "city" / ".." / ".." / "secret.qgs")).allowed
    assert not classifier.check(str(root / "link.qgs")).allowed  # a symlink out of the root
    mapped = classifier.check("/maps/a.qgs")
    assert mapped.allowed and mapped.path == str(root / "city" / "a.qgs")
    params = {b"QUERY_STRING": b"SERVICE=WMS&map=/maps/a.qgs&REQUEST=GetMap"}
    ogc = classifier.ogc(params)
    assert classifier.project(ogc, params) == ("/maps/a.qgs", True)
    rewritten = classifier.rewrite(params, ogc, mapped.path)
    assert rewritten[b"QUERY_STRING"] == (
        b"SERVICE=WMS&map=" + str(root / "city" / "a.qgs").encode() + b"&REQUEST=GetMap")
    by_param = {b"QGIS_PROJECT_FILE": b"/maps/a.qgs"}
    assert classifier.project(classifier.ogc(by_param), by_param) == ("/maps/a.qgs", False)


def test_light_goes_before_heavy_when_a_child_frees_up():
    dispatcher, _ = make({"pool": {"workers": 1}})
    heavy = [FakeRequest("heavy") for _ in range(3)]
    light = FakeRequest("light")
    for request in heavy:
        dispatcher.submit(request)
    dispatcher.submit(light)
    child = FakeChild("c1")
    dispatcher.child_idle(child)
    assert light.child is child and all(r.child is None for r in heavy)
    dispatcher.released(light)
    dispatcher.child_idle(child)
    assert heavy[0].child is child  # then FIFO within the class


def test_reserved_children_are_never_taken_by_other_classes():
    dispatcher, _ = make({"pool": {"workers": 3}, "classes": [
        {"name": "light", "match": {"REQUEST": "GetCapabilities"}, "priority": 10,
         "reserved": 1},
        {"name": "heavy", "match": {"REQUEST": "GetMap"}}]})
    children = [FakeChild(f"c{i}") for i in range(3)]
    for child in children:
        dispatcher.child_idle(child)
    heavy = [FakeRequest("heavy") for _ in range(5)]
    for request in heavy:
        dispatcher.submit(request)
    assert sum(r.child is not None for r in heavy) == 2  # the third child stays free
    light = FakeRequest("light")
    dispatcher.submit(light)
    assert light.child is not None
    # With light using its reserved child, a freed child may go to heavy again.
    dispatcher.released(heavy[0])
    dispatcher.child_idle(heavy[0].child)
    assert heavy[2].child is heavy[0].child


def test_max_children_per_class_and_queue_bound():
    dispatcher, _ = make({"pool": {"workers": 4}, "classes": [
        {"name": "heavy", "match": {"REQUEST": "GetMap"}, "max_children": 1,
         "max_waiting": 1}]})
    for i in range(4):
        dispatcher.child_idle(FakeChild(f"c{i}"))
    first, second, third = FakeRequest("heavy"), FakeRequest("heavy"), FakeRequest("heavy")
    for request in (first, second, third):
        dispatcher.submit(request)
    assert first.child is not None and second.child is None
    assert third.answer == 503  # its class's queue is full though children are idle
    other = FakeRequest("default")
    dispatcher.submit(other)
    assert other.child is not None
    dispatcher.released(first)
    assert second.child is not None  # the class limit freed, an idle child was waiting


def test_per_client_limit_lets_other_clients_pass():
    dispatcher, _ = make({"pool": {"workers": 3}, "limits": {"max_per_client": 1}})
    busy = FakeChild("busy")
    dispatcher.child_idle(busy)
    a1 = FakeRequest("default", client=b"A")
    dispatcher.submit(a1)
    a2 = FakeRequest("default", client=b"A")
    b1 = FakeRequest("default", client=b"B")
    dispatcher.submit(a2)
    dispatcher.submit(b1)
    assert a1.child is busy and a2.child is None and b1.child is None
    dispatcher.child_idle(FakeChild("c2"))
    assert b1.child is not None and a2.child is None  # A is at its limit
    dispatcher.child_idle(FakeChild("c3"))
    assert a2.child is None
    dispatcher.released(a1)
    assert a2.child is not None


def test_affinity_prefers_the_child_that_served_the_project():
    dispatcher, _ = make({"projects": {"memory": 2}})
    one, two = FakeChild("one"), FakeChild("two")
    one.projects["/p/a.qgs"] = None
    two.projects["/p/b.qgs"] = None
    for child in (one, two):
        dispatcher.child_idle(child)
    request = FakeRequest("default", "/p/a.qgs")
    dispatcher.submit(request)
    assert request.child is one
    dispatcher.child_idle(one)
    request = FakeRequest("default", "/p/b.qgs")
    dispatcher.submit(request)
    assert request.child is two


def test_affinity_evicts_the_least_valuable_cache_and_bounds_memory():
    dispatcher, _ = make({"projects": {"memory": 2}})
    popular, rare = FakeChild("popular"), FakeChild("rare")
    for _ in range(5):
        dispatcher.projects.requested("/hot.qgs")
    popular.projects["/hot.qgs"] = None
    rare.projects["/cold.qgs"] = None
    dispatcher.child_idle(rare)
    dispatcher.child_idle(popular)  # the warmest, but its cache is worth more
    request = FakeRequest("default", "/new.qgs")
    dispatcher.submit(request)
    assert request.child is rare
    assert list(rare.projects) == ["/cold.qgs", "/new.qgs"]
    dispatcher.child_idle(rare)
    for name in ("/x.qgs", "/y.qgs"):
        request = FakeRequest("default", name)
        dispatcher.submit(request)
        dispatcher.child_idle(request.child)
    assert len(rare.projects) <= 2 and len(popular.projects) <= 2


def test_without_projects_the_warmest_child_is_used():
    dispatcher, _ = make()
    first, last = FakeChild("first"), FakeChild("last")
    dispatcher.child_idle(first)
    dispatcher.child_idle(last)
    request = FakeRequest("default")
    dispatcher.submit(request)
    assert request.child is last


def test_bad_class_config_names_the_key():
    with pytest.raises(config.ConfigError) as error:
        config.build(None, {"classes": [{"name": "Bad Name"}]}, {})
    assert error.value.problems[0].startswith("classes.0.name:")
    with pytest.raises(config.ConfigError) as error:
        config.build(None, {"classes": [{"name": "a"}, {"name": "a"}]}, {})
    assert "duplicate class names ['a']" in error.value.problems[0]


def test_at_saturation_a_freed_child_takes_a_waiting_request_for_its_project():
    import time
    dispatcher, _ = make({"projects": {"memory": 2}})
    child = FakeChild("c")
    child.projects["/p/b.qgs"] = None
    a = FakeRequest("default", "/p/a.qgs")
    b = FakeRequest("default", "/p/b.qgs")
    dispatcher.submit(a)
    dispatcher.submit(b)
    a.queued_at = b.queued_at = time.monotonic()
    dispatcher.child_idle(child)
    assert b.child is child and a.child is None  # b jumps the queue: its project is warm
    dispatcher.released(b)
    a.queued_at = time.monotonic() - 10  # a head that waited long is never passed over
    c = FakeRequest("default", "/p/b.qgs")
    dispatcher.submit(c)
    dispatcher.child_idle(child)
    assert a.child is child and c.child is None


def test_a_child_stale_for_a_project_gets_its_requests_only_when_no_other_is_idle():
    dispatcher, _ = make()
    stale, other = FakeChild("stale"), FakeChild("other")
    stale.stale.add("/p/a.qgs")  # its file changed since it loaded it
    other.projects["/p/b.qgs"] = None
    dispatcher.child_idle(other)
    dispatcher.child_idle(stale)  # the warmest, and it holds nothing the others want
    request = FakeRequest("default", "/p/a.qgs")
    dispatcher.submit(request)
    assert request.child is other
    alone = FakeRequest("default", "/p/a.qgs")
    dispatcher.submit(alone)
    assert alone.child is stale and "/p/a.qgs" not in stale.stale  # it loads the new one
