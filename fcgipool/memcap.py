"""child.max_memory: a hard memory cap per child, enforced by the kernel, not by polling.

``max_rss`` recycles a child between requests, after the fact; a request that makes a child
grow by gigabytes in one go takes the host's memory first. With ``max_memory`` the kernel
stops the child at the bound. The first of these that works is used, chosen once:

- **cgroup2**: the pool's own cgroup, delegated to it (systemd ``Delegate=yes``) with the
  memory controller. The pool moves its own process into a leaf ``supervisor`` (a cgroup
  with processes cannot hand controllers to its children), enables ``+memory`` below, and
  gives each child a leaf ``child-PID-N`` (the pool's pid) with ``memory.max`` (no swap,
  the whole leaf killed together). ``memory.events`` counts the kernel's OOM kills.
- **cgroup1**: the v1 memory hierarchy (hybrid hosts), the pool's memory cgroup writable
  (root): a group ``fcgipool-PID/child-N`` with ``memory.limit_in_bytes`` (and
  ``memory.memsw.limit_in_bytes``, so that it cannot swap instead); ``memory.oom_control``
  counts the kills.
- **rlimit**: RLIMIT_AS, the address space. A poor cap for QGIS, whose mapped address space
  is far above its RSS, and the child is not killed: an allocation fails and the child
  usually aborts, which the pool cannot tell from a crash.

Each child enters its leaf itself, between fork and exec (it writes 0 to ``cgroup.procs``,
opened by the pool before the fork), so every page it ever touches is charged to it.
"""

from __future__ import annotations

import contextlib
import os
import resource
from dataclasses import dataclass
from pathlib import Path

from . import logs

log = logs.get("fcgipool.child")

PROC = Path("/proc/self")


@dataclass(frozen=True)
class Entry:
    """What a child does between fork and exec to be capped."""

    procs_fd: int = -1  # cgroup.procs of its leaf, open for writing
    address_space: int = 0  # RLIMIT_AS, bytes; 0 is unchanged

    def apply(self) -> None:
        if self.procs_fd >= 0:
            os.write(self.procs_fd, b"0")
        if self.address_space:
            resource.setrlimit(resource.RLIMIT_AS, (self.address_space, self.address_space))


class MemoryCap:
    """No cap (max_memory = 0), and the interface of the others."""

    mechanism = "off"

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit

    def enter(self, number: int) -> Entry:
        """Make child ``number``'s leaf; what the child must do to enter it."""
        return Entry()

    def entered(self, entry: Entry) -> None:
        """The child was forked: the pool's copy of the entry's fd can go."""
        if entry.procs_fd >= 0:
            os.close(entry.procs_fd)

    def killed(self, number: int) -> bool:
        """Whether the kernel killed child ``number`` for its memory."""
        return False

    def release(self, number: int) -> None:
        """Child ``number`` was reaped: its leaf goes."""

    def close(self) -> None:
        """The pool stops: every leaf goes."""

    def view(self) -> dict[str, object]:
        return {"mechanism": self.mechanism, "max_memory": self.limit, "cgroup": None}


class AddressSpaceCap(MemoryCap):
    mechanism = "rlimit"

    def enter(self, number: int) -> Entry:
        return Entry(address_space=self.limit)


class _CgroupCap(MemoryCap):
    """A leaf directory per child under ``base``, its limit written when it is made."""

    procs = "cgroup.procs"
    events = ""  # the file whose oom_kill counts the kernel's kills

    def __init__(self, limit: int, base: Path) -> None:
        super().__init__(limit)
        self.base = base
        self.leaves: set[int] = set()

    def leaf(self, number: int) -> Path:
        return self.base / f"child-{number}"

    def enter(self, number: int) -> Entry:
        leaf = self.leaf(number)
        with contextlib.suppress(FileExistsError):
            leaf.mkdir()
        self.leaves.add(number)
        self.limit_leaf(leaf)
        return Entry(procs_fd=os.open(leaf / self.procs, os.O_WRONLY | os.O_CLOEXEC))

    def limit_leaf(self, leaf: Path) -> None:
        raise NotImplementedError

    def killed(self, number: int) -> bool:
        return _counter(self.leaf(number) / self.events, "oom_kill") > 0

    def release(self, number: int) -> None:
        if number in self.leaves:
            try:
                self.leaf(number).rmdir()
                self.leaves.discard(number)
            except OSError as error:  # e.g. an orphan of the child still lives in it
                log.info("memory_cap_leaf_kept", leaf=str(self.leaf(number)), error=str(error))

    def close(self) -> None:
        for number in list(self.leaves):
            self.release(number)

    def view(self) -> dict[str, object]:
        return {**super().view(), "cgroup": str(self.base)}


class Cgroup2Cap(_CgroupCap):
    mechanism = "cgroup2"
    events = "memory.events"

    def leaf(self, number: int) -> Path:
        """With the pool's pid: a leaf kept by an orphan of an earlier run (same unit) is
        never entered again, its kill count and its limit stay its own."""
        return self.base / f"child-{os.getpid()}-{number}"

    def limit_leaf(self, leaf: Path) -> None:
        _write(leaf / "memory.max", str(self.limit))
        for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
            if (leaf / name).exists():
                _write(leaf / name, value)


