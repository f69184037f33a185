"""Sans-IO FastCGI codec (FastCGI 1.0 spec): bytes in, events out, bytes to send.

Nothing here touches a socket or a clock, so every path can be unit-tested and fuzzed.
:class:`ServerConnection` is what the pool is to the web server: it receives requests and
encodes every record that ends one, so it always knows which request ids are in use.
:class:`ResponseScanner` is the pool's fast reader of a child's answer (whole records,
checked, not copied apart). :class:`ClientConnection` decodes a response into events, for
`fcgipool request` and the tests. All are built on the same framing: 8-byte headers,
content, padding.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum

VERSION = 1
MAX_CONTENT = 0xFFFF
HEADER = struct.Struct("!BBHHBx")
_BEGIN_BODY = struct.Struct("!HB5x")
_END_BODY = struct.Struct("!IB3x")
_LEN4 = struct.Struct("!I")
_PADDING = [b"\0" * n for n in range(8)]
KEEP_CONN = 1


class RecordType(IntEnum):
    BEGIN_REQUEST = 1
    ABORT_REQUEST = 2
    END_REQUEST = 3
    PARAMS = 4
    STDIN = 5
    STDOUT = 6
    STDERR = 7
    DATA = 8
    GET_VALUES = 9
    GET_VALUES_RESULT = 10
    UNKNOWN_TYPE = 11


class Role(IntEnum):
    RESPONDER = 1
    AUTHORIZER = 2
    FILTER = 3


class ProtocolStatus(IntEnum):
    REQUEST_COMPLETE = 0
    CANT_MPX_CONN = 1
    OVERLOADED = 2
    UNKNOWN_ROLE = 3


class ProtocolError(Exception):
    """The peer sent bytes that are not valid FastCGI; the connection must be closed."""


# --------------------------------------------------------------------------- encoding


def encode_record(rtype: int, request_id: int, content: bytes = b"") -> bytes:
    """One record; ``content`` must fit in 65535 bytes. Padded to a multiple of 8."""
    length = len(content)
    pad = -length & 7
    return HEADER.pack(VERSION, rtype, request_id, length, pad) + content + _PADDING[pad]


def encode_stream(rtype: int, request_id: int, data: bytes) -> bytes:
    """``data`` as records of a stream type, without the empty end-of-stream record."""
    if len(data) <= MAX_CONTENT:
        return encode_record(rtype, request_id, data) if data else b""
    view = memoryview(data)
    return b"".join(
        encode_record(rtype, request_id, bytes(view[i : i + MAX_CONTENT]))
        for i in range(0, len(data), MAX_CONTENT)
    )


def _encode_length(n: int) -> bytes:
    return bytes((n,)) if n < 128 else _LEN4.pack(n | 0x80000000)


def encode_pairs(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Name-value pairs with 1-byte lengths below 128 and 4-byte lengths otherwise."""
    out = bytearray()
    for name, value in pairs:
        out += _encode_length(len(name))
        out += _encode_length(len(value))
        out += name
        out += value
    return bytes(out)


def decode_pairs(data: bytes) -> dict[bytes, bytes]:
    """Inverse of :func:`encode_pairs`; a truncated pair is a :class:`ProtocolError`.

    The fast path runs on every request; a malformed stream is decoded again by the
    careful decoder, which names the problem.
    """
    pairs: dict[bytes, bytes] = {}
    pos, end = 0, len(data)
    try:
        while pos < end:
            name_len = data[pos]
            value_len = data[pos + 1]
            if name_len < 128 and value_len < 128:  # the short forms: nearly every pair
                middle = pos + 2 + name_len
                stop = middle + value_len
                pairs[data[pos + 2 : middle]] = data[middle:stop]
                pos = stop
                continue
            if name_len >= 128:
                name_len = _LEN4.unpack_from(data, pos)[0] & 0x7FFFFFFF
                value_len = data[pos + 4]
                pos += 5
            else:
                pos += 2
            if value_len >= 128:
                value_len = _LEN4.unpack_from(data, pos - 1)[0] & 0x7FFFFFFF
                pos += 3
            middle = pos + name_len
            stop = middle + value_len
            pairs[data[pos:middle]] = data[middle:stop]
            pos = stop
    except (IndexError, struct.error):
        pass
    if pos == end:  # a pair longer than the stream made ``pos`` overshoot
        return pairs
    return _decode_pairs_checked(data)


