"""The pool's listening sockets: bound from the configuration or handed over by systemd
(LISTEN_FDS); the socket files the pool made are removed when it stops, systemd's are not.
A unix socket file left by a pool that is gone is replaced; one a live process answers on
is an error."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import stat

from . import systemd
from .config import Address, Config


def claim_unix_path(path: str) -> None:
    """Make way for a unix socket at ``path``: a stale socket file is removed; a live one,
    or a file that is not a socket, is an OSError."""
    if not os.path.exists(path):
        return
    if not stat.S_ISSOCK(os.stat(path).st_mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise OSError(f"{path} is in use by a running process")
    finally:
        probe.close()


def _lookup_ids(owner: str, group: str) -> tuple[int, int]:
    uid = pwd.getpwnam(owner).pw_uid if owner else -1
    gid = grp.getgrnam(group).gr_gid if group else -1
    return uid, gid


def bind(address: Address, mode: int = 0o660, owner: str = "", group: str = "") -> socket.socket:
    """A listening, non-blocking socket for ``address``."""
    if address.kind == "tcp":
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
    else:
        path = address.path
        claim_unix_path(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        uid, gid = _lookup_ids(owner, group)
        if uid != -1 or gid != -1:
            os.chown(path, uid, gid)
        os.chmod(path, mode)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    return str(Address("tcp", host=name[0], port=name[1]))


class Listeners:
    """The pool sockets, and which files to remove at the end."""

    def __init__(self, sockets: list[socket.socket], owned: list[str], inherited: bool) -> None:
        self.sockets = sockets
        self.owned = owned
        self.inherited = inherited

    @classmethod
    def open(cls, config: Config) -> Listeners:
        sockets = systemd.inherited_sockets()
        if sockets:
            for sock in sockets:
                sock.setblocking(False)
            return cls(sockets, [], inherited=True)
        pool = config.pool
        addresses = config.addresses
        bound = [
            bind(address, config.socket_mode(), pool.socket_owner, pool.socket_group)
            for address in addresses
        ]
        owned = [address.path for address in addresses if address.kind == "unix"]
        return cls(bound, owned, inherited=False)

    def unlink(self) -> None:
        """Remove the socket files the pool made (not those systemd owns)."""
        for path in self.owned:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.owned = []
