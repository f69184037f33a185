"""Fixtures of the in-process tier (see fakes.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fakes import Harness


@pytest.fixture
def pool() -> Iterator[Callable[..., Harness]]:
    """Make a Harness (the pool with fake children on a virtual clock); closed after."""
    made: list[Harness] = []

    def make(overrides: dict[str, Any] | None = None, **kwargs: Any) -> Harness:
        harness = Harness(overrides, **kwargs)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()