def _decode_pairs_checked(data: bytes) -> dict[bytes, bytes]:
    """The careful decoder: slower, but says exactly what is wrong."""
    pairs: dict[bytes, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        lengths = []
        for _ in range(2):
            if pos >= end:
                raise ProtocolError("truncated name-value length")
            first = data[pos]
            if first < 128:
                lengths.append(first)
                pos += 1
            else:
                if pos + 4 > end:
                    raise ProtocolError("truncated 4-byte name-value length")
                lengths.append(_LEN4.unpack_from(data, pos)[0] & 0x7FFFFFFF)
                pos += 4
        name_len, value_len = lengths
        if pos + name_len + value_len > end:
            raise ProtocolError("name-value pair longer than its record stream")
        name = bytes(data[pos : pos + name_len])
        pos += name_len
        pairs[name] = bytes(data[pos : pos + value_len])
        pos += value_len
    return pairs


def encode_params(request_id: int, params: Mapping[bytes, bytes] | bytes) -> bytes:
    """PARAMS records plus the empty one that ends the stream. Raw encoded pairs pass as is."""
    body = bytes(params) if isinstance(params, (bytes, bytearray)) else encode_pairs(params.items())
    length = len(body)
    if not length or length > MAX_CONTENT:
        return encode_stream(_PARAMS, request_id, body) + encode_record(_PARAMS, request_id)
    pad = -length & 7
    return b"".join((
        HEADER.pack(VERSION, _PARAMS, request_id, length, pad), body, _PADDING[pad],
        HEADER.pack(VERSION, _PARAMS, request_id, 0, 0),
    ))  # fmt: skip


def encode_begin_request(
    request_id: int, role: int = Role.RESPONDER, keep_conn: bool = False
) -> bytes:
    body = _BEGIN_BODY.pack(role, KEEP_CONN if keep_conn else 0)
    return encode_record(RecordType.BEGIN_REQUEST, request_id, body)


def encode_end_request(
    request_id: int, app_status: int = 0, protocol_status: int = ProtocolStatus.REQUEST_COMPLETE
) -> bytes:
    body = _END_BODY.pack(app_status & 0xFFFFFFFF, protocol_status)
    return encode_record(RecordType.END_REQUEST, request_id, body)


def encode_get_values_result(values: Mapping[bytes, bytes]) -> bytes:
    return encode_record(RecordType.GET_VALUES_RESULT, 0, encode_pairs(values.items()))


def encode_unknown_type(rtype: int) -> bytes:
    return encode_record(RecordType.UNKNOWN_TYPE, 0, bytes((rtype,)) + b"\0" * 7)


def encode_request(
    request_id: int,
    params: Mapping[bytes, bytes],
    body: bytes = b"",
    keep_conn: bool = False,
) -> bytes:
    """A whole RESPONDER request, as a web server would send it."""
    return (
        encode_begin_request(request_id, Role.RESPONDER, keep_conn)
        + encode_params(request_id, params)
        + encode_stream(RecordType.STDIN, request_id, body)
        + encode_record(RecordType.STDIN, request_id)
    )


_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    413: "Content Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def encode_response(
    request_id: int,
    status: int,
    body: bytes = b"",
    headers: Iterable[tuple[str, str]] = (),
    content_type: str = "text/plain; charset=utf-8",
) -> bytes:
    """A complete response the pool writes itself (503, 504, 413, ...), END_REQUEST included."""
    head = [f"Status: {status} {_REASONS.get(status, '')}".rstrip()]
    head.append(f"Content-Type: {content_type}")
    head.append(f"Content-Length: {len(body)}")
    head.extend(f"{name}: {value}" for name, value in headers)
    stdout = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    return (
        encode_stream(RecordType.STDOUT, request_id, stdout)
        + encode_record(RecordType.STDOUT, request_id)
        + encode_end_request(request_id, 0 if status < 500 else 1)
    )


# --------------------------------------------------------------------------- decoding


