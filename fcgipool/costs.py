"""The learned cost of requests: how long a child takes, per kind of request.

A kind is (project, REQUEST, size bucket, the kind parameters): for QGIS, a 256² tile of a
layer and a 2048² map of a project are different kinds. Each kind keeps a decaying mean
(so the model follows change) and its last measurements (for a high quantile, computed only
when shown). Tables are bounded, least recently seen forgotten first. A kind not seen yet
takes the cost of the first fallback that has one: (project, REQUEST), then REQUEST, then
the request's class; with nothing learned yet its cost is unknown (0: it is admitted, and
the queue timeout still applies).

Learning costs a few dictionary updates per request; a prediction is a dictionary lookup.
"""

from __future__ import annotations

import math
import zlib
from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import TuningSection

Kind = tuple[str, str, int, str]  # project, REQUEST, size bucket (side in pixels), params
RECENT = 32  # measurements kept per kind for its p90
_LONG_VALUE = 256  # a kind parameter longer than this is kept as a prefix and a checksum


class Cost:
    """What one kind (or fallback) costs: a decaying mean, and for a kind its last
    measurements (for the p90 shown in status)."""

    __slots__ = ("count", "fallbacks", "mean", "recent")

    def __init__(self, keep: int = 0) -> None:
        self.count = 0
        self.mean = 0.0
        self.recent: deque[float] | None = deque(maxlen=keep) if keep else None
        self.fallbacks: tuple[Cost, ...] | None = None  # of a kind: learned with it

    def quantile(self, q: float) -> float:
        ordered = sorted(self.recent or ())
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _fallback(table: dict[Any, Cost], key: Any, size: int) -> Cost:
    """The entry of a fallback table: bounded, the first made forgotten first (a kind that
    still refers to a forgotten one keeps teaching it, harmlessly)."""
    cost = table.get(key)
    if cost is None:
        cost = table[key] = Cost()
        if len(table) > size:
            del table[next(iter(table))]
    return cost


class CostModel:
    def __init__(self, tuning: TuningSection) -> None:
        self.kinds: OrderedDict[Kind, Cost] = OrderedDict()  # least recently seen first
        self.by_project: dict[tuple[str, str], Cost] = {}  # (project, REQUEST)
        self.by_request: dict[str, Cost] = {}  # REQUEST
        self.by_class: dict[str, Cost] = {}
        self._last_ogc: Mapping[str, str] | None = None
        self._last: Kind = ("", "", 0, "")
        self.configure(tuning)

    def configure(self, tuning: TuningSection) -> None:
        self.decay = tuning.decay
        self.size_params = tuple(name.upper() for name in tuning.size_params)
        self.kind_params = tuple(name.upper() for name in tuning.kind_params)
        self.size = tuning.kinds
        self._last_ogc = None
        self.kind_param = self.kind_params[0] if len(self.kind_params) == 1 else ""
        for cost in self.kinds.values():  # the classes may have changed: link again
            cost.fallbacks = None
        while len(self.kinds) > self.size:
            self.kinds.popitem(last=False)
        while len(self.by_project) > self.size:
            del self.by_project[next(iter(self.by_project))]

    @property
    def wanted(self) -> tuple[str, ...]:
        """The query parameters a kind is made of (the classifier reads them)."""
        return self.size_params + self.kind_params

    def kind(self, ogc: Mapping[str, str], project: str) -> Kind:
        # The classifier hands the same (read-only) parameters for a repeated query string
        # (GetCapabilities...): the last kind is kept for it, and ``ogc`` with it, so that
        # its identity cannot be taken by another.
        if ogc is self._last_ogc and project == self._last[0]:
            return self._last
        size = 0
        if self.size_params:
            pixels = 1
            for name in self.size_params:
                value = ogc.get(name, "")
                if not value.isdigit():
                    pixels = 0
                    break
                pixels *= int(value)
            size = bucket(pixels)
        if self.kind_param:
            text = ogc.get(self.kind_param, "")
        else:
            text = "&".join([ogc.get(name, "") for name in self.kind_params])
        if len(text) > _LONG_VALUE:
            text = f"{text[:_LONG_VALUE]}…{zlib.crc32(text.encode()):08x}"
        kind = self._last = (project, ogc.get("REQUEST", ""), size, text)
        self._last_ogc = ogc
        return kind

    def predict(self, kind: Kind, klass: str) -> float:
        """The expected seconds of a request of ``kind`` in class ``klass``; 0 if unknown."""
        cost = self.kinds.get(kind)
        if cost is None:
            cost = self.by_project.get(kind[:2])
            if cost is None:
                cost = self.by_request.get(kind[1])
                if cost is None:
                    cost = self.by_class.get(klass)
                    if cost is None:
                        return 0.0
        return cost.mean

    def learn(self, kind: Kind, klass: str, seconds: float) -> None:
        """One measurement of ``kind``, taught to it and to its fallbacks (inline: this
        runs once per request)."""
        kinds = self.kinds
        cost = kinds.get(kind)
        if cost is None:
            cost = kinds[kind] = Cost(RECENT)
            if len(kinds) > self.size:
                kinds.popitem(last=False)
        else:
            kinds.move_to_end(kind)
        fallbacks = cost.fallbacks
        if fallbacks is None:
            fallbacks = cost.fallbacks = (
                _fallback(self.by_project, kind[:2], self.size),
                _fallback(self.by_request, kind[1], 256),
                _fallback(self.by_class, klass, 1024),
            )
        cost.recent.append(seconds)  # type: ignore[union-attr]  # a kind keeps them
        decay = self.decay
        for each in (cost, *fallbacks):
            # The first measurements are averaged plainly, later ones weigh ``decay``.
            count = each.count = each.count + 1
            each.mean += (seconds - each.mean) * (1.0 / count if count * decay < 1.0 else decay)

    def rows(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most requested kinds, for the status document."""
        top = sorted(self.kinds.items(), key=lambda item: -item[1].count)[:limit]
        return [
            {
                "project": project,
                "request": request,
                "size": size or None,
                "params": params,
                "count": cost.count,
                "mean_ms": round(cost.mean * 1000, 2),
                "p90_ms": round(cost.quantile(0.9) * 1000, 2),
            }
            for (project, request, size, params), cost in top
        ]


def bucket(pixels: int) -> int:
    """The side of the smallest power-of-two square that holds ``pixels`` (256 for a 256²
    tile, 1024 for 1024x872); 0 when there is no size."""
    if pixels <= 0:
        return 0
    return 1 << max(0, math.ceil(math.log2(pixels) / 2))
