"""What the state tables share (a request's in request.py, a child's in children.py, the
pool's in supervisor.py): their enums, and the error a move outside a table raises."""

from __future__ import annotations

import enum


class StateEnum(enum.Enum):
    """An enum hashed by identity: its members are table keys looked up on every request,
    and Enum's own __hash__ is Python code."""

    __hash__ = object.__hash__


class IllegalTransition(RuntimeError):
    """A move the state table does not allow: a bug in the pool."""