class RecordReader:
    """Splits a byte stream into ``(type, request_id, content)`` records.

    Only the framing is checked here. At most one incomplete record is held, so the buffer
    is bounded by the largest record: 8 + 65535 + 255 bytes.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    @property
    def pending(self) -> int:
        """Bytes held that do not yet make a whole record."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buffer = self._buffer + data if self._buffer else data
        records = []
        pos, end = 0, len(buffer)
        unpack = HEADER.unpack_from
        while end - pos >= 8:
            version, rtype, request_id, length, pad = unpack(buffer, pos)
            if version != VERSION:
                raise ProtocolError(f"unsupported FastCGI version {version}")
            stop = pos + 8 + length
            if stop + pad > end:
                break
            records.append((rtype, request_id, buffer[pos + 8 : stop]))
            pos = stop + pad
        self._buffer = buffer[pos:] if pos < end else b""
        return records


# Plain ints for the hot loops: an IntEnum member lookup costs more than the comparison.
_STDIN, _PARAMS, _BEGIN = (
    int(RecordType.STDIN),
    int(RecordType.PARAMS),
    int(RecordType.BEGIN_REQUEST),
)
_STDOUT, _STDERR, _END = int(RecordType.STDOUT), int(RecordType.STDERR), int(RecordType.END_REQUEST)

# Events. Small frozen-free classes with slots: they are made on the hot path.


@dataclass(slots=True)
class BeginRequest:
    request_id: int
    role: int
    keep_conn: bool


@dataclass(slots=True)
class Params:
    """The whole PARAMS stream of a request, decoded once it ended."""

    request_id: int
    params: dict[bytes, bytes]
    raw: bytes


@dataclass(slots=True)
class Stdin:
    """A piece of the request body; ``data == b""`` marks its end."""

    request_id: int
    data: bytes


@dataclass(slots=True)
class Data:
    request_id: int
    data: bytes


@dataclass(slots=True)
class AbortRequest:
    request_id: int


@dataclass(slots=True)
class GetValues:
    names: list[bytes]


@dataclass(slots=True)
class UnknownManagementType:
    """A management record of a type this codec does not know; answer UNKNOWN_TYPE."""

    rtype: int


@dataclass(slots=True)
class Stdout:
    """A piece of the response; ``data == b""`` marks the end of the stream."""

    request_id: int
    data: bytes


@dataclass(slots=True)
class Stderr:
    request_id: int
    data: bytes


@dataclass(slots=True)
class EndRequest:
    request_id: int
    app_status: int
    protocol_status: int


@dataclass(slots=True)
class GetValuesResult:
    values: dict[bytes, bytes]


@dataclass(slots=True)
class UnknownTypeResult:
    rtype: int


Event = (
    BeginRequest
    | Params
    | Stdin
    | Data
    | AbortRequest
    | GetValues
    | UnknownManagementType
    | Stdout
    | Stderr
    | EndRequest
    | GetValuesResult
    | UnknownTypeResult
)

_MANAGEMENT_FROM_CLIENT = (RecordType.GET_VALUES,)


