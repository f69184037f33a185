#!/usr/bin/python3
"""Generate the fcgipool demo QGIS projects and their data.

Two projects are written next to this script, in ``project/``:

``demo.qgs``
    A small, pretty town (synthetic, around Białowieża, the name of QGIS 3.22):
    37 districts (graduated fill on population density, labelled), a river,
    roads (categorized, cased lines) and 200 sites (categorized markers).
    Data: GeoJSON text files in ``project/data/`` (well under 1 MB in total).
    WMS capabilities are enabled, every layer is queryable (GetFeatureInfo),
    districts and sites are published through WFS.

``heavy.qgs``
    One layer of 50,000 points, categorized, each a halo plus a data-defined core:
    a GetMap of the full extent costs 0.5-0.7 s of CPU (vs ~60 ms for demo.qgs).
    Its data file ``project/data/heavy_points.geojson`` is 5.8 MB, so it is *not*
    committed (see demo/.gitignore): it is generated at install time (``demo/run.sh``
    does it) by::

        python3 demo/make_project.py --heavy-only [--out DIR]

    which needs nothing but the Python standard library (no PyQGIS), takes ~1 s and
    writes the same bytes every time.

Everything is deterministic: the same script writes byte-identical files
(random numbers come from seeded generators; the .qgs files get fixed layer ids
and no save date).

Usage (PyQGIS is only available to Debian's interpreter, not to another Python)::

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 demo/make_project.py   # everything
    python3 demo/make_project.py --data-only    # all GeoJSON files, no .qgs
    python3 demo/make_project.py --heavy-only   # data/heavy_points.geojson only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "project"

# Centre of the synthetic town: Białowieża, Poland (lon, lat).
LON0, LAT0 = 23.8480, 52.7000
M_PER_DEG_LAT = 110_574.0
M_PER_DEG_LON = 111_320.0 * math.cos(math.radians(LAT0))

HEX_R = 900.0  # circumradius of a district hexagon, metres
HEX_RINGS = 3  # 1 + 3 + 6 + ... = 37 districts

HEAVY_POINTS = 50_000


# --------------------------------------------------------------------------- geometry helpers


def lonlat(x: float, y: float) -> list[float]:
    """Local metres east/north of the centre -> [lon, lat] rounded to ~0.1 m."""
    return [round(LON0 + x / M_PER_DEG_LON, 6), round(LAT0 + y / M_PER_DEG_LAT, 6)]


def h01(*key: object) -> float:
    """A deterministic pseudo-random number in [0, 1) from any key (no PYTHONHASHSEED)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def ring_area(pts: list[tuple[float, float]]) -> float:
    return 0.5 * abs(
        sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1], strict=True))
    )


def feature(props: dict, geom_type: str, coords: object) -> dict:
    return {
        "type": "Feature",
        "properties": props,
        "geometry": {"type": geom_type, "coordinates": coords},
    }


def write_geojson(path: Path, name: str, features: list[dict]) -> None:
    """Compact, one feature per line (diff-friendly), RFC 7946 (WGS 84, no crs member)."""
    lines = [json.dumps(f, separators=(",", ":"), ensure_ascii=False) for f in features]
    body = ",\n".join(lines)
    text = f'{{"type":"FeatureCollection","name":{json.dumps(name)},"features":[\n{body}\n]}}\n'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- demo data

SYL_A = [
    "Biał",
    "Bor",
    "Dęb",
    "Gród",
    "Klen",
    "Lip",
    "Mok",
    "Olch",
    "Pog",
    "Sos",
    "Stocz",
    "Wierz",
    "Zubr",
]
SYL_B = ["owo", "ki", "nica", "owice", "ówka", "isko", "any", "ek", "ina", "ew"]


def district_names(n: int) -> list[str]:
    rng = random.Random(3857)
    names: list[str] = []
    while len(names) < n:
        name = rng.choice(SYL_A) + rng.choice(SYL_B)
        if name not in names:
            names.append(name)
    return names


def hex_cells() -> list[tuple[int, int]]:
    cells = []
    for q in range(-HEX_RINGS, HEX_RINGS + 1):
        for r in range(-HEX_RINGS, HEX_RINGS + 1):
            if abs(q) <= HEX_RINGS and abs(r) <= HEX_RINGS and abs(q + r) <= HEX_RINGS:
                cells.append((q, r))
    return cells


