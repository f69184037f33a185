"""Admission: what a request is, and whether it may wait for a child.

Once its PARAMS (and the head of a small POST body) are in, a request gets its class and
that class's timeout, and its project. Refused with a 403, never reaching a child: a
project outside ``projects.allowed_roots``; one the request names (MAP) that is not a
project file (``projects.file_types``, ``storage_schemes``), or that differs from the one
the web server set (QGIS_PROJECT_FILE) unless ``projects.allow_map_override``. An alias of
``projects.search_paths`` is rewritten to the real file. Whether it then waits or is
refused for lack of room is the dispatcher's (dispatch.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import logs
from .classify import Classifier, ogc_from_body
from .costs import CostModel
from .protocol import encode_pairs

if TYPE_CHECKING:
    from .config import Config
    from .request import Request

log = logs.get("fcgipool.admission")

BODY_LIMIT = 65536  # POST bodies up to this size are read to classify them
Refusal = tuple[int, bytes]


class Admission:
    def __init__(self, config: Config, classifier: Classifier, costs: CostModel) -> None:
        self.body_limit = BODY_LIMIT
        self.costs = costs
        self.configure(config, classifier)

    def configure(self, config: Config, classifier: Classifier) -> None:
        self.classifier = classifier
        default = config.timeouts.request
        self.timeouts = {
            rule.name: rule.spec.request_timeout or default for rule in classifier.rules
        }

    def wants_body(self, params: dict[bytes, bytes], length: int) -> bool:
        """A small POST may carry its OGC request in the body: read it before deciding."""
        return params.get(b"REQUEST_METHOD") == b"POST" and 0 < length <= self.body_limit

    def admit(self, request: Request, body: bytes | None) -> Refusal | None:
        """Classify ``request`` and check its project; a refusal is (status, body)."""
        classifier = self.classifier
        params = request.params
        ogc, rule = classifier.of_query(params)
        if body and not ("SERVICE" in ogc and "REQUEST" in ogc):
            content_type = params.get(b"CONTENT_TYPE", b"").decode("latin-1").lower()
            ogc = {**ogc_from_body(body, content_type, classifier.wanted), **ogc}
            rule = classifier.classify(ogc, params)
        request.request_class = rule.name
        request.timeout = self.timeouts[rule.name]
        project, named = classifier.project(ogc, params)
        if project:
            check = classifier.check(project, named)
            reason = check.reason
            if named and not reason and classifier.overrides(ogc, params):
                reason = "the web server set another project"
            if reason:
                request.project = project
                log.warning("project_refused", project=project, reason=reason, uri=request.uri)
                return 403, b"This project is not served here\n"
            if check.path:
                request.params = classifier.rewrite(params, ogc, check.path)
                request.raw_params = encode_pairs(request.params.items())
                project = check.path
            request.project = project
        request.kind = self.costs.kind(ogc, project)
        return None