class ServerConnection:
    """The application side of one connection: what the pool is to nginx or Apache.

    A request id is *active* from its BEGIN_REQUEST until this codec encodes the
    END_REQUEST that ends it (:meth:`respond`, :meth:`relay` or :meth:`end`), so nobody
    has to remember to release it, and nothing can end a request twice: a record encoded
    for an id that is not active comes out empty. An id whose PARAMS or STDIN stream is
    still open is *receiving*; what still arrives for it after its end is dropped, and a
    new BEGIN_REQUEST may reuse the id. PARAMS are reassembled up to ``max_params`` bytes;
    anything malformed raises :class:`ProtocolError`.
    """

    __slots__ = ("_buffer", "_params", "active", "max_params", "receiving")

    def __init__(self, max_params: int = 1 << 20) -> None:
        self._buffer = b""  # at most one incomplete record
        self._params: dict[int, bytes | bytearray | None] = {}  # None: PARAMS ended
        self.active: set[int] = set()
        self.receiving: set[int] = set()  # PARAMS or STDIN not ended yet
        self.max_params = max_params

    def feed(self, data: bytes) -> list[Event]:
        """Events of the whole records in what came so far (the framing of RecordReader,
        in the same loop: this runs for every request)."""
        buffer = self._buffer + data if self._buffer else data
        events: list[Event] = []
        active = self.active
        pos, end = 0, len(buffer)
        unpack = HEADER.unpack_from
        while end - pos >= 8:
            version, rtype, request_id, length, pad = unpack(buffer, pos)
            if version != VERSION:
                raise ProtocolError(f"unsupported FastCGI version {version}")
            start = pos + 8
            stop = start + length
            if stop + pad > end:
                break
            pos = stop + pad
            content = buffer[start:stop] if length else b""
            if rtype == _PARAMS and request_id:
                parts = self._params.get(request_id)
                if parts is None:  # not begun, or ended: dropped, unless it says more
                    if request_id in active and length:
                        raise ProtocolError(f"PARAMS after the end of the stream, id {request_id}")
                elif length:
                    if not parts:  # the first record is kept as it came: most send one
                        parts = content
                    else:  # a running buffer, not a list summed on every record (quadratic)
                        if isinstance(parts, bytes):
                            parts = bytearray(parts)
                        parts += content
                    if len(parts) > self.max_params:
                        raise ProtocolError(f"PARAMS larger than {self.max_params} bytes")
                    self._params[request_id] = parts
                else:
                    self._params[request_id] = None
                    raw = bytes(parts)
                    events.append(Params(request_id, decode_pairs(raw), raw))
            elif rtype == _STDIN and request_id:
                if request_id in active:
                    if self._params.get(request_id) is not None:
                        raise ProtocolError(f"STDIN before the end of PARAMS, id {request_id}")
                    events.append(Stdin(request_id, content))
                if not length:
                    self.receiving.discard(request_id)
            elif request_id == 0:
                events.append(self._management(rtype, content))
            elif rtype == _BEGIN:
                events.append(self._begin(request_id, content))
            elif rtype == RecordType.ABORT_REQUEST:
                self.receiving.discard(request_id)  # the web server sends no more of it
                if request_id in active:
                    events.append(AbortRequest(request_id))
            elif rtype == RecordType.DATA:
                if request_id in active:
                    events.append(Data(request_id, content))
            else:
                raise ProtocolError(f"record type {rtype} is not sent by a web server")
        self._buffer = buffer[pos:] if pos < end else b""
        return events

    # Encoding what ends a request: each marks its id free for reuse.

    def end(
        self,
        request_id: int,
        app_status: int = 0,
        protocol_status: int = ProtocolStatus.REQUEST_COMPLETE,
    ) -> bytes:
        """END_REQUEST alone (an ABORT_REQUEST answered, a role refused)."""
        if not self._ended(request_id):
            return b""
        return encode_end_request(request_id, app_status, protocol_status)

    def respond(
        self,
        request_id: int,
        status: int,
        body: bytes = b"",
        headers: Iterable[tuple[str, str]] = (),
        content_type: str = "text/plain; charset=utf-8",
    ) -> bytes:
        """A whole answer from the pool itself (503, 504, 413...), END_REQUEST included."""
        if not self._ended(request_id):
            return b""
        return encode_response(request_id, status, body, headers, content_type)

    def relay(self, request_id: int, records: bytes, starts: list[int], ended: bool) -> bytes:
        """A child's whole records (see :class:`ResponseScanner`) for ``request_id``; with
        ``ended`` their last one is the END_REQUEST that ends it."""
        if request_id not in self.active:
            return b""
        if ended:
            self._ended(request_id)
        return records if request_id == 1 else retag(records, starts, request_id)

    def _ended(self, request_id: int) -> bool:
        if request_id not in self.active:
            return False
        self.active.discard(request_id)
        self._params.pop(request_id, None)
        return True

    # Decoding.

    def _management(self, rtype: int, content: bytes) -> Event:
        if rtype == RecordType.GET_VALUES:
            return GetValues(list(decode_pairs(content)))
        if rtype in RecordType.__members__.values():
            raise ProtocolError(f"record type {rtype} is not a management record")
        return UnknownManagementType(rtype)

    def _begin(self, request_id: int, content: bytes) -> BeginRequest:
        if len(content) != 8:
            raise ProtocolError(f"BEGIN_REQUEST body is {len(content)} bytes, not 8")
        if request_id in self.active:
            raise ProtocolError(f"BEGIN_REQUEST for active request id {request_id}")
        role, flags = _BEGIN_BODY.unpack(content)
        self.active.add(request_id)
        self.receiving.add(request_id)
        self._params[request_id] = b""
        return BeginRequest(request_id, role, bool(flags & KEEP_CONN))