def hex_center(q: int, r: int) -> tuple[float, float]:
    # pointy-top axial coordinates
    return HEX_R * math.sqrt(3) * (q + r / 2), HEX_R * 1.5 * r


def jittered_vertex(x: float, y: float) -> tuple[float, float]:
    key = (round(x), round(y))  # shared by the (up to) three hexagons that meet here
    a = 2 * math.pi * h01("v", key)
    d = 0.17 * HEX_R * h01("d", key)
    return x + d * math.cos(a), y + d * math.sin(a)


def edge_points(a: tuple[float, float], b: tuple[float, float]) -> list[tuple[float, float]]:
    """Two wobbly points between a and b, identical for both neighbours of the edge."""
    flip = a > b
    p, q = (b, a) if flip else (a, b)
    dx, dy = q[0] - p[0], q[1] - p[1]
    length = math.hypot(dx, dy)
    nx, ny = -dy / length, dx / length
    key = (round(p[0]), round(p[1]), round(q[0]), round(q[1]))
    out = []
    for i, t in enumerate((1 / 3, 2 / 3)):
        off = (h01("e", key, i) - 0.5) * 0.22 * length
        out.append((p[0] + dx * t + nx * off, p[1] + dy * t + ny * off))
    return out[::-1] if flip else out


def make_districts() -> list[dict]:
    cells = hex_cells()
    names = district_names(len(cells))
    rng = random.Random(4326)
    feats = []
    for i, (q, r) in enumerate(cells):
        cx, cy = hex_center(q, r)
        corners = []
        for k in range(6):
            ang = math.radians(60 * k - 30)
            corners.append(jittered_vertex(cx + HEX_R * math.cos(ang), cy + HEX_R * math.sin(ang)))
        ring: list[tuple[float, float]] = []
        for k in range(6):
            a, b = corners[k], corners[(k + 1) % 6]
            ring.append(a)
            ring.extend(edge_points(a, b))
        area_km2 = ring_area(ring) / 1e6
        dist = math.hypot(cx, cy) / (HEX_R * 1.5 * HEX_RINGS)  # 0 centre .. ~1.15 edge
        density = 9000 * math.exp(-2.2 * dist) * (0.75 + 0.5 * rng.random())
        pop = int(round(density * area_km2, -1))
        coords = [lonlat(x, y) for x, y in ring]
        coords.append(coords[0])
        feats.append(
            feature(
                {
                    "id": i + 1,
                    "name": names[i],
                    "population": pop,
                    "area_km2": round(area_km2, 3),
                    "density": round(pop / area_km2),
                },
                "Polygon",
                [coords],
            )
        )
    return feats


def river_centerline() -> list[tuple[float, float]]:
    pts = []
    x = -6600.0
    while x <= 6600.0:
        y = -1350 + 520 * math.sin(x / 1700) + 260 * math.sin(x / 610 + 1.3)
        pts.append((x, y))
        x += 150.0
    return pts


def make_water() -> list[dict]:
    line = river_centerline()
    left, right = [], []
    for i, (x, y) in enumerate(line):
        x0, y0 = line[max(i - 1, 0)]
        x1, y1 = line[min(i + 1, len(line) - 1)]
        dx, dy = x1 - x0, y1 - y0
        n = math.hypot(dx, dy)
        nx, ny = -dy / n, dx / n
        w = 70 + 40 * math.sin(x / 900) ** 2
        left.append((x + nx * w, y + ny * w))
        right.append((x - nx * w, y - ny * w))
    river = [lonlat(x, y) for x, y in left + right[::-1]]
    river.append(river[0])
    # a pond in a park north-east of the centre
    pond = []
    for k in range(36):
        a = 2 * math.pi * k / 36
        rr = 330 + 60 * math.sin(3 * a) + 25 * math.cos(5 * a)
        pond.append(lonlat(1900 + rr * math.cos(a) * 1.4, 1500 + rr * math.sin(a)))
    pond.append(pond[0])
    return [
        feature({"id": 1, "name": "Narewka", "kind": "river"}, "Polygon", [river]),
        feature({"id": 2, "name": "Zubrowy Staw", "kind": "pond"}, "Polygon", [pond]),
    ]


