"""The operator docs against the running code: the metrics reference and the Grafana dashboard
against a live /metrics scrape, the status reference against a live `fcgipool status --json`,
every PromQL expression through promtool, and every relative link in the docs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, busy_request, fault_config, free_port, wait_for
from fcgipool import client

DOCS = REPO / "docs"
METRICS_MD = DOCS / "metrics.md"
STATUS_MD = DOCS / "status.md"
DASHBOARD = REPO / "deploy" / "grafana" / "fcgipool-dashboard.json"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRIC_NAME = re.compile(r"\bfcgipool_[a-z0-9_]+")

DASHBOARD_PANELS = {
    "Requests/s by status code",
    "Requests/s by class",
    "Latency p50 / p95 / p99",
    "Queue wait p95 by class",
    "Queue length vs limit",
    "Children by state",
    "Busy ratio",
    "Failure pressure vs limit",
    "Child restarts by reason",
    "Children RSS (sum and max)",
    "Connections",
    "Uptime",
}


# ---------------------------------------------------------------- helpers


def outside_code_fences(text: str) -> str:
    """``text`` with fenced code blocks blanked out (their lines kept empty)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else line)
    return "\n".join(lines)


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of the first Markdown table after ``heading`` (header and rule skipped)."""
    section = text.split(heading, 1)[1]
    rows, started = [], False
    for line in section.splitlines():
        if line.startswith("|"):
            started = True
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
        elif started:
            break
    assert len(rows) > 2, f"no table after {heading!r}"
    return rows[2:]


def backticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


class Scrape:
    """The metric families of a /metrics answer: name (as in # TYPE) → type, and the label
    names seen on each family's samples."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.labels: dict[str, set[str]] = {}
        for match in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
            self.types[match.group(1)] = match.group(2)
            self.labels[match.group(1)] = set()
        for match in re.finditer(r"^(fcgipool_\w+)(?:\{([^}]*)\})? ", text, re.MULTILINE):
            family = self.family(match.group(1))
            assert family is not None, f"sample {match.group(1)} has no # TYPE line"
            names = set(re.findall(r'(\w+)="', match.group(2) or "")) - {"le"}
            self.labels[family] |= names

    def family(self, name: str) -> str | None:
        """The family a series name belongs to: itself, a histogram's _bucket/_sum/_count, or
        a counter's name without its _total (older clients type counters that way)."""
        if name in self.types:
            return name
        for suffix in HISTOGRAM_SUFFIXES:
            base = name.removesuffix(suffix)
            if base != name and self.types.get(base) == "histogram":
                return base
        if self.types.get(name.removesuffix("_total")) == "counter":
            return name.removesuffix("_total")
        return None


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


@pytest.fixture
def scrape(pool_factory, workdir) -> Scrape:
    """/metrics of a live pool that has served requests of two classes, answered a 404 and
    replaced a crashed child, so that every labelled family has samples."""
    port = free_port()
    pool = pool_factory(fault_config(workdir, admin={"http": f"tcp:127.0.0.1:{port}"}))
    assert client.request(pool.address, "/?n=1").status == 200
    assert client.request(pool.address, "/ows?SERVICE=WMS&REQUEST=GetMap&MAP=/a.qgs").status == 200
    assert client.request(pool.address, "/?status=404").status == 404
    once = workdir / "crashed-once"
    assert client.request(pool.address, f"/?crash=before&once={once}").status == 200  # retried
    url = f"http://127.0.0.1:{port}/metrics"
    # Counted as crash, or as cancel_failed + killed when the lost connection is seen first.
    wait_for(
        lambda: "fcgipool_child_restarts_total{reason=" in http_get(url),
        10,
        "the crashed child in the restart counter",
    )
    return Scrape(http_get(url))


def documented_metrics() -> dict[str, tuple[str, set[str]]]:
    """name → (type, label names) from the table of docs/metrics.md."""
    documented = {}
    for cells in table_rows(METRICS_MD.read_text(), "## The metrics"):
        (name,) = backticked(cells[0])
        documented[name] = (cells[1], set(backticked(cells[2])))
    return documented


def promtool_check(exprs: list[str], tmp_path: Path) -> None:
    """Every expression parses: they become recording rules for `promtool check rules`."""
    assert shutil.which("promtool"), "promtool (Debian package prometheus) is not installed"
    rules = {
        "groups": [
            {
                "name": "docs",
                "rules": [
                    {"record": f"docs:expr{i}", "expr": expr} for i, expr in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def grafana_to_promql(expr: str) -> str:
    """A Grafana query as plain PromQL: interval macros become 5m, variables a regex."""
    expr = re.sub(r"\$__(rate_)?interval|\$\{__(rate_)?interval\}", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def dashboard_exprs(node: object) -> list[str]:
    """Every "expr" of the dashboard: panel targets and annotations."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                found.append(value)
            else:
                found += dashboard_exprs(value)
    elif isinstance(node, list):
        for item in node:
            found += dashboard_exprs(item)
    return found


# ---------------------------------------------------------------- (a) metrics.md


def test_metrics_reference_matches_a_live_scrape(scrape):
    documented = documented_metrics()
    exposed = {name for name in scrape.types if name.startswith("fcgipool_")}
    assert set(documented) - exposed == set(), "documented in docs/metrics.md, not exposed"
    assert exposed - set(documented) == set(), "exposed by /metrics, missing in docs/metrics.md"
    for name, (kind, labels) in documented.items():
        assert scrape.types[name] == kind, f"{name}: documented as {kind}"
        assert scrape.labels[name] == labels, (
            f"{name}: documented labels {sorted(labels)}, exposed {sorted(scrape.labels[name])}"
        )


def test_every_metric_named_in_metrics_md_exists(scrape):
    """PromQL examples and prose included: no typo, no metric that is gone."""
    names = set(METRIC_NAME.findall(METRICS_MD.read_text()))
    unknown = sorted(name for name in names if scrape.family(name) is None)
    assert unknown == [], f"docs/metrics.md names metrics /metrics does not expose: {unknown}"


def test_label_values_in_metrics_md_match_the_code(scrape):
    """The states and restart reasons listed are those the code knows."""
    from fcgipool.child import State

    rows = {cells[0]: cells[1] for cells in table_rows(METRICS_MD.read_text(), "### Label values")}
    states = {value for value in backticked(rows["`state`"])}
    assert states == {state.value for state in State if state is not State.DEAD}
    exposed_states = set(re.findall(r'^fcgipool_children\{state="(\w+)"\}', scrape.text, re.M))
    assert exposed_states == states
    reasons = set(backticked(rows["`reason`"]))
    source = "".join(path.read_text() for path in (REPO / "fcgipool").glob("*.py"))
    counted = set(re.findall(r'restart(?:s\[|ed\()"(\w+)"', source))
    for pair in re.findall(r'"(\w+)" if \w+\.stop_requested else "(\w+)"', source):
        counted |= set(pair)
    counted |= set(re.findall(r'exit_reason = "(\w+)"', source))
    counted |= set(re.findall(r'self\.recycle\(\w+, "(\w+)"\)', source))
    assert len(counted) >= 6, f"the restart reasons were not found in the code: {counted}"
    assert counted <= reasons, f"restart reasons missing in docs/metrics.md: {counted - reasons}"


# ---------------------------------------------------------------- (b) the Grafana dashboard


def test_grafana_dashboard_queries_exist_in_a_live_scrape(scrape):
    text = DASHBOARD.read_text()
    dashboard = json.loads(text)
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    (ds_input,) = [item for item in dashboard["__inputs"] if item["name"] == "DS_PROMETHEUS"]
    assert ds_input["type"] == "datasource" and ds_input["pluginId"] == "prometheus"
    panels = dashboard["panels"]
    titles = [panel["title"] for panel in panels]
    assert DASHBOARD_PANELS - set(titles) == set(), "panels missing from the dashboard"
    assert len(set(titles)) == len(titles), "two panels with one title"
    assert len({panel["id"] for panel in panels}) == len(panels), "duplicate panel ids"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert METRIC_NAME.search(target["expr"]), f"{panel['title']}: no fcgipool metric"
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, f"{panel['title']} is wider than the grid"
        area = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
    names = set(METRIC_NAME.findall(text))
    unknown = sorted(name for name in names if scrape.family(name) is None)
    assert unknown == [], f"the dashboard queries metrics /metrics does not expose: {unknown}"
    histograms = {name for name in names if scrape.family(name) != name}
    assert all(name.endswith(HISTOGRAM_SUFFIXES) for name in histograms), histograms


def test_promql_of_the_dashboard_and_the_docs_parses(tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [grafana_to_promql(expr) for expr in dashboard_exprs(dashboard)]
    assert len(exprs) >= len(DASHBOARD_PANELS)
    text = METRICS_MD.read_text()
    for block in code_blocks(text, "promql"):
        exprs += [expr.strip() for expr in re.split(r"\n\s*\n", block) if expr.strip()]
    promtool_check(exprs, tmp_path)
    (alerts,) = code_blocks(text, "yaml")
    path = tmp_path / "alerts.yml"
    path.write_text(alerts)
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- (c) status.md

TYPES = {
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "list of strings": lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
}


def status_fields(value: object, path: str = "") -> dict[str, list[object]]:
    """Every field path of a status document → its values (``children[]`` for list
    elements, ``<class>`` for the keys of pool.classes)."""
    fields: dict[str, list[object]] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            name = "<class>" if path == "pool.classes" else key
            child = f"{path}.{name}" if path else name
            fields.setdefault(child, []).append(item)
            for sub, values in status_fields(item, child).items():
                fields.setdefault(sub, []).extend(values)
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        for item in value:
            for sub, values in status_fields(item, f"{path}[]").items():
                fields.setdefault(sub, []).extend(values)
    return fields


def test_status_reference_matches_a_live_status_document(pool_factory, workdir):
    pool = pool_factory(fault_config(workdir))
    control = str(workdir / "pool.ctl")
    client.request(pool.address, "/ows?SERVICE=WMS&REQUEST=GetMap&MAP=/srv/a.qgs")
    sock = busy_request(pool, workdir, "/?sleep=5000&layer=x")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "fcgipool", "status", "--json", "--control", control],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        text = subprocess.run(
            [sys.executable, "-m", "fcgipool", "status", "--control", control],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    finally:
        sock.close()
    document = json.loads(result.stdout)
    assert document["version"] == 1
    assert any(row["request"] for row in document["children"]), "no busy child"
    live = status_fields(document)
    documented = {}
    for cells in table_rows(STATUS_MD.read_text(), "## Fields"):
        (name,) = backticked(cells[0])
        documented[name] = cells[1]
    assert set(live) - set(documented) == set(), "fields missing in docs/status.md"
    assert set(documented) - set(live) == set(), "documented fields not in the live document"
    for name, kind in documented.items():
        nullable = kind.endswith(" or null")
        check = TYPES[kind.removesuffix(" or null")]
        for value in live[name]:
            assert check(value) or (nullable and value is None), f"{name}: {value!r} is no {kind}"
    header = text.splitlines()[3]
    assert header.startswith("     PID STATE") and header in STATUS_MD.read_text(), (
        "the column header of `fcgipool status` in docs/status.md is not the CLI's"
    )


# ---------------------------------------------------------------- (d) links


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*\[\]]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    for line in outside_code_fences(path.read_text()).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            base = anchor = slug(match.group(1))
            number = 0
            while anchor in found:
                number += 1
                anchor = f"{base}-{number}"
            found.add(anchor)
    return found


DOC_FILES = [*sorted(DOCS.glob("*.md")), REPO / "README.md"]


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_existing_files(path):
    text = outside_code_fences(path.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading #{anchor} in {destination.name}")
    assert broken == [], f"{path.relative_to(REPO)}: broken links {broken}"


def test_readme_links_every_doc():
    links = set(re.findall(r"\]\((docs/[^)#\s]+)\)", (REPO / "README.md").read_text()))
    missing = {f"docs/{path.name}" for path in DOCS.glob("*.md")} - links
    assert missing == set(), f"README.md's documentation list lacks {sorted(missing)}"


# ---------------------------------------------------------------- the rest of the docs


def test_every_log_event_is_in_troubleshooting_md():
    source = "".join(path.read_text() for path in (REPO / "fcgipool").glob("*.py"))
    events = set(re.findall(r'(?:\.info|\.warning|\.error|\blevel)\(\s*"([a-z_]+)"', source))
    assert len(events) > 30, f"the log events were not found in the code: {events}"
    text = (DOCS / "troubleshooting.md").read_text()
    missing = sorted(event for event in events if f"`{event}`" not in text)
    assert missing == [], f"log events not in docs/troubleshooting.md: {missing}"


def test_quickstart_config_is_valid(tmp_path):
    from fcgipool import config

    (block,) = code_blocks((DOCS / "quickstart.md").read_text(), "toml")
    path = tmp_path / "maps.toml"
    path.write_text(block)
    cfg = config.build(path, environ={})  # the schema; the user exists only on the target
    assert cfg.pool.bind == ["unix:/run/fcgipool/maps.sock"] and cfg.child.user == "fcgipool"
    assert cfg.projects.pinned and cfg.admin.http
