"""child.probe_interval: an idle child is probed out of rotation; one that does not answer is
replaced before a visitor reaches it. Off by default."""

from __future__ import annotations

from fakes import Answer, Hang


def test_a_wedged_idle_child_is_replaced_before_a_visitor_reaches_it(harness):
    h = harness({"child": {"probe_interval": 10.0}})
    wedged, healthy = h.pool.children.all
    h.processes.programs[wedged.pid].probe = Hang()  # alive, but it answers nothing any more
    h.until(lambda: wedged not in h.pool.children.all and h.pool.children.ready() == 2, 60,
            "the wedged child replaced")  # fmt: skip
    assert healthy in h.pool.children.all, "the healthy one answered its probe"
    assert h.pool.accounting.restarts["probe_failed"] == 1
    program = h.processes.programs.get(wedged.pid)
    assert program is None or not program.served, "no visitor was sent to it"
    assert h.get("/?n=1").status == 200


def test_without_probe_interval_idle_children_are_left_alone(harness):
    h = harness()
    first, _ = h.pool.children.all
    h.processes.programs[first.pid].probe = Answer(200, b"p\n")
    probes_before = len(h.processes.programs[first.pid].requests)
    h.run(120)
    assert len(h.processes.programs[first.pid].requests) == probes_before