class ClientConnection:
    """The web-server side of one connection, as events: what `fcgipool request` and the
    tests use to read an answer (the pool itself reads children with ResponseScanner)."""

    __slots__ = ("_reader",)

    def __init__(self) -> None:
        self._reader = RecordReader()

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        for rtype, request_id, content in self._reader.feed(data):
            if rtype == RecordType.STDOUT:
                events.append(Stdout(request_id, content))
            elif rtype == RecordType.END_REQUEST:
                if len(content) != 8:
                    raise ProtocolError(f"END_REQUEST body is {len(content)} bytes, not 8")
                app_status, protocol_status = _END_BODY.unpack(content)
                events.append(EndRequest(request_id, app_status, protocol_status))
            elif rtype == RecordType.STDERR:
                events.append(Stderr(request_id, content))
            elif rtype == RecordType.GET_VALUES_RESULT:
                events.append(GetValuesResult(decode_pairs(content)))
            elif rtype == RecordType.UNKNOWN_TYPE:
                if len(content) != 8:
                    raise ProtocolError("UNKNOWN_TYPE body is not 8 bytes")
                events.append(UnknownTypeResult(content[0]))
            else:
                raise ProtocolError(f"record type {rtype} is not sent by an application")
        return events


class ResponseScanner:
    """The pool's fast path for a child's answer: whole records are checked, not copied apart.

    ``feed`` returns the bytes of the complete records received so far, ready to forward
    as they are (only the request id in each header may need rewriting, see
    :func:`retag`), whether any of them carried response bytes, and the END_REQUEST that
    closes the response, if it came. A record after END_REQUEST is a protocol error: a
    child answers one request at a time.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> tuple[bytes, list[int], bool, EndRequest | None]:
        buffer = self._buffer + data if self._buffer else data
        pos, end = 0, len(buffer)
        starts: list[int] = []
        has_output = False
        finished: EndRequest | None = None
        unpack = HEADER.unpack_from
        while end - pos >= 8:
            version, rtype, request_id, length, pad = unpack(buffer, pos)
            if version != VERSION:
                raise ProtocolError(f"unsupported FastCGI version {version}")
            stop = pos + 8 + length + pad
            if stop > end:
                break
            if finished is not None:
                raise ProtocolError("record after END_REQUEST")
            if rtype == _STDOUT:
                has_output = has_output or length > 0
            elif rtype == _END:
                if length != 8:
                    raise ProtocolError(f"END_REQUEST body is {length} bytes, not 8")
                app_status, protocol_status = _END_BODY.unpack_from(buffer, pos + 8)
                finished = EndRequest(request_id, app_status, protocol_status)
            elif rtype != _STDERR:
                raise ProtocolError(f"record type {rtype} is not part of a response")
            starts.append(pos)
            pos = stop
        if finished is not None and pos < end:
            # Even an incomplete one: kept, it would be completed by the next read and
            # handed to the next request sent on this connection.
            raise ProtocolError("record after END_REQUEST")
        self._buffer = buffer[pos:] if pos < end else b""
        return (buffer[:pos] if pos < end else buffer), starts, has_output, finished


def stdout_content(records: bytes, starts: list[int], limit: int = 1 << 30) -> bytes:
    """The STDOUT bytes carried by whole ``records`` (as returned by ResponseScanner), at
    least the first ``limit`` of them when there are more (the pool reads only the head)."""
    parts = []
    size = 0
    for start in starts:
        if records[start + 1] == _STDOUT:
            length = (records[start + 4] << 8) | records[start + 5]
            parts.append(records[start + 8 : start + 8 + length])
            size += length
            if size >= limit:
                break
    return b"".join(parts)


def retag(records: bytes, starts: list[int], request_id: int) -> bytes:
    """``records`` with the request id of every header (at ``starts``) set to ``request_id``."""
    out = bytearray(records)
    high, low = request_id >> 8, request_id & 0xFF
    for start in starts:
        out[start + 2] = high
        out[start + 3] = low
    return bytes(out)
