"""What a request is: its class (from config rules) and its project (for affinity and the
allow-list). Nothing QGIS-specific is hard-wired: the OGC parameters SERVICE and REQUEST, the
project parameter (MAP) and the classes all come from the configuration's defaults.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from .config import Config, RequestClass

DEFAULT_CLASS = RequestClass(name="default", priority=5)
_XML_ROOT = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?([A-Za-z_][\w.-]*)[\s>/]")
_XML_SERVICE = re.compile(rb"""\bservice\s*=\s*["']([^"']*)["']""", re.IGNORECASE)
_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Rule:
    """A compiled request class."""

    spec: RequestClass
    ogc: tuple[tuple[str, re.Pattern[str]], ...]
    params: tuple[tuple[bytes, re.Pattern[str]], ...]

    @property
    def name(self) -> str:
        return self.spec.name

    def matches(self, ogc: Mapping[str, str], params: Mapping[bytes, bytes]) -> bool:
        for key, pattern in self.ogc:
            if not pattern.fullmatch(ogc.get(key, "")):
                return False
        for name, pattern in self.params:
            if not pattern.fullmatch(params.get(name, b"").decode("latin-1")):
                return False
        return True


def compile_rules(config: Config) -> list[Rule]:
    rules = []
    for spec in config.classes:
        ogc, params = [], []
        for key, regex in spec.match.items():
            pattern = re.compile(regex, re.IGNORECASE)
            if key.startswith("param:"):
                params.append((key[6:].encode("latin-1"), pattern))
            else:
                ogc.append((key.upper(), pattern))
        rules.append(Rule(spec, tuple(ogc), tuple(params)))
    if not any(rule.name == DEFAULT_CLASS.name for rule in rules):
        rules.append(Rule(DEFAULT_CLASS, (), ()))
    return rules


def ogc_from_query(query: str, wanted: tuple[str, ...]) -> dict[str, str]:
    """The wanted parameters (upper-case names, case-insensitive) of a query string."""
    found: dict[str, str] = {}
    for part in query.split("&"):
        name, sep, value = part.partition("=")
        key = name.upper()
        if sep and key in wanted and key not in found:
            found[key] = urllib.parse.unquote_plus(value)
    return found


def ogc_from_body(body: bytes, content_type: str, wanted: tuple[str, ...]) -> dict[str, str]:
    """The OGC parameters of a small POST body: a form, or an OGC XML request whose root
    element names the operation (<GetMap service="WMS" ...>)."""
    if "x-www-form-urlencoded" in content_type:
        return ogc_from_query(body.decode("latin-1"), wanted)
    if "xml" in content_type or body.lstrip().startswith(b"<"):
        text = body.lstrip()
        while text.startswith((b"<?", b"<!--")):
            end = text.find(b">")
            text = text[end + 1 :].lstrip() if end >= 0 else b""
        found = {}
        root = _XML_ROOT.match(text)
        if root:
            found["REQUEST"] = root.group(1).decode("latin-1")
            service = _XML_SERVICE.search(text[: root.end() + 2048])
            if service:
                found["SERVICE"] = service.group(1).decode("latin-1")
        return found
    return {}


@dataclass(slots=True)
class ProjectCheck:
    allowed: bool
    path: str  # the file the child must be given ("" when unchanged)
    reason: str = ""  # why it is not allowed, for the log


class Classifier:
    """Classes and projects of requests, for one configuration."""

    def __init__(self, config: Config) -> None:
        self.rules = compile_rules(config)
        self.by_name = {rule.name: rule for rule in self.rules}
        projects = config.projects
        self.parameter = projects.parameter.upper()
        tuning = config.tuning  # what a kind of request is made of (costs.py)
        extra = [name.upper() for name in (*tuning.size_params, *tuning.kind_params)]
        self.wanted = ("SERVICE", "REQUEST", self.parameter, *extra)
        self.roots = [os.path.realpath(root) for root in projects.allowed_roots]
        self.allow_override = projects.allow_map_override
        self.file_types = tuple(ending.lower() for ending in projects.file_types)
        self.schemes = tuple(f"{scheme.lower()}:" for scheme in projects.storage_schemes)
        self.search_paths = sorted(
            ((alias.rstrip("/"), directory) for alias, directory in projects.search_paths.items()),
            key=lambda item: -len(item[0]),
        )
        self._checked: OrderedDict[tuple[str, bool], ProjectCheck] = OrderedDict()
        self._by_params = any(rule.params for rule in self.rules)
        self._parsed: dict[bytes, tuple[dict[str, str], Rule | None]] = {}

    def ogc(self, params: Mapping[bytes, bytes]) -> dict[str, str]:
        """The OGC parameters of the query string (read-only: the result is shared)."""
        return self.of_query(params)[0]

    def of_query(self, params: Mapping[bytes, bytes]) -> tuple[dict[str, str], Rule]:
        """The OGC parameters of the query string (read-only: shared) and the class they
        give. Cached by query string, since GetCapabilities and tile requests repeat theirs
        (the class too, unless a rule looks at other params); cleared when full rather than
        kept in LRU order, which would cost on every hit."""
        query = params.get(b"QUERY_STRING", b"")
        found = self._parsed.get(query)
        if found is None:
            if len(self._parsed) >= _CACHE_SIZE:
                self._parsed.clear()
            ogc = ogc_from_query(query.decode("latin-1"), self.wanted)
            rule = None if self._by_params else self.classify(ogc, params)
            found = self._parsed[query] = (ogc, rule)
        ogc, rule = found
        return ogc, rule if rule is not None else self.classify(ogc, params)

    def classify(self, ogc: Mapping[str, str], params: Mapping[bytes, bytes]) -> Rule:
        for rule in self.rules:
            if rule.matches(ogc, params):
                return rule
        return self.by_name[DEFAULT_CLASS.name]

    def project(self, ogc: Mapping[str, str], params: Mapping[bytes, bytes]) -> tuple[str, bool]:
        """The request's project, and whether the request named it (MAP) rather than the
        web server (QGIS_PROJECT_FILE)."""
        named = ogc.get(self.parameter)
        if named:
            return named, True
        return params.get(b"QGIS_PROJECT_FILE", b"").decode("utf-8", "replace"), False

    def overrides(self, ogc: Mapping[str, str], params: Mapping[bytes, bytes]) -> bool:
        """Does the request name another project than the one the web server set? QGIS
        would serve the request's: in shared hosting, one tenant reading another's."""
        pinned = params.get(b"QGIS_PROJECT_FILE")
        if not pinned or self.allow_override:
            return False
        return pinned.decode("utf-8", "replace") != ogc.get(self.parameter)

    def check(self, project: str, named: bool = False) -> ProjectCheck:
        """Is ``project`` allowed, and which file is it? A project the request ``named``
        must also be a project file (projects.file_types) or storage URI. Cached: paths are
        resolved on the file system (symlinks, ..) once per project, not per request."""
        key = (project, named)
        cached = self._checked.get(key)
        if cached is not None:
            self._checked.move_to_end(key)
            return cached
        path = self._map(project)
        result = ProjectCheck(True, path if path != project else "")
        lowered = path.lower()
        if named and not lowered.startswith(self.schemes or ("\0",)):
            if not lowered.endswith(self.file_types):
                result = ProjectCheck(False, "", "not a project file")
            elif self.roots and not self._inside_roots(path):
                result = ProjectCheck(False, "", "outside the allowed roots")
        elif not named and self.roots and not self._inside_roots(path):
            result = ProjectCheck(False, "", "outside the allowed roots")
        self._checked[key] = result
        if len(self._checked) > _CACHE_SIZE:
            self._checked.popitem(last=False)
        return result

    def _inside_roots(self, path: str) -> bool:
        real = os.path.realpath(path)
        return any(real == root or real.startswith(root + os.sep) for root in self.roots)

    def _map(self, project: str) -> str:
        for alias, directory in self.search_paths:
            if project == alias or project.startswith(alias + "/"):
                rest = project[len(alias) :].lstrip("/")
                return os.path.join(directory, rest) if rest else directory
        return project

    def rewrite(
        self, params: dict[bytes, bytes], ogc: Mapping[str, str], path: str
    ) -> dict[bytes, bytes]:
        """``params`` with the project named by ``path``, where the request named it."""
        params = dict(params)
        if self.parameter in ogc:
            query = params.get(b"QUERY_STRING", b"").decode("latin-1")
            parts = []
            for part in query.split("&"):
                name, sep, _ = part.partition("=")
                if sep and name.upper() == self.parameter:
                    part = f"{name}={urllib.parse.quote(path, safe='/')}"
                parts.append(part)
            params[b"QUERY_STRING"] = "&".join(parts).encode("latin-1")
        else:
            params[b"QGIS_PROJECT_FILE"] = path.encode()
        return params