class Cgroup1Cap(_CgroupCap):
    mechanism = "cgroup1"
    events = "memory.oom_control"

    def limit_leaf(self, leaf: Path) -> None:
        _write(leaf / "memory.limit_in_bytes", str(self.limit))
        memsw = leaf / "memory.memsw.limit_in_bytes"  # only with swap accounting
        if memsw.exists():
            _write(memsw, str(self.limit))

    def close(self) -> None:
        super().close()
        with contextlib.suppress(OSError):
            self.base.rmdir()


def choose(limit: int, proc: Path = PROC) -> MemoryCap:
    """The cap for ``limit`` bytes: cgroup2, else cgroup1, else RLIMIT_AS (module doc)."""
    if not limit:
        return MemoryCap()
    mounts = _cgroup_mounts(proc)
    groups = _own_cgroups(proc)
    cap: MemoryCap | None = None
    if "cgroup2" in mounts and "" in groups:
        cap = _delegated_v2(limit, _join(mounts["cgroup2"], groups[""]))
    if cap is None and "memory" in mounts and "memory" in groups:
        cap = _writable_v1(limit, _join(mounts["memory"], groups["memory"]))
    if cap is None:
        cap = AddressSpaceCap(limit)
    log.info("memory_cap", **cap.view())
    return cap


def _delegated_v2(limit: int, own: Path) -> Cgroup2Cap | None:
    try:
        if "memory" not in (own / "cgroup.controllers").read_text().split():
            return None
        if not os.access(own / "cgroup.subtree_control", os.W_OK):
            return None
        if "memory" not in (own / "cgroup.subtree_control").read_text().split():
            _move_processes(own)
            _write(own / "cgroup.subtree_control", "+memory")
        _remove_leaves(own)  # a pool killed by SIGKILL left them (rmdir fails on a live one)
    except OSError as error:
        log.info("memory_cap_cgroup2_unusable", cgroup=str(own), error=str(error))
        return None
    return Cgroup2Cap(limit, own)


def _move_processes(own: Path) -> None:
    """The no-internal-processes rule: what lives in the pool's cgroup (the pool, and what
    its unit started with it) moves to the leaf ``supervisor`` before controllers go below."""
    supervisor = own / "supervisor"
    with contextlib.suppress(FileExistsError):
        supervisor.mkdir()
    for pid in (own / "cgroup.procs").read_text().split():
        with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
            _write(supervisor / "cgroup.procs", pid)


def _writable_v1(limit: int, own: Path) -> Cgroup1Cap | None:
    base = own / f"fcgipool-{os.getpid()}"
    for stale in own.glob("fcgipool-*"):  # of pools that were killed by SIGKILL
        if _alive(stale.name.removeprefix("fcgipool-")):
            continue
        _remove_leaves(stale)
        with contextlib.suppress(OSError):
            stale.rmdir()
    try:
        base.mkdir(exist_ok=True)
    except OSError as error:
        log.info("memory_cap_cgroup1_unusable", cgroup=str(own), error=str(error))
        return None
    return Cgroup1Cap(limit, base)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, OSError):
        return True  # not a pid, or another user's: leave it
    return True


def _remove_leaves(group: Path) -> None:
    for leaf in group.glob("child-*"):
        with contextlib.suppress(OSError):
            leaf.rmdir()


def _cgroup_mounts(proc: Path) -> dict[str, Path]:
    """Mount points by what they hold: "cgroup2", or a v1 controller ("memory")."""
    mounts: dict[str, Path] = {}
    for line in _lines(proc / "mountinfo"):
        fields, _, tail = line.partition(" - ")
        parts, kind = fields.split(), tail.split()
        if len(parts) < 5 or len(kind) < 3 or parts[3] != "/":
            continue  # a bind mount of a sub-tree: paths in /proc/self/cgroup do not fit it
        if kind[0] == "cgroup2":
            mounts.setdefault("cgroup2", Path(parts[4]))
        elif kind[0] == "cgroup":
            for option in kind[2].split(","):
                mounts.setdefault(option, Path(parts[4]))
    return mounts


def _own_cgroups(proc: Path) -> dict[str, str]:
    """The pool's cgroup path per v1 controller, and under "" the v2 one."""
    groups: dict[str, str] = {}
    for line in _lines(proc / "cgroup"):
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            groups[controller] = path
    return groups


def _join(mount: Path, path: str) -> Path:
    return mount / path.lstrip("/")


def _write(path: Path, value: str) -> None:
    with open(path, "w") as file:
        file.write(value)


def _lines(path: Path) -> list[str]:
    """The lines of a /proc or cgroup file; none when it cannot be read."""
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def _counter(path: Path, name: str) -> int:
    """``name N`` from a flat-keyed cgroup file; 0 when absent or unreadable."""
    for line in _lines(path):
        key, _, value = line.partition(" ")
        if key == name:
            with contextlib.suppress(ValueError):
                return int(value)
    return 0