def make_roads() -> list[dict]:
    rng = random.Random(900913)
    feats = []
    n = 0

    def add(name: str, cls: str, speed: int, pts: list[tuple[float, float]]) -> None:
        nonlocal n
        n += 1
        feats.append(
            feature(
                {"id": n, "name": name, "class": cls, "maxspeed": speed},
                "LineString",
                [lonlat(x, y) for x, y in pts],
            )
        )

    # ring road
    ring = []
    for k in range(73):
        a = 2 * math.pi * (k % 72) / 72
        rr = 2900 + 180 * math.sin(3 * a + 0.4)
        ring.append((rr * 1.15 * math.cos(a), rr * 0.92 * math.sin(a)))
    add("Obwodnica", "primary", 70, ring)
    # radial avenues, wiggling outwards
    for k, name in enumerate(
        ["Hajnowska", "Parkowa", "Wojska Polskiego", "Kolejowa", "Leśna", "Polna"]
    ):
        a = 2 * math.pi * k / 6 + 0.35
        pts = []
        for s in range(0, 29):
            d = 220.0 * s
            wob = 180 * math.sin(d / 800 + k) * min(1.0, d / 1500)
            pts.append((d * math.cos(a) - wob * math.sin(a), d * math.sin(a) + wob * math.cos(a)))
        add(f"ul. {name}", "primary", 50, pts)
    # local streets: short random walks
    streets = [
        "Brzozowa",
        "Cicha",
        "Dębowa",
        "Krótka",
        "Łąkowa",
        "Mostowa",
        "Ogrodowa",
        "Piaskowa",
        "Różana",
        "Sosnowa",
        "Szkolna",
        "Wąska",
        "Wiejska",
        "Zielona",
    ]
    for name in streets:
        x, y = rng.uniform(-4500, 4500), rng.uniform(-3600, 3600)
        heading = rng.uniform(0, 2 * math.pi)
        pts = [(x, y)]
        for _ in range(rng.randint(8, 16)):
            heading += rng.gauss(0, 0.25)
            x += 160 * math.cos(heading)
            y += 160 * math.sin(heading)
            pts.append((x, y))
        add(f"ul. {name}", "secondary", 30, pts)
    return feats


SITE_KINDS = [("school", 0.18), ("museum", 0.10), ("park", 0.17), ("cafe", 0.35), ("station", 0.20)]


def make_sites(n: int = 200) -> list[dict]:
    rng = random.Random(27700)
    kinds = [k for k, _ in SITE_KINDS]
    weights = [w for _, w in SITE_KINDS]
    limit = HEX_R * 1.5 * HEX_RINGS + HEX_R * 0.4
    feats = []
    counters: dict[str, int] = {}
    while len(feats) < n:
        x, y = rng.gauss(0, 2300), rng.gauss(0, 2000)
        if math.hypot(x, y) > limit:
            continue
        kind = rng.choices(kinds, weights)[0]
        counters[kind] = counters.get(kind, 0) + 1
        feats.append(
            feature(
                {
                    "id": len(feats) + 1,
                    "name": f"{kind.capitalize()} {counters[kind]}",
                    "kind": kind,
                    "visitors": int(rng.lognormvariate(6, 0.9)),
                    "opened": rng.randint(1890, 2023),
                },
                "Point",
                lonlat(x, y),
            )
        )
    return feats


def make_heavy_points(n: int = HEAVY_POINTS) -> list[dict]:
    """Clustered points over ~80 x 60 km around the town: 80 % in 60 clusters, 20 % scattered."""
    rng = random.Random(50_000)
    centres = [
        (rng.uniform(-36000, 36000), rng.uniform(-26000, 26000), rng.uniform(600, 4000))
        for _ in range(60)
    ]
    feats = []
    for i in range(n):
        if rng.random() < 0.8:
            cx, cy, s = rng.choice(centres)
            x, y = rng.gauss(cx, s), rng.gauss(cy, s)
        else:
            x, y = rng.uniform(-40000, 40000), rng.uniform(-30000, 30000)
        feats.append(feature({"id": i + 1, "k": rng.randrange(5)}, "Point", lonlat(x, y)))
    return feats


def write_data(out: Path) -> None:
    """The small, committed data of demo.qgs."""
    data = out / "data"
    write_geojson(data / "districts.geojson", "districts", make_districts())
    write_geojson(data / "water.geojson", "water", make_water())
    write_geojson(data / "roads.geojson", "roads", make_roads())
    write_geojson(data / "sites.geojson", "sites", make_sites())


def write_heavy_data(out: Path) -> Path:
    """The ~5.8 MB data of heavy.qgs: not committed, written at install time."""
    path = out / "data" / "heavy_points.geojson"
    write_geojson(path, "heavy_points", make_heavy_points())
    return path


