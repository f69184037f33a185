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
    """What one kind (or fallback) costs: a decaying mean, and the last measurements."""

    __slots__ = ("count", "mean", "recent")

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.recent: deque[float] = deque(maxlen=RECENT)

    def add(self, seconds: float, decay: float) -> None:
        self.count += 1
        # The first measurements are averaged plainly, later ones weigh ``decay``.
        weight = 1.0 / self.count if self.count * decay < 1.0 else decay
        self.mean += weight * (seconds - self.mean)
        self.recent.append(seconds)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.recent)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class _Table(OrderedDict[Any, Cost]):
    """A bounded table of costs, least recently used forgotten first."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def learn(self, key: Any, seconds: float, decay: float) -> None:
        cost = self.get(key)
        if cost is None:
            cost = self[key] = Cost()
            if len(self) > self.size:
                self.popitem(last=False)
        else:
            self.move_to_end(key)
        cost.add(seconds, decay)


class CostModel:
    def __init__(self, tuning: TuningSection) -> None:
        self.kinds = _Table(tuning.kinds)
        self.by_project = _Table(tuning.kinds)  # (project, REQUEST)
        self.by_request = _Table(256)  # REQUEST
        self.by_class: dict[str, Cost] = {}
        self.configure(tuning)

    def configure(self, tuning: TuningSection) -> None:
        self.decay = tuning.decay
        self.size_params = tuple(name.upper() for name in tuning.size_params)
        self.kind_params = tuple(name.upper() for name in tuning.kind_params)
        for table in (self.kinds, self.by_project):
            table.size = tuning.kinds
            while len(table) > table.size:
                table.popitem(last=False)

    @property
    def wanted(self) -> tuple[str, ...]:
        """The query parameters a kind is made of (the classifier reads them)."""
        return self.size_params + self.kind_params

    def kind(self, ogc: Mapping[str, str], project: str) -> Kind:
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
        values = [ogc.get(name, "") for name in self.kind_params]
        text = "&".join(values) if len(values) != 1 else values[0]
        if len(text) > _LONG_VALUE:
            text = f"{text[:_LONG_VALUE]}…{zlib.crc32(text.encode()):08x}"
        return (project, ogc.get("REQUEST", ""), size, text)

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
        decay = self.decay
        self.kinds.learn(kind, seconds, decay)
        self.by_project.learn(kind[:2], seconds, decay)
        self.by_request.learn(kind[1], seconds, decay)
        cost = self.by_class.get(klass)
        if cost is None:
            cost = self.by_class[klass] = Cost()
        cost.add(seconds, decay)

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
