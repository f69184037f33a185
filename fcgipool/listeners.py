"""The pool's listening sockets: bind unix and TCP addresses, take over the sockets systemd
hands over (LISTEN_FDS), probe for stale unix socket files, remove the files the pool made.

Every failure to listen is a :class:`ListenError`, an ``OSError`` whose text is one line
naming the config key, the address and the reason, e.g.
``pool.bind.0: cannot listen on tcp:127.0.0.1:9000: Address already in use``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import os
import pwd
import socket
import stat
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from . import systemd
from .config import Address

if TYPE_CHECKING:
    from .config import Config

BACKLOG = 4096  # the kernel caps it at net.core.somaxconn (4096 since Linux 5.4)
# The kernel has no IPv6 at all: ":PORT" falls back to IPv4 only.
_NO_IPV6 = (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.EADDRNOTAVAIL)


class ListenError(OSError):
    """A socket could not be made; ``str()`` is the whole one-line message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def describe(sock: socket.socket) -> str:
    """The address a socket listens on, in the canonical form (``unix:/p.sock``,
    ``tcp:[::]:9000``), for log lines."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        path = name.decode(errors="replace") if isinstance(name, bytes) else name
        return f"unix:{path or '(unnamed)'}"
    host = f"[{name[0]}]" if sock.family == socket.AF_INET6 else name[0]
    return f"tcp:{host}:{name[1]}"


def claim_unix_path(path: str) -> None:
    """Make ``path`` free for a new unix socket: a socket file nobody answers on (left by a
    pool that is gone) is removed; a live one raises OSError(EADDRINUSE), anything that is
    not a socket OSError(ENOTSOCK), both with ``path`` as the filename."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.ENOTSOCK, "exists and is not a socket", path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
    raise OSError(errno.EADDRINUSE, "in use by a running process", path)


def bind(
    address: Address, mode: int = 0o660, owner: str = "", group: str = "", *, key: str = ""
) -> socket.socket:
    """A non-blocking listening socket for ``address``.

    Unix: the directory is made, a stale socket file replaced (:func:`claim_unix_path`),
    the file gets ``mode``, ``owner`` and ``group``. TCP: a host name is resolved now and the
    first address it resolves to is bound; ``:PORT`` (host "") is every interface, one
    IPv6 socket that takes IPv4 too, or IPv4 only where the kernel has no IPv6. An IPv6
    address is bound IPv6-only, so ``[::]:P`` and ``0.0.0.0:P`` may be listed together.

    Raises :class:`ListenError` naming ``key`` (the config key), the address and why.
    """
    try:
        sock = (
            _bind_unix(address, mode, owner, group)
            if address.kind == "unix"
            else (_bind_tcp(address))
        )
    except OSError as error:
        prefix = f"{key}: " if key else ""
        raise ListenError(f"{prefix}cannot listen on {address}: {_reason(error)}") from None
    return sock


def _reason(error: OSError) -> str:
    if isinstance(error, ListenError):
        return error.message
    if error.strerror:
        return error.strerror
    return str(error)


def _bind_unix(address: Address, mode: int, owner: str, group: str) -> socket.socket:
    path = address.path
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise ListenError(f"cannot create {directory}: {_reason(error)}") from None
    claim_unix_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        try:
            uid = pwd.getpwnam(owner).pw_uid if owner else -1
            gid = grp.getgrnam(group).gr_gid if group else -1
            if uid != -1 or gid != -1:
                os.chown(path, uid, gid)
            os.chmod(path, mode)
        except (OSError, KeyError) as error:
            os.unlink(path)
            why = _reason(error) if isinstance(error, OSError) else f"no such user or group {error}"
            raise ListenError(f"cannot set the owner and mode of {path}: {why}") from None
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _bind_tcp(address: Address) -> socket.socket:
    if address.host:
        try:
            infos = socket.getaddrinfo(
                address.host, address.port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                socket.AI_PASSIVE | socket.AI_NUMERICSERV,
            )  # fmt: skip
        except socket.gaierror as error:
            raise ListenError(f"cannot resolve {address.host!r}: {error.strerror}") from None
        family, _, _, _, sockaddr = infos[0]
        return _listen_tcp(family, sockaddr, v6only=True)
    try:
        return _listen_tcp(socket.AF_INET6, ("::", address.port), v6only=False)
    except OSError as error:
        if error.errno not in _NO_IPV6:
            raise
    return _listen_tcp(socket.AF_INET, ("0.0.0.0", address.port), v6only=False)


def _listen_tcp(family: int, sockaddr: tuple[Any, ...], v6only: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class Listeners:
    """Listening sockets and the unix socket files the pool made for them (not those of
    sockets systemd handed over: systemd owns those files)."""

    def __init__(
        self,
        sockets: Iterable[socket.socket] = (),
        paths: Iterable[str] = (),
        inherited: bool = False,
    ) -> None:
        self.sockets = list(sockets)
        self.paths = list(paths)
        self.inherited = inherited

    @classmethod
    def open(cls, config: Config) -> Listeners:
        """The pool sockets: those systemd hands over, else one per ``pool.bind`` address."""
        inherited = systemd.inherited_sockets()
        if inherited:
            for sock in inherited:
                sock.setblocking(False)
            return cls(inherited, inherited=True)
        pool = config.pool
        keyed = [(f"pool.bind.{i}", address) for i, address in enumerate(config.addresses)]
        return cls.bind(keyed, config.socket_mode(), pool.socket_owner, pool.socket_group)

    @classmethod
    def open_admin(cls, config: Config) -> Listeners:
        """The admin HTTP listener (``admin.http``), none when it is off. A unix one gets the
        pool sockets' mode, owner and group."""
        address = config.admin_address
        if address is None:
            return cls()
        pool = config.pool
        return cls.bind(
            [("admin.http", address)], config.socket_mode(), pool.socket_owner, pool.socket_group
        )

    @classmethod
    def bind(
        cls, keyed: Iterable[tuple[str, Address]], mode: int, owner: str, group: str
    ) -> Listeners:
        """Bind every ``(key, address)``; when one fails, those already bound are closed and
        their files removed before the :class:`ListenError` goes up."""
        listeners = cls()
        try:
            for key, address in keyed:
                listeners.sockets.append(bind(address, mode, owner, group, key=key))
                if address.kind == "unix":
                    listeners.paths.append(address.path)
        except BaseException:
            listeners.close()
            raise
        return listeners

    def unlink(self) -> None:
        """Remove the socket files the pool made (once: later calls do nothing). The
        sockets stay open, so connections already in the backlog are still served."""
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.paths = []

    def close(self) -> None:
        """Remove the files and close the sockets."""
        self.unlink()
        for sock in self.sockets:
            sock.close()
        self.sockets = []


async def start_server(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    factory: Callable[[], asyncio.BaseProtocol],
) -> asyncio.Server:
    """Serve ``factory``'s protocol on a listening socket, unix or TCP."""
    # The event loop listens again with its own backlog (100 by default): keep ours, or a
    # burst of connections from the web server overflows it (EAGAIN in nginx's log).
    if sock.family == socket.AF_UNIX:
        return await loop.create_unix_server(factory, sock=sock, backlog=BACKLOG)
    return await loop.create_server(factory, sock=sock, backlog=BACKLOG)