# --------------------------------------------------------------------------- QGIS projects


def build_projects(out: Path) -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ["QT_HASH_SEED"] = "0"  # fixed XML attribute order (Qt randomises QHash per process)
    from qgis.core import (  # PyQGIS only when really needed
        QgsApplication,
        QgsCategorizedSymbolRenderer,
        QgsCoordinateReferenceSystem,
        QgsCoordinateTransform,
        QgsFillSymbol,
        QgsGraduatedSymbolRenderer,
        QgsLineSymbol,
        QgsMarkerSymbol,
        QgsPalLayerSettings,
        QgsProject,
        QgsProperty,
        QgsRectangle,
        QgsRendererCategory,
        QgsRendererRange,
        QgsSymbolLayer,
        QgsTextBufferSettings,
        QgsTextFormat,
        QgsVectorLayer,
        QgsVectorLayerSimpleLabeling,
    )
    from qgis.PyQt.QtGui import QColor, QFont

    app = QgsApplication([], False)
    app.setPrefixPath("/usr", True)
    app.initQgis()

    crs3857 = QgsCoordinateReferenceSystem("EPSG:3857")
    crs4326 = QgsCoordinateReferenceSystem("EPSG:4326")

    def load(project, name: str, title: str, abstract: str) -> QgsVectorLayer:
        # A path relative to the project: the .qgs is saved with relative paths ("./data/...").
        layer = QgsVectorLayer(str(out / "data" / f"{name}.geojson"), name, "ogr")
        if not layer.isValid():
            raise SystemExit(f"cannot load {name}.geojson")
        layer.setShortName(name)  # the WMS/WFS layer name
        layer.setTitle(title)
        layer.setAbstract(abstract)
        layer.setFlags(layer.flags() | layer.Identifiable | layer.Searchable)
        project.addMapLayer(layer)
        return layer

    def text_format(size: float, color: str, buffer: float) -> QgsTextFormat:
        fmt = QgsTextFormat()
        fmt.setFont(QFont("DejaVu Sans"))
        fmt.setSize(size)
        fmt.setColor(QColor(color))
        buf = QgsTextBufferSettings()
        buf.setEnabled(True)
        buf.setSize(buffer)
        buf.setColor(QColor(255, 255, 255, 220))
        fmt.setBuffer(buf)
        return fmt

    def marker(color: str, shape: str, size: float) -> QgsMarkerSymbol:
        return QgsMarkerSymbol.createSimple(
            {
                "name": shape,
                "color": color,
                "size": str(size),
                "outline_color": "255,255,255,255",
                "outline_width": "0.35",
            }
        )

    def wms_settings(
        project, root: str, title: str, abstract: str, layers: list, wfs: list
    ) -> QgsRectangle:
        extent = QgsRectangle()
        xform = QgsCoordinateTransform(crs4326, crs3857, project)
        for layer in layers:
            extent.combineExtentWith(xform.transformBoundingBox(layer.extent()))
        extent.grow(max(extent.width(), extent.height()) * 0.03)
        project.setCrs(crs3857)
        project.setTitle(title)
        project.writeEntry("WMSServiceCapabilities", "/", True)
        project.writeEntry("WMSServiceTitle", "/", title)
        project.writeEntry("WMSServiceAbstract", "/", abstract)
        project.writeEntry("WMSKeywordList", "/", ["fcgipool", "QGIS Server", "demo"])
        project.writeEntry("WMSContactOrganization", "/", "fcgipool demo")
        project.writeEntry("WMSFees", "/", "none")
        project.writeEntry("WMSAccessConstraints", "/", "none")
        project.writeEntry("WMSRootName", "/", root)  # LAYERS=<root> draws them all
        project.writeEntry(
            "WMSExtent",
            "/",
            [
                f"{v:.1f}"
                for v in (
                    extent.xMinimum(),
                    extent.yMinimum(),
                    extent.xMaximum(),
                    extent.yMaximum(),
                )
            ],
        )
        project.writeEntry(
            "WMSCrsList", "/", ["EPSG:3857", "EPSG:4326", "EPSG:2180", "EPSG:900913"]
        )
        project.writeEntry("WMSAddWktGeometry", "/", True)
        project.writeEntry("WMSFeatureInfoUseAttributeFormSettings", "/", False)
        project.writeEntry("WMSPrecision", "/", "6")
        project.writeEntry("WMSMaxWidth", "/", "4096")
        project.writeEntry("WMSMaxHeight", "/", "4096")
        project.writeEntry("WFSLayers", "/", [lyr.id() for lyr in wfs])
        for lyr in wfs:
            project.writeEntry("WFSLayersPrecision", "/" + lyr.id(), 6)
        return extent

    def save(project, path: Path, ids: dict[str, str]) -> None:
        project.writeEntry("Paths", "/Absolute", False)
        if not project.write(str(path)):
            raise SystemExit(f"cannot write {path}")
        text = path.read_text(encoding="utf-8")
        for old, new in ids.items():  # fixed layer ids instead of name_<uuid>
            assert len(new) > 10  # QgsMapLayer::readLayerXml ignores ids of 10 characters or less
            text = text.replace(old, new)
        text = re.sub(r"Annotations_[0-9a-f_]{36}", "Annotations", text)
        text = re.sub(  # snapping settings come out of a QHash keyed by pointer: sort them
            r"(<individual-layer-settings>\n)(.*?)(\s*</individual-layer-settings>)",
            lambda m: m[1] + "\n".join(sorted(m[2].split("\n"))) + m[3],
            text,
            flags=re.S,
        )
        text = re.sub(r' saveDateTime="[^"]*"', "", text)
        text = re.sub(r' saveUser(Full)?="[^"]*"', "", text)
        text = re.sub(r"<creation>[^<]*</creation>", "<creation></creation>", text)
        path.write_text(text, encoding="utf-8")
        Path(str(path) + "~").unlink(missing_ok=True)  # QgsProject.write() keeps a backup

    # ------------------------------------------------------------------ demo.qgs
    prj = QgsProject()
    districts = load(
        prj,
        "districts",
        "Districts",
        "37 synthetic districts, coloured by population density (inhabitants/km²).",
    )
    water = load(prj, "water", "Water", "A river and a pond.")
    roads = load(prj, "roads", "Roads", "Ring road, avenues and local streets.")
    sites = load(
        prj, "sites", "Sites", "200 points of interest: schools, museums, parks, cafés, stations."
    )

    ramp = ["#fff7ec", "#fee0b6", "#fdbb84", "#f08a5d", "#d7553c"]
    breaks = [0, 1500, 3000, 4500, 6500, 100000]
    ranges = []
    for i, color in enumerate(ramp):
        sym = QgsFillSymbol.createSimple(
            {
                "color": color,
                "outline_color": "#8c6d5a",
                "outline_width": "0.3",
                "outline_style": "solid",
            }
        )
        lo, hi = breaks[i], breaks[i + 1]
        label = f"{lo:,} - {hi:,} /km²" if i < len(ramp) - 1 else f"> {lo:,} /km²"
        ranges.append(QgsRendererRange(lo, hi, sym, label))
    districts.setRenderer(QgsGraduatedSymbolRenderer("density", ranges))
    pal = QgsPalLayerSettings()
    pal.fieldName = "name"
    pal.setFormat(text_format(8.5, "#5a3a2a", 0.8))
    districts.setLabeling(QgsVectorLayerSimpleLabeling(pal))
    districts.setLabelsEnabled(True)

    water.setRenderer(
        QgsCategorizedSymbolRenderer(
            "kind",
            [
                QgsRendererCategory(
                    k,
                    QgsFillSymbol.createSimple(
                        {"color": "#9ecae1", "outline_color": "#5b9bc8", "outline_width": "0.35"}
                    ),
                    k.title(),
                )
                for k in ("river", "pond")
            ],
        )
    )

    def road(
        casing: str, casing_w: float, fill: str, fill_w: float, passes: tuple[int, int]
    ) -> QgsLineSymbol:
        sym = QgsLineSymbol.createSimple(
            {
                "line_color": casing,
                "line_width": str(casing_w),
                "capstyle": "round",
                "joinstyle": "round",
            }
        )
        top = QgsLineSymbol.createSimple(
            {
                "line_color": fill,
                "line_width": str(fill_w),
                "capstyle": "round",
                "joinstyle": "round",
            }
        )
        sym.appendSymbolLayer(top.symbolLayer(0).clone())
        # symbol levels: all casings are drawn below all fills, so junctions look clean
        sym.symbolLayer(0).setRenderingPass(passes[0])
        sym.symbolLayer(1).setRenderingPass(passes[1])
        return sym

    road_cats = [
        QgsRendererCategory(
            "primary", road("#6b4b3e", 1.5, "#ffd37a", 1.0, (1, 3)), "Primary road"
        ),
        QgsRendererCategory("secondary", road("#9a8578", 0.9, "#ffffff", 0.55, (0, 2)), "Street"),
    ]
    road_renderer = QgsCategorizedSymbolRenderer("class", road_cats)
    road_renderer.setUsingSymbolLevels(True)
    roads.setRenderer(road_renderer)

    site_style = {
        "school": ("#e41a1c", "square", 2.6),
        "museum": ("#984ea3", "diamond", 3.0),
        "park": ("#4daf4a", "circle", 2.6),
        "cafe": ("#ff7f00", "circle", 2.0),
        "station": ("#377eb8", "triangle", 3.0),
    }
    sites.setRenderer(
        QgsCategorizedSymbolRenderer(
            "kind",
            [QgsRendererCategory(k, marker(*site_style[k]), k.title()) for k, _ in SITE_KINDS],
        )
    )

    root = prj.layerTreeRoot()  # top of the list is drawn last
    for order, lyr in enumerate([sites, roads, water, districts]):
        node = root.findLayer(lyr.id())
        clone = node.clone()
        root.insertChildNode(order, clone)
        root.removeChildNode(node)
    wms_settings(
        prj,
        "demo",
        "fcgipool demo",
        "A small synthetic town served by QGIS Server behind fcgipool.",
        [districts, water, roads, sites],
        [districts, sites],
    )
    ids = {lyr.id(): f"layer_{lyr.name()}" for lyr in (districts, water, roads, sites)}
    save(prj, out / "demo.qgs", ids)

    # ------------------------------------------------------------------ heavy.qgs
    heavy_prj = QgsProject()
    heavy = load(
        heavy_prj,
        "heavy_points",
        "Heavy points",
        f"{HEAVY_POINTS:,} clustered points with a categorized marker: an expensive GetMap.",
    )
    palette = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e"]

    def heavy_symbol(color: str) -> QgsMarkerSymbol:
        # A soft halo below a data-defined core: two symbol layers and one expression per
        # feature, as real styles have -- this is what makes the GetMap cost ~0.5 s.
        sym = QgsMarkerSymbol.createSimple(
            {
                "name": "circle",
                "color": "{},{},{},64".format(*QColor(color).getRgb()[:3]),
                "size": "3.0",
                "outline_style": "no",
            }
        )
        core_symbol = QgsMarkerSymbol.createSimple(
            {
                "name": "circle",
                "color": color,
                "size": "1.4",
                "outline_color": "#333333",
                "outline_width": "0.2",
            }
        )
        core = core_symbol.symbolLayer(0).clone()  # keep core_symbol alive: sip segfaults else
        core.setDataDefinedProperty(
            QgsSymbolLayer.PropertySize, QgsProperty.fromExpression('1.0 + ("id" % 5) * 0.2')
        )
        sym.appendSymbolLayer(core)
        return sym

    heavy.setRenderer(
        QgsCategorizedSymbolRenderer(
            "k",
            [QgsRendererCategory(i, heavy_symbol(c), f"class {i}") for i, c in enumerate(palette)],
        )
    )
    wms_settings(
        heavy_prj,
        "heavy",
        "fcgipool heavy",
        "50,000 points: a GetMap of the whole extent is deliberately expensive.",
        [heavy],
        [heavy],
    )
    save(heavy_prj, out / "heavy.qgs", {heavy.id(): "layer_heavy_points"})

    # QgsApplication.exitQgis() crashes on exit in some 3.22 builds; nothing to clean up here.
    del prj, heavy_prj


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)"
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument(
        "--heavy-only",
        action="store_true",
        help="only write data/heavy_points.geojson (standard library only, no PyQGIS): "
        "the install step, run by demo/run.sh",
    )
    mode.add_argument(
        "--data-only",
        action="store_true",
        help="write all GeoJSON files but no .qgs (standard library only, no PyQGIS)",
    )
    args = ap.parse_args(argv)
    out = args.out.resolve()
    written = [write_heavy_data(out)]
    if not args.heavy_only:
        write_data(out)
        written += sorted((out / "data").glob("*.geojson"))
    if not (args.heavy_only or args.data_only):
        build_projects(out)
        written += [out / "demo.qgs", out / "heavy.qgs"]
    for p in sorted(set(written)):
        print(f"{p.stat().st_size:>10,}  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
