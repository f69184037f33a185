"""The floor: the least a Python relay in the data path can cost, for comparison with fcgipool.

    python bench/floor.py POOL_SOCKET CHILD_SOCKET WORKERS ENV_JSON COMMAND...

Binds POOL_SOCKET for the web server, starts WORKERS children of COMMAND sharing one
listening socket CHILD_SOCKET (as spawn-fcgi does), keeps one connection to each and relays
bytes on uvloop: a request goes unparsed to an idle child's connection, or waits for one; the
answer goes back unparsed. The only thing read is the last record of each chunk from the
child, to see that it is END_REQUEST (libfcgi children write nothing after it). Nothing else
that fcgipool does is here: no PARAMS decoding, classes, timeouts, retries, logs or metrics,
no checks of any kind. What fcgipool costs above this relay is the cost of its features in
Python; what this relay costs is the cost of being in the data path at all. Not a product:
a web server's FCGI_KEEP_CONN connections, request id 1 and well-behaved children only.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import socket
import subprocess
import sys

import uvloop

_END_REQUEST = 3


class ChildLink(asyncio.Protocol):
    """The kept connection to one child; ``front`` is the connection whose request it has."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.front: FrontLink | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        front = self.front
        if front is not None and not front.transport.is_closing():
            front.transport.write(data)
        if len(data) >= 16 and data[-15] == _END_REQUEST:
            if front is not None:
                front.child = None
            self.front = None
            self.relay.free(self)

    def connection_lost(self, exc: Exception | None) -> None:
        """libfcgi drops a connection that sends nothing for 2 s after its accept."""
        if self.front is not None:
            self.front.transport.close()
        self.relay.replace(self)


class FrontLink(asyncio.Protocol):
    """One connection from the web server."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.child: ChildLink | None = None
        self.pending = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.child is not None:
            self.child.transport.write(data)
        elif not self.pending and self.relay.idle:
            self.relay.attach(self, self.relay.idle.pop(), data)
        else:
            if not self.pending:
                self.relay.waiting.append(self)
            self.pending += data

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.relay.waiting:
            self.relay.waiting.remove(self)


class Relay:
    def __init__(self, child_path: str) -> None:
        self.child_path = child_path
        self.idle: list[ChildLink] = []
        self.waiting: collections.deque[FrontLink] = collections.deque()
        self.stopping = False

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, link = await loop.create_unix_connection(lambda: ChildLink(self), self.child_path)
        self.free(link)

    def replace(self, link: ChildLink) -> None:
        if link in self.idle:
            self.idle.remove(link)
        if not self.stopping:
            asyncio.get_running_loop().create_task(self.connect())

    def attach(self, front: FrontLink, child: ChildLink, data: bytes) -> None:
        front.child, child.front = child, front
        child.transport.write(data)

    def free(self, child: ChildLink) -> None:
        if self.waiting:
            front = self.waiting.popleft()
            data, front.pending = bytes(front.pending), bytearray()
            self.attach(front, child, data)
        else:
            self.idle.append(child)


async def serve(pool_path: str, child_path: str, workers: int, env: dict, command: list) -> None:
    loop = asyncio.get_running_loop()
    for path in (pool_path, child_path):
        if os.path.exists(path):
            os.unlink(path)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(child_path)
    listener.listen(64)
    children = [subprocess.Popen(command, stdin=listener, env=env) for _ in range(workers)]
    stopped = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    relay = Relay(child_path)
    for _ in range(workers):  # each child accepts one: it keeps serving that connection
        await relay.connect()
    server = await loop.create_unix_server(lambda: FrontLink(relay), pool_path)
    os.chmod(pool_path, 0o777)
    await stopped.wait()
    relay.stopping = True
    server.close()
    for child in children:
        child.kill()
        child.wait()


def main() -> None:
    pool_path, child_path, workers, env = sys.argv[1:5]
    uvloop.run(serve(pool_path, child_path, int(workers), json.loads(env), sys.argv[5:]))


if __name__ == "__main__":
    main()
