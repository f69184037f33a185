"""A small blocking FastCGI client: what `fcgipool request` and the tests use.

Like `cgi-fcgi -connect`, but it builds the CGI params itself and parses the answer into
status, headers and body (headers with the standard library's email parser, CGI-style).
"""

from __future__ import annotations

import email.parser
import email.policy
import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import urlsplit

from .config import Address
from .protocol import ClientConnection, EndRequest, Stderr, Stdout, encode_request


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    stderr: bytes = b""
    app_status: int = 0
    protocol_status: int = 0
    raw_head: bytes = field(default=b"", repr=False)


def cgi_params(
    uri: str,
    method: str = "GET",
    body: bytes = b"",
    extra: Mapping[str, str] | None = None,
) -> dict[bytes, bytes]:
    """The params a web server would send for ``method uri``; ``extra`` overrides them."""
    parts = urlsplit(uri)
    params = {
        "GATEWAY_INTERFACE": "CGI/1.1",
        "REQUEST_METHOD": method,
        "REQUEST_URI": uri,
        "SCRIPT_NAME": parts.path or "/",
        "PATH_INFO": "",
        "QUERY_STRING": parts.query,
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_SOFTWARE": "fcgipool-client",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "0",
        "HTTP_HOST": "localhost",
        "CONTENT_LENGTH": str(len(body)),
    }
    if body:
        params["CONTENT_TYPE"] = "application/x-www-form-urlencoded"
    params.update(extra or {})
    return {name.encode(): value.encode() for name, value in params.items()}


def connect(address: str | Address, timeout: float | None = 30.0) -> socket.socket:
    """A connection to ``address`` in any form Address.parse reads. A host name is tried at
    each address it resolves to; ``:PORT`` (every interface) connects to localhost."""
    addr = address if isinstance(address, Address) else Address.parse(address)
    if addr.kind == "tcp":
        return socket.create_connection((addr.host or "localhost", addr.port), timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(addr.path)
    except OSError:
        sock.close()
        raise
    return sock


def iter_response(
    sock: socket.socket, request_id: int = 1
) -> Iterator[Stdout | Stderr | EndRequest]:
    """Events of one response as they arrive; ends after END_REQUEST."""
    codec = ClientConnection()
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed before END_REQUEST")
        for event in codec.feed(data):
            if getattr(event, "request_id", request_id) != request_id:
                continue
            yield event  # type: ignore[misc]
            if isinstance(event, EndRequest):
                return


def split_head(stdout: bytes) -> tuple[bytes, bytes] | None:
    for separator in (b"\r\n\r\n", b"\n\n"):
        index = stdout.find(separator)
        if index >= 0:
            return stdout[:index], stdout[index + len(separator) :]
    return None


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        head + b"\r\n\r\n", headersonly=True
    )
    headers = {name: str(value) for name, value in message.items()}
    status_text = headers.pop("Status", "")
    if status_text[:3].isdigit():
        status = int(status_text[:3])
    else:
        status = 302 if "Location" in headers else 200
    return status, headers


_STATUS = re.compile(rb"(?im)^status:[ \t]*(\d{3})")
_LOCATION = re.compile(rb"(?im)^location:")


def response_status(head: bytes) -> int:
    """The status of a CGI response from its first bytes, quickly (it runs per request):
    the Status header, else 302 with a Location, else 200."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        end = head.find(b"\n\n")
    head = head[: end if end >= 0 else len(head)]
    match = _STATUS.search(head)
    if match:
        return int(match.group(1))
    return 302 if _LOCATION.search(head) else 200


def request(
    address: str | Address,
    uri: str,
    method: str = "GET",
    body: bytes = b"",
    params: Mapping[str, str] | None = None,
    timeout: float | None = 30.0,
    output: BinaryIO | None = None,
) -> Response:
    """Send one request on a new connection and read the whole answer.

    With ``output``, the body is written there as it arrives instead of being kept.
    """
    with connect(address, timeout) as sock:
        sock.sendall(encode_request(1, cgi_params(uri, method, body, params), body))
        head: bytes | None = None
        buffered = bytearray()
        stderr = bytearray()
        end: EndRequest | None = None
        status = 0
        headers: dict[str, str] = {}
        for event in iter_response(sock):
            if isinstance(event, Stdout):
                if head is None:
                    buffered += event.data
                    parts = split_head(bytes(buffered))
                    if parts is not None:
                        head, rest = parts
                        status, headers = parse_head(head)
                        buffered = bytearray()
                        if output is not None:
                            output.write(rest)
                        else:
                            buffered += rest
                elif output is not None:
                    output.write(event.data)
                else:
                    buffered += event.data
            elif isinstance(event, Stderr):
                stderr += event.data
            else:
                end = event
    assert end is not None
    if head is None:
        raise ConnectionError("response ended without a CGI header block")
    return Response(
        status, headers, bytes(buffered), bytes(stderr), end.app_status, end.protocol_status, head
    )
