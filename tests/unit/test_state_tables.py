"""The three state tables (a request's, a child's, the pool's) and that a move outside
them raises."""

from __future__ import annotations

import pytest

from fcgipool import children, request, supervisor
from fcgipool.child import State as ChildState
from fcgipool.request import MACHINE, Event, IllegalTransition, State


def test_every_request_state_can_end_and_done_is_final():
    for state, moves in MACHINE.items():
        if state is State.DONE:
            assert moves == {}
        else:
            assert moves[Event.END] is State.DONE, state
    reachable = {State.RECEIVING} | {new for moves in MACHINE.values() for new in moves.values()}
    assert reachable == set(State), "every state is reachable from RECEIVING"


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", list(Event))
def test_a_request_move_outside_the_table_raises(harness, state, event):
    h = harness()
    web = h.connect()
    web.send(request.encode_begin_request(1, keep_conn=True))
    h.settle()
    (connection,) = h.pool.frontend.connections
    subject = connection.requests[1]
    subject.state = state
    if event in MACHINE[state]:
        subject.state = MACHINE[subject.state][event]
        assert subject.state is MACHINE[state][event]
    else:
        with pytest.raises(IllegalTransition, match=f"{event.value} in state {state.value}"):
            subject.state = MACHINE[subject.state][event]
        assert subject.state is state


def test_a_request_ended_twice_raises(harness):
    """Every ending goes through Request._end once: a second one is a bug, and says so."""
    h = harness()
    web = h.connect()
    response = web.request("/x")
    h.until(lambda: response.end is not None)
    (connection,) = h.pool.frontend.connections
    done = request.Request(connection, 9, True, h.pool.context)
    done.respond(503, b"no\n")
    assert done.state is State.DONE
    with pytest.raises(IllegalTransition):
        done.respond(503, b"again\n")


def test_child_moves_follow_the_table(harness):
    h = harness()
    child = h.pool.children.all[0]
    assert child.state is ChildState.IDLE
    for state in ChildState:
        child.state = ChildState.IDLE
        if state in children.TRANSITIONS[ChildState.IDLE]:
            children._move(child, state)
            assert child.state is state
        else:
            with pytest.raises(IllegalTransition):
                children._move(child, state)
    assert children.TRANSITIONS[ChildState.DEAD] == frozenset()
    assert all(ChildState.DEAD in moves for state, moves in children.TRANSITIONS.items()
               if state is not ChildState.DEAD), "a child can die in any state"  # fmt: skip


def test_only_children_py_writes_a_childs_state():
    """One owner per state: `.state =` on a child appears in children.py alone."""
    import ast
    from pathlib import Path

    package = Path(children.__file__).parent
    writers = set()
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                if (isinstance(target, ast.Attribute) and target.attr == "state"
                        and isinstance(target.value, ast.Name) and target.value.id == "child"):
                    writers.add(path.name)
    assert writers == {"children.py"}


def test_pool_lifecycle_moves_follow_the_table(harness):
    h = harness()
    assert h.pool.lifecycle is supervisor.Lifecycle.RUNNING
    with pytest.raises(IllegalTransition, match="running -> stopped"):
        h.pool._move(supervisor.Lifecycle.STOPPED)
    assert supervisor.LIFECYCLE[supervisor.Lifecycle.STOPPED] == frozenset()
    assert h.stop() == 0
    assert h.pool.lifecycle is supervisor.Lifecycle.STOPPED


def test_no_module_below_the_supervisor_imports_it():
    """Not even for types: each part gets the narrow interface it needs."""
    import ast
    from pathlib import Path

    package = Path(supervisor.__file__).parent
    importers = []
    for path in sorted(package.glob("*.py")):
        if path.name in ("supervisor.py", "cli.py"):
            continue  # cli.py is above it: it starts the pool
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            if any(name.split(".")[-1] == "supervisor" for name in names):
                importers.append(path.name)
    assert importers == []
