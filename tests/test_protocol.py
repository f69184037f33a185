"""Tests of the sans-IO FastCGI codec (fcgipool/protocol.py) against the FastCGI 1.0 spec.

Expected bytes are written by hand (or with :func:`rec`, which builds a record from the spec's
header layout without using the codec), so an encoder bug cannot hide behind a decoder bug.
Property tests run derandomized, so every run tries the same examples.
"""

from __future__ import annotations

import itertools
import random
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcgipool.protocol import (
    _END_BODY,
    HEADER,
    MAX_CONTENT,
    AbortRequest,
    BeginRequest,
    ClientConnection,
    Data,
    EndRequest,
    GetValues,
    GetValuesResult,
    Params,
    ProtocolError,
    ProtocolStatus,
    RecordReader,
    RecordType,
    ResponseScanner,
    Role,
    ServerConnection,
    Stderr,
    Stdin,
    Stdout,
    UnknownManagementType,
    UnknownTypeResult,
    decode_pairs,
    encode_begin_request,
    encode_end_request,
    encode_get_values_result,
    encode_pairs,
    encode_params,
    encode_record,
    encode_request,
    encode_response,
    encode_stream,
    encode_unknown_type,
    retag,
    stdout_content,
)

CORPUS = Path(__file__).parent / "corpus"
MAX_RECORD = 8 + 0xFFFF + 255  # header + largest content + largest padding

EVENT_TYPES = (
    BeginRequest,
    Params,
    Stdin,
    Data,
    AbortRequest,
    GetValues,
    UnknownManagementType,
    Stdout,
    Stderr,
    EndRequest,
    GetValuesResult,
    UnknownTypeResult,
)

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HEAVY = settings(PROPERTY, max_examples=60)

# Type numbers from the spec, spelled out so a wrong enum value would show.
BEGIN, ABORT, END, PARAMS, STDIN, STDOUT, STDERR, DATA = 1, 2, 3, 4, 5, 6, 7, 8
GET_VALUES, GET_VALUES_RESULT, UNKNOWN_TYPE = 9, 10, 11


# --------------------------------------------------------------------------- helpers


def rec(rtype: int, request_id: int, content: bytes = b"", pad: int | None = None) -> bytes:
    """A record laid out by hand from the spec; padding to a multiple of 8 by default."""
    length = len(content)
    if pad is None:
        pad = (8 - length % 8) % 8
    header = bytes(
        [1, rtype, request_id >> 8, request_id & 0xFF, length >> 8, length & 0xFF, pad, 0]
    )
    return header + content + b"\0" * pad


def begin_body(role: int = 1, flags: int = 0) -> bytes:
    return bytes([role >> 8, role & 0xFF, flags, 0, 0, 0, 0, 0])


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at the positions ``cuts`` (taken modulo its length + 1)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def feed_all(conn, pieces) -> list:
    events = []
    for piece in pieces:
        events.extend(conn.feed(piece))
    return events


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def of(kind, events) -> list:
    return [e for e in events if type(e) is kind]


def stdin_body(events, request_id: int) -> bytes:
    return b"".join(e.data for e in events if type(e) is Stdin and e.request_id == request_id)


def blob_of(size: int, pattern: bytes) -> bytes:
    return (pattern * (size // len(pattern) + 1))[:size]


BOUNDARY_SIZES = [0, 1, 7, 8, 126, 127, 128, 129, 255, 256, 4096, 65534, 65535, 65536, 70000]

# Byte strings with lengths around the 1-/4-byte length switch and the record size, cheap to
# generate because the big ones are a short random pattern repeated.
sized_blob = st.builds(blob_of, st.sampled_from(BOUNDARY_SIZES), st.binary(min_size=1, max_size=16))
blob = st.one_of(st.binary(max_size=200), sized_blob)
small_blob = st.one_of(
    st.binary(max_size=40),
    st.builds(blob_of, st.sampled_from([126, 127, 128, 129]), st.binary(min_size=1, max_size=4)),
)
cut_points = st.lists(st.integers(min_value=0, max_value=1 << 24), max_size=24)


# --------------------------------------------------------------------------- encode_record


def test_encode_record_layout_matches_spec() -> None:
    assert encode_record(RecordType.STDOUT, 1, b"hello") == (
        b"\x01\x06\x00\x01\x00\x05\x03\x00" + b"hello" + b"\0\0\0"
    )


def test_encode_record_empty_has_no_padding() -> None:
    assert encode_record(RecordType.PARAMS, 0x0102) == b"\x01\x04\x01\x02\x00\x00\x00\x00"


def test_encode_record_request_id_and_length_are_big_endian() -> None:
    record = encode_record(RecordType.STDIN, 0xFFFF, b"x" * 0x1234)
    assert record[:8] == b"\x01\x05\xff\xff\x12\x34\x04\x00"


@pytest.mark.parametrize("length", [0, 1, 2, 7, 8, 9, 15, 16, 17, 1000, 65528, 65534, 65535])
def test_encode_record_pads_to_a_multiple_of_8(length: int) -> None:
    content = bytes(i & 0xFF for i in range(length))
    record = encode_record(RecordType.STDOUT, 3, content)
    version, rtype, request_id, clen, pad = HEADER.unpack_from(record)
    assert (version, rtype, request_id, clen) == (1, STDOUT, 3, length)
    assert len(record) % 8 == 0
    assert (length + pad) % 8 == 0
    assert pad == (8 - length % 8) % 8
    assert len(record) == 8 + length + pad
    assert record[8 : 8 + length] == content
    assert record[8 + length :] == b"\0" * pad
    assert record[7] == 0  # reserved byte


# --------------------------------------------------------------------------- encode_stream


def test_encode_stream_empty_is_nothing() -> None:
    assert encode_stream(RecordType.STDOUT, 1, b"") == b""


def test_encode_stream_small_is_one_record() -> None:
    assert encode_stream(RecordType.STDIN, 2, b"abc") == rec(STDIN, 2, b"abc")


def test_encode_stream_65535_is_one_record() -> None:
    data = bytes(range(256)) * 255 + bytes(range(255))
    assert len(data) == 65535
    assert encode_stream(RecordType.STDOUT, 1, data) == rec(STDOUT, 1, data)


def test_encode_stream_65536_splits_at_65535() -> None:
    data = blob_of(65536, b"0123456789abcdefg")
    assert encode_stream(RecordType.STDOUT, 9, data) == (
        rec(STDOUT, 9, data[:65535]) + rec(STDOUT, 9, data[65535:])
    )


def test_encode_stream_many_records() -> None:
    data = blob_of(3 * MAX_CONTENT + 10, b"pattern!")
    encoded = encode_stream(RecordType.STDERR, 7, bytearray(data))
    assert isinstance(encoded, bytes)
    records = RecordReader().feed(encoded)
    assert [len(c) for _, _, c in records] == [65535, 65535, 65535, 10]
    assert all(t == STDERR and i == 7 for t, i, _ in records)
    assert b"".join(c for _, _, c in records) == data
    assert encoded[:8] == b"\x01\x07\x00\x07\xff\xff\x01\x00"


# --------------------------------------------------------------------------- name-value pairs


@pytest.mark.parametrize(
    ("length", "prefix"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (127, b"\x7f"),
        (128, b"\x80\x00\x00\x80"),
        (255, b"\x80\x00\x00\xff"),
        (65535, b"\x80\x00\xff\xff"),
        (65536, b"\x80\x01\x00\x00"),
        (70000, b"\x80\x01\x11\x70"),
    ],
)
def test_pair_length_encoding(length: int, prefix: bytes) -> None:
    name = blob_of(length, b"N")
    value = blob_of(length, b"v")
    assert encode_pairs([(name, b"")]) == prefix + b"\x00" + name
    assert encode_pairs([(b"", value)]) == b"\x00" + prefix + value
    assert encode_pairs([(name, value)]) == prefix + prefix + name + value
    assert decode_pairs(prefix + prefix + name + value) == {name: value}


def test_pairs_spec_examples() -> None:
    encoded = encode_pairs([(b"FCGI_MAX_CONNS", b""), (b"SCRIPT_NAME", b"/ows")])
    assert encoded == b"\x0e\x00FCGI_MAX_CONNS\x0b\x04SCRIPT_NAME/ows"
    assert decode_pairs(encoded) == {b"FCGI_MAX_CONNS": b"", b"SCRIPT_NAME": b"/ows"}


def test_decode_pairs_keeps_order() -> None:
    pairs = [(bytes([65 + i]) * (i + 1), bytes([97 + i]) * (130 - i)) for i in range(10)]
    assert list(decode_pairs(encode_pairs(pairs)).items()) == pairs


def test_decode_pairs_empty() -> None:
    assert decode_pairs(b"") == {}


def test_decode_pairs_accepts_4_byte_form_of_small_lengths() -> None:
    # The spec allows the 4-byte form for any length; only the top bit marks it.
    assert decode_pairs(b"\x80\x00\x00\x01\x80\x00\x00\x02abc") == {b"a": b"bc"}
    assert decode_pairs(b"\x80\x00\x00\x00\x00") == {b"": b""}


def test_decode_pairs_binary_names_and_values() -> None:
    name, value = bytes(range(256)), b"\xff\x00\xfe\r\n"
    assert decode_pairs(encode_pairs([(name, value)])) == {name: value}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01", "truncated name-value length"),
        (b"\x80", "truncated 4-byte"),
        (b"\x80\x00\x00", "truncated 4-byte"),
        (b"\x01\x80\x00\x00", "truncated 4-byte"),
        (b"\x01\x01a", "longer than"),
        (b"\x05\x00abcd", "longer than"),
        (b"\x00\x05abcd", "longer than"),
        (b"\xff\xff\xff\xff\x00" + b"x" * 100, "longer than"),
        (b"\x00\xff\xff\xff\xff", "longer than"),
        (b"\x01\x01ab\x02", "truncated name-value length"),
    ],
)
def test_decode_pairs_malformed(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_pairs(data)


# --------------------------------------------------------------------------- typed records


def test_encode_params_ends_the_stream() -> None:
    assert encode_params(3, {b"A": b"bc"}) == rec(PARAMS, 3, b"\x01\x02Abc") + rec(PARAMS, 3)


def test_encode_params_passes_raw_bytes() -> None:
    raw = b"\x01\x01ab\x01\x01cd"
    assert encode_params(1, raw) == rec(PARAMS, 1, raw) + rec(PARAMS, 1)
    assert encode_params(1, bytearray(raw)) == rec(PARAMS, 1, raw) + rec(PARAMS, 1)


def test_encode_params_empty() -> None:
    assert encode_params(1, {}) == rec(PARAMS, 1)


def test_encode_params_larger_than_one_record() -> None:
    params = {b"BIG": blob_of(70000, b"q"), b"SMALL": b"1"}
    raw = encode_pairs(params.items())
    assert encode_params(5, params) == (
        rec(PARAMS, 5, raw[:65535]) + rec(PARAMS, 5, raw[65535:]) + rec(PARAMS, 5)
    )


def test_encode_begin_request_layout() -> None:
    assert encode_begin_request(1) == (
        b"\x01\x01\x00\x01\x00\x08\x00\x00" + b"\x00\x01\x00\x00\x00\x00\x00\x00"
    )


def test_encode_begin_request_keep_conn_and_role() -> None:
    assert encode_begin_request(0xBEEF, Role.FILTER, keep_conn=True) == (
        b"\x01\x01\xbe\xef\x00\x08\x00\x00" + b"\x00\x03\x01\x00\x00\x00\x00\x00"
    )
    assert encode_begin_request(2, Role.AUTHORIZER)[8:] == b"\x00\x02\x00\x00\x00\x00\x00\x00"


def test_encode_end_request_layout() -> None:
    assert encode_end_request(1) == b"\x01\x03\x00\x01\x00\x08\x00\x00" + b"\0" * 8
    assert encode_end_request(0x0102, 0x01020304, ProtocolStatus.OVERLOADED) == (
        b"\x01\x03\x01\x02\x00\x08\x00\x00" + b"\x01\x02\x03\x04\x02\x00\x00\x00"
    )


def test_encode_end_request_negative_app_status_wraps_to_32_bits() -> None:
    assert encode_end_request(1, -1, ProtocolStatus.UNKNOWN_ROLE)[8:] == (
        b"\xff\xff\xff\xff\x03\x00\x00\x00"
    )
    assert encode_end_request(1, 2, ProtocolStatus.CANT_MPX_CONN)[8:] == (
        b"\x00\x00\x00\x02\x01\x00\x00\x00"
    )


def test_encode_get_values_result_layout() -> None:
    values = {b"FCGI_MAX_CONNS": b"10", b"FCGI_MPXS_CONNS": b"1"}
    content = b"\x0e\x02FCGI_MAX_CONNS10" + b"\x0f\x01FCGI_MPXS_CONNS1"
    assert len(content) == 36
    assert encode_get_values_result(values) == (
        b"\x01\x0a\x00\x00\x00\x24\x04\x00" + content + b"\0" * 4
    )


def test_encode_get_values_result_empty() -> None:
    assert encode_get_values_result({}) == b"\x01\x0a\x00\x00\x00\x00\x00\x00"


def test_encode_unknown_type_layout() -> None:
    assert encode_unknown_type(42) == (
        b"\x01\x0b\x00\x00\x00\x08\x00\x00" + b"\x2a\x00\x00\x00\x00\x00\x00\x00"
    )
    assert encode_unknown_type(255)[8] == 255


def test_encode_request_layout() -> None:
    assert encode_request(1, {b"A": b"b"}, b"xy") == (
        rec(BEGIN, 1, begin_body(1, 0))
        + rec(PARAMS, 1, b"\x01\x01Ab")
        + rec(PARAMS, 1)
        + rec(STDIN, 1, b"xy")
        + rec(STDIN, 1)
    )


def test_encode_request_keep_conn_empty_body() -> None:
    assert encode_request(0x0203, {}, keep_conn=True) == (
        rec(BEGIN, 0x0203, begin_body(1, 1)) + rec(PARAMS, 0x0203) + rec(STDIN, 0x0203)
    )


def test_encode_request_large_body_split() -> None:
    body = blob_of(65536, b"body")
    encoded = encode_request(4, {b"K": b"V"}, body)
    assert encoded.endswith(
        rec(STDIN, 4, body[:65535]) + rec(STDIN, 4, body[65535:]) + rec(STDIN, 4)
    )


def test_encode_response_503_layout() -> None:
    stdout = (
        b"Status: 503 Service Unavailable\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 5\r\n"
        b"Retry-After: 5\r\n"
        b"\r\n"
        b"busy\n"
    )
    expected = (
        rec(STDOUT, 7, stdout) + rec(STDOUT, 7) + rec(END, 7, b"\x00\x00\x00\x01\x00\x00\x00\x00")
    )
    assert encode_response(7, 503, b"busy\n", [("Retry-After", "5")]) == expected


def test_encode_response_4xx_has_app_status_0() -> None:
    stdout = (
        b"Status: 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )
    assert encode_response(1, 404, b"{}", content_type="application/json") == (
        rec(STDOUT, 1, stdout) + rec(STDOUT, 1) + rec(END, 1, b"\0" * 8)
    )


def test_encode_response_unknown_status_has_no_reason() -> None:
    events = ClientConnection().feed(encode_response(1, 299))
    assert events[0].data.startswith(b"Status: 299\r\nContent-Type: ")
    assert events[-1] == EndRequest(1, 0, 0)


@pytest.mark.parametrize(("status", "app_status"), [(200, 0), (499, 0), (500, 1), (599, 1)])
def test_encode_response_app_status_marks_server_errors(status: int, app_status: int) -> None:
    assert encode_response(1, status)[-16:] == (
        b"\x01\x03\x00\x01\x00\x08\x00\x00" + bytes([0, 0, 0, app_status]) + b"\0" * 4
    )


def test_encode_response_large_body_through_client_connection() -> None:
    body = blob_of(100_000, b"0123456789")
    events = ClientConnection().feed(encode_response(3, 504, body))
    stdout = of(Stdout, events)
    assert [len(e.data) > 0 for e in stdout] == [True, True, False]
    head, _, rest = b"".join(e.data for e in stdout).partition(b"\r\n\r\n")
    assert rest == body
    assert head.split(b"\r\n")[0] == b"Status: 504 Gateway Timeout"
    assert b"Content-Length: 100000" in head.split(b"\r\n")
    assert events[-1] == EndRequest(3, 1, ProtocolStatus.REQUEST_COMPLETE)


# --------------------------------------------------------------------------- RecordReader


def test_record_reader_splits_records_and_keeps_partial() -> None:
    reader = RecordReader()
    data = rec(STDOUT, 1, b"abc") + rec(STDERR, 2, b"defgh", pad=255) + rec(END, 1, b"\0" * 8)
    assert reader.feed(data[:5]) == []
    assert reader.pending == 5
    assert reader.feed(data[5:16]) == [(STDOUT, 1, b"abc")]
    assert reader.pending == 0
    assert reader.feed(data[16:30]) == []
    assert reader.pending == 14
    assert reader.feed(data[30:]) == [(STDERR, 2, b"defgh"), (END, 1, b"\0" * 8)]
    assert reader.pending == 0


def test_record_reader_accepts_any_padding() -> None:
    data = rec(STDIN, 1, b"x", pad=0) + rec(STDIN, 1, b"yz", pad=17) + rec(STDIN, 1, pad=255)
    assert RecordReader().feed(data) == [(STDIN, 1, b"x"), (STDIN, 1, b"yz"), (STDIN, 1, b"")]


def test_record_reader_waits_for_padding() -> None:
    reader = RecordReader()
    data = rec(STDIN, 1, b"x", pad=10)
    assert reader.feed(data[:-1]) == []
    assert reader.pending == len(data) - 1
    assert reader.feed(data[-1:]) == [(STDIN, 1, b"x")]


def test_record_reader_rejects_other_versions() -> None:
    for version in (0, 2, 255):
        with pytest.raises(ProtocolError, match=f"version {version}"):
            RecordReader().feed(bytes([version]) + rec(STDIN, 1)[1:])


def test_record_reader_bytewise_largest_record() -> None:
    data = rec(STDOUT, 1, blob_of(65535, b"z"), pad=255)
    assert len(data) == MAX_RECORD
    reader = RecordReader()
    for i in range(len(data) - 1):
        assert reader.feed(data[i : i + 1]) == []
        assert reader.pending == i + 1
    assert reader.feed(data[-1:]) == [(STDOUT, 1, blob_of(65535, b"z"))]
    assert reader.pending == 0


# --------------------------------------------------------------------------- ServerConnection

PARAMS_1 = {
    b"SCRIPT_NAME": b"/ows",
    b"QUERY_STRING": b"SERVICE=WMS&REQUEST=GetCapabilities",
    b"REQUEST_METHOD": b"POST",
    b"LONG": blob_of(300, b"long value "),
}


def test_server_whole_request() -> None:
    conn = ServerConnection()
    events = conn.feed(encode_request(1, PARAMS_1, b"hello body"))
    raw = encode_pairs(PARAMS_1.items())
    assert events == [
        BeginRequest(1, Role.RESPONDER, False),
        Params(1, PARAMS_1, raw),
        Stdin(1, b"hello body"),
        Stdin(1, b""),
    ]
    assert conn.active == {1}


def test_server_request_fed_byte_by_byte() -> None:
    data = encode_request(1, PARAMS_1, b"hello body", keep_conn=True)
    expected = ServerConnection().feed(data)
    assert feed_all(ServerConnection(), bytewise(data)) == expected


def test_server_params_split_across_many_records() -> None:
    raw = encode_pairs(PARAMS_1.items())
    pieces = [raw[i : i + 3] for i in range(0, len(raw), 3)]
    data = rec(BEGIN, 5, begin_body()) + b"".join(rec(PARAMS, 5, p) for p in pieces)
    conn = ServerConnection()
    assert conn.feed(data) == [BeginRequest(5, Role.RESPONDER, False)]
    # No Params event until the empty record ends the stream.
    assert conn.feed(rec(PARAMS, 5)) == [Params(5, PARAMS_1, raw)]


def test_server_params_4_byte_length_split_between_records() -> None:
    value = blob_of(200, b"v")
    raw = b"\x01\x80\x00\x00\xc8" + b"K" + value  # value length 200 in 4 bytes
    data = (
        rec(BEGIN, 1, begin_body())
        + rec(PARAMS, 1, raw[:2])
        + rec(PARAMS, 1, raw[2:4])
        + rec(PARAMS, 1, raw[4:])
        + rec(PARAMS, 1)
        + rec(STDIN, 1)
    )
    for pieces in ([data], bytewise(data)):
        events = feed_all(ServerConnection(), pieces)
        assert of(Params, events) == [Params(1, {b"K": value}, raw)]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 8, 13, 64, 1000])
def test_server_request_any_chunk_size(size: int) -> None:
    body = blob_of(5000, b"0123456789")
    data = encode_request(9, PARAMS_1, body)
    events = feed_all(ServerConnection(), [data[i : i + size] for i in range(0, len(data), size)])
    assert events == ServerConnection().feed(data)
    assert stdin_body(events, 9) == body


@pytest.mark.parametrize(
    ("role", "flags", "keep_conn"),
    [(1, 0, False), (1, 1, True), (2, 1, True), (3, 0, False), (1, 0xFE, False), (1, 0xFF, True)],
)
def test_server_begin_request_role_and_keep_conn(role: int, flags: int, keep_conn: bool) -> None:
    conn = ServerConnection()
    assert conn.feed(rec(BEGIN, 300, begin_body(role, flags))) == [
        BeginRequest(300, role, keep_conn)
    ]


def test_server_begin_request_unknown_role_is_passed_on() -> None:
    # Answering FCGI_UNKNOWN_ROLE is the caller's business; the codec reports the number.
    assert ServerConnection().feed(rec(BEGIN, 1, begin_body(0x1234))) == [
        BeginRequest(1, 0x1234, False)
    ]


def test_server_multiplexed_interleaved_requests() -> None:
    params = {i: {b"ID": str(i).encode(), b"PAD": blob_of(130 * i, b"p")} for i in (1, 2, 3)}
    raws = {i: encode_pairs(p.items()) for i, p in params.items()}
    halves = {i: (raws[i][: len(raws[i]) // 2], raws[i][len(raws[i]) // 2 :]) for i in raws}
    data = (
        rec(BEGIN, 1, begin_body(1, 1))
        + rec(BEGIN, 2, begin_body(1, 1))
        + rec(PARAMS, 1, halves[1][0])
        + rec(BEGIN, 3, begin_body(1, 1))
        + rec(PARAMS, 3, halves[3][0])
        + rec(PARAMS, 2, halves[2][0])
        + rec(PARAMS, 3, halves[3][1])
        + rec(PARAMS, 1, halves[1][1])
        + rec(PARAMS, 3)
        + rec(STDIN, 3, b"three")
        + rec(PARAMS, 2, halves[2][1])
        + rec(PARAMS, 1)
        + rec(STDIN, 1, b"one-a")
        + rec(PARAMS, 2)
        + rec(STDIN, 3)
        + rec(STDIN, 2)
        + rec(STDIN, 1, b"one-b")
        + rec(STDIN, 1)
    )
    expected = [
        BeginRequest(1, 1, True),
        BeginRequest(2, 1, True),
        BeginRequest(3, 1, True),
        Params(3, params[3], raws[3]),
        Stdin(3, b"three"),
        Params(1, params[1], raws[1]),
        Stdin(1, b"one-a"),
        Params(2, params[2], raws[2]),
        Stdin(3, b""),
        Stdin(2, b""),
        Stdin(1, b"one-b"),
        Stdin(1, b""),
    ]
    conn = ServerConnection()
    assert conn.feed(data) == expected
    assert conn.active == {1, 2, 3}
    assert feed_all(ServerConnection(), bytewise(data)) == expected
    assert conn.end(2) == encode_end_request(2)
    assert conn.active == {1, 3}
    assert conn.end(2) == b"", "an id that is not active is never ended twice"


def test_server_encodes_what_ends_a_request_and_frees_its_id() -> None:
    """respond, relay and end each free the id: a new BEGIN_REQUEST may reuse it at once,
    and nothing is encoded twice for one request."""
    conn = ServerConnection()
    conn.feed(encode_request(1, PARAMS_1, keep_conn=True)[:-8])  # STDIN not ended yet
    assert conn.active == {1} and conn.receiving == {1}
    answer = conn.respond(1, 413, b"too large\n")
    assert answer == encode_response(1, 413, b"too large\n")
    assert conn.active == set() and conn.receiving == {1}
    assert conn.respond(1, 503) == b"" and conn.end(1) == b""
    # What still comes of the ended request's body is dropped; the stream's end is noted.
    assert conn.feed(rec(STDIN, 1, b"rest of the body") + rec(STDIN, 1)) == []
    assert conn.receiving == set()
    begin = encode_begin_request(1, keep_conn=True)
    assert conn.feed(begin) == [BeginRequest(1, Role.RESPONDER, True)]
    scanner = ResponseScanner()
    records, starts, _, end = scanner.feed(encode_response(1, 200, b"ok"))
    assert end is not None
    assert conn.relay(1, records, starts, ended=True) == records
    assert conn.active == set()
    assert conn.relay(1, records, starts, ended=True) == b""


def test_server_relay_retags_records_for_other_ids() -> None:
    conn = ServerConnection()
    conn.feed(encode_begin_request(7))
    records, starts, _, _ = ResponseScanner().feed(encode_response(1, 200, b"ok"))
    assert conn.relay(7, records, starts, ended=True) == encode_response(7, 200, b"ok")


def test_server_abort_ends_the_stream_and_is_dropped_once_answered() -> None:
    conn = ServerConnection()
    conn.feed(encode_begin_request(1) + rec(PARAMS, 1))  # a body was to follow
    assert conn.feed(rec(ABORT, 1)) == [AbortRequest(1)]
    assert conn.receiving == set(), "the web server sends nothing more of it"
    assert conn.end(1) == encode_end_request(1)
    assert conn.feed(rec(ABORT, 1)) == [], "an ABORT for an answered request is dropped"


def test_server_get_values() -> None:
    content = encode_pairs([(b"FCGI_MAX_CONNS", b""), (b"FCGI_MAX_REQS", b""), (b"X", b"")])
    assert ServerConnection().feed(rec(GET_VALUES, 0, content)) == [
        GetValues([b"FCGI_MAX_CONNS", b"FCGI_MAX_REQS", b"X"])
    ]


def test_server_get_values_empty_and_with_values() -> None:
    conn = ServerConnection()
    assert conn.feed(rec(GET_VALUES, 0)) == [GetValues([])]
    assert conn.feed(rec(GET_VALUES, 0, b"\x0f\x01FCGI_MPXS_CONNS1")) == [
        GetValues([b"FCGI_MPXS_CONNS"])
    ]


def test_server_get_values_between_request_records() -> None:
    conn = ServerConnection()
    data = (
        rec(BEGIN, 1, begin_body())
        + rec(PARAMS, 1, b"\x01\x01ab")
        + rec(GET_VALUES, 0, b"\x0e\x00FCGI_MAX_CONNS")
        + rec(PARAMS, 1)
    )
    assert conn.feed(data) == [
        BeginRequest(1, 1, False),
        GetValues([b"FCGI_MAX_CONNS"]),
        Params(1, {b"a": b"b"}, b"\x01\x01ab"),
    ]


@pytest.mark.parametrize("rtype", [0, 12, 13, 100, 255])
def test_server_unknown_management_type(rtype: int) -> None:
    assert ServerConnection().feed(rec(rtype, 0, b"whatever")) == [UnknownManagementType(rtype)]


@pytest.mark.parametrize(
    "rtype", [BEGIN, ABORT, END, PARAMS, STDIN, STDOUT, STDERR, DATA, GET_VALUES_RESULT, 11]
)
def test_server_known_non_management_type_on_id_0(rtype: int) -> None:
    with pytest.raises(ProtocolError, match="not a management record"):
        ServerConnection().feed(rec(rtype, 0, begin_body()))


def test_server_abort_active_request() -> None:
    conn = ServerConnection()
    conn.feed(rec(BEGIN, 4, begin_body()) + rec(PARAMS, 4))
    assert conn.feed(rec(ABORT, 4)) == [AbortRequest(4)]
    assert conn.active == {4}  # until the application ends it
    conn.end(4)
    assert conn.feed(rec(ABORT, 4)) == []


def test_server_abort_inactive_request_is_ignored() -> None:
    conn = ServerConnection()
    conn.feed(rec(BEGIN, 1, begin_body()))
    assert conn.feed(rec(ABORT, 2)) == []


def test_server_records_for_inactive_ids_are_ignored() -> None:
    conn = ServerConnection()
    conn.feed(rec(BEGIN, 1, begin_body()))
    data = (
        rec(PARAMS, 2, b"\x01\x01ab")
        + rec(PARAMS, 2)
        + rec(STDIN, 2, b"body")
        + rec(STDIN, 2)
        + rec(DATA, 2, b"data")
        + rec(ABORT, 2)
        + rec(PARAMS, 1)
    )
    assert conn.feed(data) == [Params(1, {}, b"")]
    assert conn.active == {1}


def test_server_data_stream_for_filter_role() -> None:
    conn = ServerConnection()
    data = (
        rec(BEGIN, 1, begin_body(Role.FILTER))
        + rec(PARAMS, 1)
        + rec(STDIN, 1)
        + rec(DATA, 1, b"file data")
        + rec(DATA, 1)
    )
    assert conn.feed(data) == [
        BeginRequest(1, Role.FILTER, False),
        Params(1, {}, b""),
        Stdin(1, b""),
        Data(1, b"file data"),
        Data(1, b""),
    ]


def test_server_stdin_in_many_records() -> None:
    conn = ServerConnection()
    conn.feed(rec(BEGIN, 1, begin_body()) + rec(PARAMS, 1))
    data = rec(STDIN, 1, b"a") + rec(STDIN, 1, b"bc", pad=100) + rec(STDIN, 1, b"def", pad=0)
    assert conn.feed(data + rec(STDIN, 1)) == [
        Stdin(1, b"a"),
        Stdin(1, b"bc"),
        Stdin(1, b"def"),
        Stdin(1, b""),
    ]


def test_server_end_request_lets_the_id_be_reused() -> None:
    conn = ServerConnection()
    first = encode_request(1, {b"N": b"1"}, b"first", keep_conn=True)
    second = encode_request(1, {b"N": b"2"}, b"second", keep_conn=True)
    assert of(Params, conn.feed(first)) == [Params(1, {b"N": b"1"}, b"\x01\x01N1")]
    with pytest.raises(ProtocolError, match="active request id 1"):
        ServerConnection().feed(first + second)
    conn.end(1)
    assert conn.active == set()
    events = conn.feed(second)
    assert events[0] == BeginRequest(1, Role.RESPONDER, True)
    assert of(Params, events) == [Params(1, {b"N": b"2"}, b"\x01\x01N2")]
    assert stdin_body(events, 1) == b"second"


def test_server_end_request_drops_partial_params() -> None:
    conn = ServerConnection()
    conn.feed(rec(BEGIN, 1, begin_body()) + rec(PARAMS, 1, b"\x01\x01ab"))
    conn.end(1)
    assert conn.feed(rec(PARAMS, 1, b"\x01\x01cd") + rec(PARAMS, 1)) == []
    events = conn.feed(rec(BEGIN, 1, begin_body()) + rec(PARAMS, 1, b"\x01\x01ef") + rec(PARAMS, 1))
    assert events[1] == Params(1, {b"e": b"f"}, b"\x01\x01ef")


def test_server_end_request_of_unknown_id_is_harmless() -> None:
    conn = ServerConnection()
    conn.end(42)
    assert conn.feed(rec(BEGIN, 42, begin_body())) == [BeginRequest(42, 1, False)]


def test_server_default_max_params_is_1_mib() -> None:
    assert ServerConnection().max_params == 1 << 20


@pytest.mark.parametrize("record_size", [1, 7, 100, 65535])
def test_server_max_params_limit(record_size: int) -> None:
    limit = 200
    raw = encode_pairs([(b"K", blob_of(limit - 6, b"v"))])  # 1 + 4 + 1 + 194
    assert len(raw) == limit

    def request(params: bytes) -> bytes:
        pieces = [params[i : i + record_size] for i in range(0, len(params), record_size)]
        return rec(BEGIN, 1, begin_body()) + b"".join(rec(PARAMS, 1, p) for p in pieces)

    conn = ServerConnection(max_params=limit)
    assert conn.max_params == limit
    assert of(Params, conn.feed(request(raw) + rec(PARAMS, 1)))[0].raw == raw
    with pytest.raises(ProtocolError, match="PARAMS larger than 200 bytes"):
        ServerConnection(max_params=limit).feed(request(raw + b"\x00"))


def test_server_max_params_is_per_request() -> None:
    conn = ServerConnection(max_params=100)
    params = {b"K": blob_of(90, b"v")}
    events = conn.feed(encode_request(1, params) + encode_request(2, params))
    assert [e.request_id for e in of(Params, events)] == [1, 2]


def test_server_max_params_checked_before_stream_ends() -> None:
    # The limit must trip while the stream grows, not only once it ends.
    conn = ServerConnection(max_params=1024)
    conn.feed(rec(BEGIN, 1, begin_body()))
    with pytest.raises(ProtocolError, match="PARAMS larger"):
        for _ in range(200):
            conn.feed(rec(PARAMS, 1, b"\x00" * 8))


def test_server_many_tiny_params_records_are_linear() -> None:
    # Regression: the PARAMS size used to be re-summed over every record received, so 60,000
    # one-byte records (under 600 KB on the wire) took tens of seconds of the event loop.
    count = 60_000
    data = rec(BEGIN, 1, begin_body()) + rec(PARAMS, 1, b"\x00", pad=0) * count + rec(PARAMS, 1)
    conn = ServerConnection()
    started = time.perf_counter()
    events = conn.feed(data)
    elapsed = time.perf_counter() - started
    assert events[1] == Params(1, {b"": b""}, b"\x00" * count)
    assert elapsed < 5.0, f"{count} PARAMS records took {elapsed:.1f} s"


def test_server_stdin_before_end_of_params() -> None:
    conn = ServerConnection()
    conn.feed(rec(BEGIN, 1, begin_body()) + rec(PARAMS, 1, b"\x01\x01ab"))
    with pytest.raises(ProtocolError, match="STDIN before the end of PARAMS"):
        conn.feed(rec(STDIN, 1, b"x"))


def test_server_params_after_end_of_params() -> None:
    conn = ServerConnection()
    conn.feed(rec(BEGIN, 1, begin_body()) + rec(PARAMS, 1))
    with pytest.raises(ProtocolError, match="PARAMS after the end"):
        conn.feed(rec(PARAMS, 1, b"\x01\x01ab"))


def test_server_malformed_params_stream() -> None:
    conn = ServerConnection()
    conn.feed(rec(BEGIN, 1, begin_body()) + rec(PARAMS, 1, b"\x02\x05ab"))
    with pytest.raises(ProtocolError, match="longer than"):
        conn.feed(rec(PARAMS, 1))


@pytest.mark.parametrize("length", [0, 7, 9, 16])
def test_server_begin_request_body_length(length: int) -> None:
    with pytest.raises(ProtocolError, match=f"BEGIN_REQUEST body is {length} bytes"):
        ServerConnection().feed(rec(BEGIN, 1, (b"\x00\x01" + bytes(16))[:length]))


@pytest.mark.parametrize("rtype", [END, STDOUT, STDERR, GET_VALUES, GET_VALUES_RESULT, 11, 12, 255])
def test_server_rejects_types_a_web_server_never_sends(rtype: int) -> None:
    conn = ServerConnection()
    conn.feed(rec(BEGIN, 1, begin_body()) + rec(PARAMS, 1))
    with pytest.raises(ProtocolError, match="not sent by a web server"):
        conn.feed(rec(rtype, 1, b"\0" * 8))


def test_server_feed_empty() -> None:
    conn = ServerConnection()
    assert conn.feed(b"") == []
    conn.feed(rec(BEGIN, 1, begin_body())[:3])
    assert conn.feed(b"") == []


# --------------------------------------------------------------------------- ClientConnection


def test_client_full_response() -> None:
    data = (
        rec(STDOUT, 1, b"Status: 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        + rec(STDERR, 1, b"warning: x\n")
        + rec(STDOUT, 1, b"hello")
        + rec(STDOUT, 1)
        + rec(STDERR, 1)
        + rec(END, 1, b"\0" * 8)
    )
    expected = [
        Stdout(1, b"Status: 200 OK\r\nContent-Type: text/plain\r\n\r\n"),
        Stderr(1, b"warning: x\n"),
        Stdout(1, b"hello"),
        Stdout(1, b""),
        Stderr(1, b""),
        EndRequest(1, 0, ProtocolStatus.REQUEST_COMPLETE),
    ]
    assert ClientConnection().feed(data) == expected
    assert feed_all(ClientConnection(), bytewise(data)) == expected


@pytest.mark.parametrize(
    ("body", "app_status", "protocol_status"),
    [
        (b"\x00\x00\x00\x00\x00\x00\x00\x00", 0, 0),
        (b"\x00\x00\x00\x01\x01\x00\x00\x00", 1, 1),
        (b"\xff\xff\xff\xfe\x02\x00\x00\x00", 0xFFFFFFFE, 2),
        (b"\x01\x02\x03\x04\x03\xff\xff\xff", 0x01020304, 3),
    ],
)
def test_client_end_request_fields(body: bytes, app_status: int, protocol_status: int) -> None:
    assert ClientConnection().feed(rec(END, 0x0A0B, body)) == [
        EndRequest(0x0A0B, app_status, protocol_status)
    ]


def test_client_get_values_result() -> None:
    content = b"\x0e\x02FCGI_MAX_CONNS10\x0f\x01FCGI_MPXS_CONNS0"
    assert ClientConnection().feed(rec(GET_VALUES_RESULT, 0, content)) == [
        GetValuesResult({b"FCGI_MAX_CONNS": b"10", b"FCGI_MPXS_CONNS": b"0"})
    ]


def test_client_get_values_result_from_encoder() -> None:
    values = {b"FCGI_MAX_REQS": b"1", b"LONG": blob_of(200, b"7")}
    assert ClientConnection().feed(encode_get_values_result(values)) == [GetValuesResult(values)]


def test_client_unknown_type() -> None:
    assert ClientConnection().feed(rec(UNKNOWN_TYPE, 0, b"\x2a" + b"\0" * 7)) == [
        UnknownTypeResult(42)
    ]
    assert ClientConnection().feed(encode_unknown_type(200)) == [UnknownTypeResult(200)]


@pytest.mark.parametrize("length", [0, 1, 7, 9])
def test_client_bad_end_request_and_unknown_type_lengths(length: int) -> None:
    with pytest.raises(ProtocolError, match=f"END_REQUEST body is {length} bytes"):
        ClientConnection().feed(rec(END, 1, bytes(length)))
    with pytest.raises(ProtocolError, match="UNKNOWN_TYPE body"):
        ClientConnection().feed(rec(UNKNOWN_TYPE, 0, bytes(length)))


@pytest.mark.parametrize("rtype", [0, BEGIN, ABORT, PARAMS, STDIN, DATA, GET_VALUES, 12, 255])
def test_client_rejects_types_an_application_never_sends(rtype: int) -> None:
    with pytest.raises(ProtocolError, match="not sent by an application"):
        ClientConnection().feed(rec(rtype, 1, begin_body()))


def test_client_get_values_result_malformed() -> None:
    with pytest.raises(ProtocolError):
        ClientConnection().feed(rec(GET_VALUES_RESULT, 0, b"\x0e\x02FCGI"))


def test_client_response_after_partial_header() -> None:
    conn = ClientConnection()
    data = encode_response(2, 200, b"ok")
    assert conn.feed(data[:7]) == []
    events = conn.feed(data[7:])
    assert events[-1] == EndRequest(2, 0, 0)
    assert of(Stdout, events)[-1] == Stdout(2, b"")


# --------------------------------------------------------------------------- ResponseScanner


def scan(scanner: ResponseScanner, pieces) -> list[tuple[bytes, list[int], bool, object]]:
    """Every ``feed`` result, one per piece."""
    return [scanner.feed(piece) for piece in pieces]


def record_sizes(records: bytes, starts: list[int]) -> list[int]:
    """The size of each record at ``starts``, from its header; they must tile ``records``."""
    sizes = []
    for start, following in itertools.pairwise([*starts, len(records)]):
        length = (records[start + 4] << 8) | records[start + 5]
        size = 8 + length + records[start + 6]
        assert records[start] == 1 and start + size == following
        sizes.append(size)
    return sizes


# A response with padding other than the encoders' (none, 3, 255 bytes), so an offset computed
# from the content length alone would be wrong.
SCANNED = [
    rec(STDERR, 1, b"warning: slow\n", pad=0),
    rec(STDOUT, 1, b"Status: 200 OK\r\n\r\n", pad=3),
    rec(STDOUT, 1, b"hello", pad=255),
    rec(STDOUT, 1),
    rec(STDERR, 1, pad=9),
    rec(END, 1, b"\x00\x00\x01\x02\x00\x00\x00\x00", pad=5),
]
SCANNED_STARTS = [sum(map(len, SCANNED[:i])) for i in range(len(SCANNED))]


def test_scanner_returns_the_records_as_sent() -> None:
    data = b"".join(SCANNED)
    records, starts, has_output, end = ResponseScanner().feed(data)
    assert records == data
    assert starts == SCANNED_STARTS
    assert [records[s : s + len(r)] for s, r in zip(starts, SCANNED, strict=True)] == SCANNED
    assert has_output is True
    assert end == EndRequest(1, 0x0102, ProtocolStatus.REQUEST_COMPLETE)


def test_scanner_record_by_record() -> None:
    scanner = ResponseScanner()
    results = scan(scanner, SCANNED)
    assert [r[0] for r in results] == SCANNED
    assert [r[1] for r in results] == [[0]] * len(SCANNED)
    assert [r[2] for r in results] == [False, True, True, False, False, False]
    assert [r[3] for r in results] == [None] * 5 + [EndRequest(1, 0x0102, 0)]


def test_scanner_byte_by_byte() -> None:
    data = b"".join(SCANNED)
    ends = list(itertools.accumulate(map(len, SCANNED)))
    scanner = ResponseScanner()
    got = []
    for i, piece in enumerate(bytewise(data)):
        records, starts, has_output, end = scanner.feed(piece)
        if i + 1 in ends:  # the feed of a record's last byte (padding included) returns it
            record = SCANNED[ends.index(i + 1)]
            assert (records, starts) == (record, [0])
            assert has_output == (record[1] == STDOUT and record[5] > 0)
            got.append(records)
        else:
            assert (records, starts, has_output) == (b"", [], False)
        assert (end is not None) == (i == len(data) - 1)
    assert end == EndRequest(1, 0x0102, 0)
    assert b"".join(got) == data


def test_scanner_keeps_a_partial_record_across_feeds() -> None:
    first, second = rec(STDOUT, 7, b"abc", pad=13), rec(STDERR, 7, blob_of(300, b"e"))
    data = first + second + encode_end_request(7)
    scanner = ResponseScanner()
    assert scanner.feed(data[:7]) == (b"", [], False, None)
    assert scanner.feed(data[7:23]) == (b"", [], False, None)  # padding still missing
    assert scanner.feed(data[23:30]) == (first, [0], True, None)
    assert scanner.feed(data[30 : len(first) + len(second)]) == (second, [0], False, None)
    assert scanner.feed(data[len(first) + len(second) :]) == (
        encode_end_request(7),
        [0],
        False,
        EndRequest(7, 0, 0),
    )


def test_scanner_starts_are_relative_to_the_returned_bytes() -> None:
    data = b"".join(SCANNED)
    scanner = ResponseScanner()
    cut = SCANNED_STARTS[2] + 3  # in the middle of the third record
    records, starts, _, _ = scanner.feed(data[:cut])
    assert (records, starts) == (SCANNED[0] + SCANNED[1], SCANNED_STARTS[:2])
    records, starts, _, end = scanner.feed(data[cut:])
    assert records == data[SCANNED_STARTS[2] :]
    assert starts == [s - SCANNED_STARTS[2] for s in SCANNED_STARTS[2:]]
    assert record_sizes(records, starts) == list(map(len, SCANNED[2:]))
    assert end is not None


@pytest.mark.parametrize(
    ("records", "has_output"),
    [
        ([rec(STDOUT, 1)], False),
        ([rec(STDOUT, 1, pad=7)], False),
        ([rec(STDERR, 1, b"only an error")], False),
        ([rec(STDERR, 1, b"x"), rec(STDOUT, 1), rec(STDERR, 1), rec(END, 1, bytes(8))], False),
        ([rec(END, 1, bytes(8))], False),
        ([rec(STDOUT, 1, b"x")], True),
        ([rec(STDOUT, 1, b"x", pad=0)], True),
        ([rec(STDERR, 1, b"e"), rec(STDOUT, 1, b"\0"), rec(STDOUT, 1)], True),
        ([rec(STDOUT, 1, blob_of(65535, b"o")), rec(END, 1, bytes(8))], True),
    ],
)
def test_scanner_has_output_only_for_stdout_content(records: list[bytes], has_output: bool):
    data = b"".join(records)
    assert ResponseScanner().feed(data)[2] is has_output
    # Across feeds it describes only the records returned by that feed.
    scanner = ResponseScanner()
    assert [scanner.feed(r)[2] for r in records] == [r[1] == STDOUT and r[5] > 0 for r in records]


@pytest.mark.parametrize(
    ("request_id", "body", "app_status", "protocol_status"),
    [
        (1, b"\x00\x00\x00\x00\x00\x00\x00\x00", 0, 0),
        (0x0A0B, b"\x00\x00\x00\x01\x01\x00\x00\x00", 1, 1),
        (65535, b"\xff\xff\xff\xfe\x02\x00\x00\x00", 0xFFFFFFFE, 2),
        (0, b"\x01\x02\x03\x04\x03\xff\xff\xff", 0x01020304, 3),
    ],
)
def test_scanner_end_request_fields(
    request_id: int, body: bytes, app_status: int, protocol_status: int
) -> None:
    data = rec(STDOUT, request_id) + rec(END, request_id, body)
    records, starts, has_output, end = ResponseScanner().feed(data)
    assert (records, starts, has_output) == (data, [0, 8], False)
    assert end == EndRequest(request_id, app_status, protocol_status)
    assert type(end) is EndRequest


def test_scanner_end_request_from_encoder() -> None:
    data = encode_end_request(3, app_status=-1, protocol_status=ProtocolStatus.OVERLOADED)
    assert ResponseScanner().feed(data)[3] == EndRequest(3, 0xFFFFFFFF, 2)


def test_scanner_feed_empty() -> None:
    scanner = ResponseScanner()
    assert scanner.feed(b"") == (b"", [], False, None)
    assert scanner.feed(SCANNED[0][:5]) == (b"", [], False, None)
    assert scanner.feed(b"") == (b"", [], False, None)
    assert scanner.feed(SCANNED[0][5:]) == (SCANNED[0], [0], False, None)


@pytest.mark.parametrize("version", [0, 2, 72, 255])
def test_scanner_wrong_version_is_rejected_at_its_header(version: int) -> None:
    # The header claims 65535 bytes of content that never come: the 8 header bytes suffice.
    header = bytes([version, STDOUT, 0, 1, 0xFF, 0xFF, 0xFF, 0])
    with pytest.raises(ProtocolError, match=f"unsupported FastCGI version {version}"):
        ResponseScanner().feed(header)
    with pytest.raises(ProtocolError, match=f"version {version}"):
        ResponseScanner().feed(SCANNED[0] + SCANNED[1] + header)
    # Byte by byte after a valid record: nothing before the 8th byte, the error at it.
    scanner = ResponseScanner()
    assert scanner.feed(SCANNED[1]) == (SCANNED[1], [0], True, None)
    for byte in bytewise(header[:7]):
        assert scanner.feed(byte) == (b"", [], False, None)
    with pytest.raises(ProtocolError, match=f"version {version}"):
        scanner.feed(header[7:])


def test_scanner_wrong_version_behind_a_partial_record() -> None:
    scanner = ResponseScanner()
    good = rec(STDOUT, 1, b"abcdef")
    assert scanner.feed(good[:3]) == (b"", [], False, None)
    with pytest.raises(ProtocolError, match="version 0"):
        scanner.feed(good[3:] + bytes(8))


@pytest.mark.parametrize(
    "after",
    [
        rec(STDOUT, 1, b"more"),
        rec(STDOUT, 1),
        rec(STDERR, 1, b"late"),
        rec(END, 1, bytes(8)),
        rec(STDOUT, 2, b"another id"),
    ],
)
def test_scanner_rejects_a_record_after_end_request_in_the_same_feed(after: bytes) -> None:
    end = rec(END, 1, bytes(8))
    for data in (end + after, rec(STDOUT, 1, b"x") + end + after, end + after + SCANNED[0]):
        with pytest.raises(ProtocolError, match="record after END_REQUEST"):
            ResponseScanner().feed(data)
    # A partial record in the same read as END_REQUEST is rejected too: were it kept, the
    # next read would complete it and it would be forwarded to the next request sent to the
    # child on the same (kept) connection.
    for size in (1, 7, 8, len(after) - 1):
        with pytest.raises(ProtocolError, match="record after END_REQUEST"):
            ResponseScanner().feed(end + after[:size])


def test_scanner_rejects_a_record_after_end_request_completed_in_the_same_feed() -> None:
    scanner = ResponseScanner()
    end = rec(END, 1, bytes(8))
    assert scanner.feed(end[:4]) == (b"", [], False, None)
    with pytest.raises(ProtocolError, match="record after END_REQUEST"):
        scanner.feed(end[4:] + rec(STDOUT, 1, b"junk"))


def test_scanner_reads_the_next_response_in_a_later_feed() -> None:
    # ChildConnection keeps one scanner per connection, and a kept connection (child
    # keep_conn) carries one request after another: once END_REQUEST was returned, the
    # next feed holds the answer to the next request the pool sent.
    scanner = ResponseScanner()
    first = encode_response(1, 200, b"first")
    second = encode_response(1, 404, b"second")
    assert scanner.feed(first)[0] == first
    records, starts, has_output, end = scanner.feed(second)
    assert (records, has_output, end) == (second, True, EndRequest(1, 0, 0))
    assert stdout_content(records, starts).endswith(b"\r\n\r\nsecond")
    results = scan(scanner, bytewise(first))
    assert b"".join(r[0] for r in results) == first
    assert [r[3] is not None for r in results] == [False] * (len(first) - 1) + [True]


@pytest.mark.parametrize("length", [0, 1, 7, 9, 16, 65535])
def test_scanner_end_request_body_must_be_8_bytes(length: int) -> None:
    data = rec(STDOUT, 1) + rec(END, 1, blob_of(length, b"\0\1") if length else b"")
    with pytest.raises(ProtocolError, match=f"END_REQUEST body is {length} bytes, not 8"):
        ResponseScanner().feed(data)
    scanner = ResponseScanner()
    with pytest.raises(ProtocolError, match=f"END_REQUEST body is {length} bytes"):
        for piece in chunks(data, list(range(0, len(data), 4096))):
            scanner.feed(piece)


@pytest.mark.parametrize(
    "rtype",
    [0, BEGIN, ABORT, PARAMS, STDIN, DATA, GET_VALUES, GET_VALUES_RESULT, UNKNOWN_TYPE, 12, 255],
)
def test_scanner_rejects_types_that_are_not_part_of_a_response(rtype: int) -> None:
    bad = rec(rtype, 1, begin_body())
    for data in (bad, rec(STDOUT, 1, b"ok") + bad, bad + rec(END, 1, bytes(8))):
        with pytest.raises(ProtocolError, match=f"record type {rtype} is not part of a response"):
            ResponseScanner().feed(data)


@pytest.mark.parametrize(
    "data",
    [
        encode_get_values_result({b"FCGI_MAX_CONNS": b"1"}),
        encode_unknown_type(200),
        encode_begin_request(1),
        encode_params(1, PARAMS_1),
        encode_request(1, {}, b"body"),
    ],
    ids=["get_values_result", "unknown_type", "begin_request", "params", "request"],
)
def test_scanner_rejects_encoded_non_response_records(data: bytes) -> None:
    # GET_VALUES_RESULT and UNKNOWN_TYPE are valid from a child (ClientConnection takes them),
    # but the pool never asks for them: in an answer to a request they are junk.
    with pytest.raises(ProtocolError, match="is not part of a response"):
        ResponseScanner().feed(data)


def test_scanner_error_after_valid_records_in_the_same_feed() -> None:
    # The whole read is refused: nothing of it is returned for forwarding.
    scanner = ResponseScanner()
    with pytest.raises(ProtocolError, match="type 5 is not part of a response"):
        scanner.feed(b"".join(SCANNED[:3]) + rec(STDIN, 1, b"x"))


def test_stdout_content() -> None:
    data = b"".join(SCANNED)
    assert stdout_content(data, SCANNED_STARTS) == b"Status: 200 OK\r\n\r\nhello"
    assert stdout_content(data, SCANNED_STARTS[:2]) == b"Status: 200 OK\r\n\r\n"
    assert stdout_content(data, [SCANNED_STARTS[0], *SCANNED_STARTS[3:]]) == b""
    assert stdout_content(b"", []) == b""
    big = blob_of(65535, b"0123456789")
    records = rec(STDOUT, 1, big, pad=255) + rec(STDERR, 1, b"e") + rec(STDOUT, 1, b"!")
    assert stdout_content(records, [0, 65798, 65814]) == big + b"!"


def test_stdout_content_of_scanned_pieces() -> None:
    body = blob_of(200000, b"body ")
    data = encode_response(9, 200, body, [("X-A", "b")])
    scanner = ResponseScanner()
    out = b""
    for piece in chunks(data, list(range(0, len(data), 777))):
        records, starts, has_output, _ = scanner.feed(piece)
        content = stdout_content(records, starts)
        assert has_output == bool(content)
        out += content
    assert out == b"".join(e.data for e in of(Stdout, ClientConnection().feed(data)))
    assert out.endswith(b"\r\n\r\n" + body) and out.startswith(b"Status: 200\r\n")


@pytest.mark.parametrize("request_id", [1, 255, 256, 65535])
def test_retag_sets_every_request_id(request_id: int) -> None:
    data = b"".join(SCANNED) + rec(STDOUT, 0x1234, blob_of(65535, b"r"), pad=255)
    starts = [*SCANNED_STARTS, len(data) - MAX_RECORD]
    retagged = retag(data, starts, request_id)
    assert type(retagged) is bytes and len(retagged) == len(data)
    before, after = RecordReader().feed(data), RecordReader().feed(retagged)
    assert [(t, request_id, c) for t, _, c in before] == after
    assert len(after) == len(starts)
    # Only bytes 2 and 3 of each header may differ; content and padding are untouched.
    changed = {i for i in range(len(data)) if data[i] != retagged[i]}
    assert changed <= {s + k for s in starts for k in (2, 3)}
    for start in starts:
        assert retagged[start + 2 : start + 4] == bytes([request_id >> 8, request_id & 0xFF])


def test_retag_touches_only_the_given_headers() -> None:
    data = rec(STDOUT, 1, b"\x01\x06\x00\x01\x00\x00\x00\x00") + rec(END, 1, bytes(8))
    # Content that looks like a header is left alone; so is a header not in ``starts``.
    assert retag(data, [16], 0x0203) == data[:16] + rec(END, 0x0203, bytes(8))
    assert retag(data, [], 0x0203) == data
    assert retag(b"", [], 5) == b""


def test_retag_scanned_pieces() -> None:
    data = encode_response(1, 200, blob_of(70000, b"xyz"), [("X", "y")])
    scanner = ResponseScanner()
    out = b""
    for piece in chunks(data, list(range(0, len(data), 5000))):
        records, starts, _, _ = scanner.feed(piece)
        out += retag(records, starts, 0xABCD)
    assert out == encode_response(0xABCD, 200, blob_of(70000, b"xyz"), [("X", "y")])


# --------------------------------------------------------------------------- property tests


def pair_prefix_size(n: int) -> int:
    return 1 if n < 128 else 4


@PROPERTY
@given(st.dictionaries(blob, blob, max_size=6))
def test_pairs_round_trip(pairs: dict[bytes, bytes]) -> None:
    encoded = encode_pairs(pairs.items())
    assert len(encoded) == sum(
        pair_prefix_size(len(k)) + pair_prefix_size(len(v)) + len(k) + len(v)
        for k, v in pairs.items()
    )
    decoded = decode_pairs(encoded)
    assert decoded == pairs
    assert list(decoded) == list(pairs)


@PROPERTY
@given(st.dictionaries(blob, blob, min_size=1, max_size=4), st.data())
def test_pairs_any_truncation_is_protocol_error(pairs: dict[bytes, bytes], data) -> None:
    encoded = encode_pairs(pairs.items())
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    prefix = encoded[:cut]
    # A prefix that ends exactly between two pairs is valid; any other cut must be refused.
    boundaries = {0}
    pos = 0
    for k, v in pairs.items():
        pos += pair_prefix_size(len(k)) + pair_prefix_size(len(v)) + len(k) + len(v)
        boundaries.add(pos)
    if cut in boundaries:
        assert decode_pairs(prefix) == dict(list(pairs.items())[: sorted(boundaries).index(cut)])
    else:
        with pytest.raises(ProtocolError):
            decode_pairs(prefix)


request_params = st.dictionaries(small_blob, blob, max_size=8)
request_body = st.one_of(st.binary(max_size=500), sized_blob)


@HEAVY
@given(
    request_id=st.integers(min_value=1, max_value=65535),
    params=request_params,
    body=request_body,
    keep_conn=st.booleans(),
    cuts=cut_points,
)
def test_request_round_trip(
    request_id: int, params: dict, body: bytes, keep_conn: bool, cuts: list[int]
) -> None:
    data = encode_request(request_id, params, body, keep_conn)
    conn = ServerConnection()
    events = feed_all(conn, chunks(data, cuts))
    stdin_records = -(-len(body) // MAX_CONTENT) + 1
    assert [type(e) for e in events] == [BeginRequest, Params] + [Stdin] * stdin_records
    assert events[0] == BeginRequest(request_id, Role.RESPONDER, keep_conn)
    assert events[1] == Params(request_id, params, encode_pairs(params.items()))
    assert all(e.request_id == request_id for e in events)
    assert all(e.data for e in events[2:-1])
    assert events[-1] == Stdin(request_id, b"")
    assert stdin_body(events, request_id) == body
    assert conn.active == {request_id}
    # The same connection can carry the id again once the request was ended.
    conn.end(request_id)
    assert feed_all(conn, chunks(data, cuts[::-1])) == events


@st.composite
def multiplexed(draw):
    ids = draw(st.lists(st.integers(1, 65535), min_size=1, max_size=4, unique=True))
    rnd = draw(st.randoms(use_true_random=False))
    requests, streams = {}, []
    for request_id in ids:
        params = draw(st.dictionaries(small_blob, small_blob, max_size=5))
        body = draw(st.binary(max_size=300))
        requests[request_id] = (params, body)
        raw = encode_pairs(params.items())
        records = [rec(BEGIN, request_id, begin_body(1, 1))]
        for stream, payload in ((PARAMS, raw), (STDIN, body)):
            pos = 0
            while pos < len(payload):
                step = rnd.randint(1, 50)
                records.append(
                    rec(stream, request_id, payload[pos : pos + step], rnd.randint(0, 9))
                )
                pos += step
            records.append(rec(stream, request_id))
        streams.append(records)
    # Interleave the records of all requests, each request's own order kept.
    data = []
    while streams:
        stream = rnd.choice(streams)
        data.append(stream.pop(0))
        if not stream:
            streams.remove(stream)
    return requests, b"".join(data)


@PROPERTY
@given(multiplexed(), cut_points)
def test_multiplexed_requests_round_trip(case, cuts: list[int]) -> None:
    requests, data = case
    conn = ServerConnection()
    events = feed_all(conn, chunks(data, cuts))
    seen = 0
    for request_id, (params, body) in requests.items():
        mine = [e for e in events if e.request_id == request_id]
        seen += len(mine)
        assert mine[0] == BeginRequest(request_id, Role.RESPONDER, True)
        assert mine[1] == Params(request_id, params, encode_pairs(params.items()))
        assert all(type(e) is Stdin and e.data for e in mine[2:-1])
        assert mine[-1] == Stdin(request_id, b"")
        assert stdin_body(mine, request_id) == body
    assert seen == len(events)
    assert conn.active == set(requests)


@st.composite
def responses(draw):
    request_id = draw(st.integers(min_value=1, max_value=65535))
    stdout = draw(st.lists(blob.filter(bool), max_size=4))
    stderr = draw(st.lists(st.binary(min_size=1, max_size=100), max_size=len(stdout) + 1))
    app_status = draw(st.integers(min_value=0, max_value=0xFFFFFFFF))
    protocol_status = draw(st.sampled_from(list(ProtocolStatus)))
    parts = []
    for i in range(max(len(stdout), len(stderr))):
        if i < len(stdout):
            parts.append(encode_stream(RecordType.STDOUT, request_id, stdout[i]))
        if i < len(stderr):
            parts.append(encode_stream(RecordType.STDERR, request_id, stderr[i]))
    parts.append(encode_record(RecordType.STDOUT, request_id))
    if stderr:
        parts.append(encode_record(RecordType.STDERR, request_id))
    parts.append(encode_end_request(request_id, app_status, protocol_status))
    return request_id, stdout, stderr, app_status, protocol_status, b"".join(parts)


@HEAVY
@given(responses(), cut_points)
def test_response_round_trip(case, cuts: list[int]) -> None:
    request_id, stdout, stderr, app_status, protocol_status, data = case
    events = feed_all(ClientConnection(), chunks(data, cuts))
    assert events[-1] == EndRequest(request_id, app_status, protocol_status)
    assert all(e.request_id == request_id for e in events)
    out = of(Stdout, events)
    assert b"".join(e.data for e in out) == b"".join(stdout)
    assert out[-1] == Stdout(request_id, b"") and all(e.data for e in out[:-1])
    assert len(out) == sum(-(-len(s) // MAX_CONTENT) for s in stdout) + 1
    err = of(Stderr, events)
    assert b"".join(e.data for e in err) == b"".join(stderr)
    if stderr:
        assert err[-1] == Stderr(request_id, b"") and all(e.data for e in err[:-1])
    else:
        assert err == []


header_name = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ-abcdefghijklmnopqrstuvwxyz", min_size=1)
header_value = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@HEAVY
@given(
    request_id=st.integers(min_value=1, max_value=65535),
    status=st.integers(min_value=100, max_value=599),
    body=request_body,
    headers=st.lists(st.tuples(header_name, header_value), max_size=4),
    cuts=cut_points,
)
def test_encode_response_round_trip(
    request_id: int, status: int, body: bytes, headers: list, cuts: list[int]
) -> None:
    data = encode_response(request_id, status, body, headers)
    events = feed_all(ClientConnection(), chunks(data, cuts))
    assert events[-1] == EndRequest(request_id, 0 if status < 500 else 1, 0)
    assert events[-2] == Stdout(request_id, b"")
    assert [type(e) for e in events[:-1]] == [Stdout] * (len(events) - 1)
    head, sep, rest = b"".join(e.data for e in of(Stdout, events)).partition(b"\r\n\r\n")
    assert sep and rest == body
    lines = head.decode("latin-1").split("\r\n")
    assert re.fullmatch(rf"Status: {status}( [A-Za-z ]+)?", lines[0])
    assert lines[1] == "Content-Type: text/plain; charset=utf-8"
    assert lines[2] == f"Content-Length: {len(body)}"
    assert lines[3:] == [f"{n}: {v}" for n, v in headers]


@HEAVY
@given(responses(), cut_points)
def test_scanner_round_trip(case, cuts: list[int]) -> None:
    request_id, stdout, stderr, app_status, protocol_status, data = case
    pieces = chunks(data, cuts)
    results = scan(ResponseScanner(), pieces)
    assert b"".join(records for records, _, _, _ in results) == data
    out = b""
    for records, starts, has_output, _ in results:
        record_sizes(records, starts)  # the starts tile the returned bytes, record by record
        content = stdout_content(records, starts)
        assert has_output == bool(content)
        out += content
    assert out == b"".join(stdout)
    ends = [end for _, _, _, end in results]
    assert ends[-1] == EndRequest(request_id, app_status, protocol_status)
    assert ends[:-1] == [None] * (len(pieces) - 1)
    # The same records, in order, as the event decoder sees them.
    every = b"".join(records for records, _, _, _ in results)
    read = RecordReader().feed(every)
    assert len(read) == sum(len(starts) for _, starts, _, _ in results)
    assert b"".join(c for t, _, c in read if t == STDERR) == b"".join(stderr)


@HEAVY
@given(responses(), st.integers(min_value=1, max_value=65535), cut_points)
def test_retag_then_client_connection_sees_the_new_id(case, new_id: int, cuts) -> None:
    data = case[-1]
    scanner = ResponseScanner()
    retagged = b"".join(retag(r, s, new_id) for r, s, _, _ in scan(scanner, chunks(data, cuts)))
    expected = [replace(e, request_id=new_id) for e in ClientConnection().feed(data)]
    assert feed_all(ClientConnection(), chunks(retagged, cuts[::-1])) == expected
    assert all(e.request_id == new_id for e in expected)


@st.composite
def raw_records(draw):
    records = draw(
        st.lists(
            st.tuples(
                st.integers(0, 255),
                st.integers(0, 65535),
                st.one_of(
                    st.binary(max_size=40),
                    st.builds(
                        blob_of,
                        st.sampled_from([100, 4096, 65535]),
                        st.binary(min_size=1, max_size=8),
                    ),
                ),
                st.integers(0, 255),
            ),
            max_size=6,
        )
    )
    return records


@HEAVY
@given(raw_records(), cut_points)
def test_record_reader_holds_at_most_one_partial_record(records, cuts: list[int]) -> None:
    data = b"".join(rec(t, i, c, pad) for t, i, c, pad in records)
    ends = []
    pos = 0
    for _, _, content, pad in records:
        pos += 8 + len(content) + pad
        ends.append(pos)
    reader = RecordReader()
    got = []
    fed = 0
    for piece in chunks(data, cuts):
        got.extend(reader.feed(piece))
        fed += len(piece)
        complete = [e for e in ends if e <= fed]
        start = complete[-1] if complete else 0
        # Exactly the bytes of the record in progress are held, never more than one record.
        assert reader.pending == fed - start
        assert reader.pending <= MAX_RECORD
        if reader.pending:
            assert reader.pending < ends[len(complete)] - start
        assert len(got) == len(complete)
    assert got == [(t, i, c) for t, i, c, _ in records]
    assert reader.pending == 0


# --------------------------------------------------------------------------- malformed input

CORPUS_ERRORS = {
    "server_wrong_version_2": "version 2",
    "server_wrong_version_0_after_valid_record": "version 0",
    "server_begin_request_body_7_bytes": "BEGIN_REQUEST body is 7 bytes",
    "server_begin_request_body_9_bytes": "BEGIN_REQUEST body is 9 bytes",
    "server_begin_request_body_empty": "BEGIN_REQUEST body is 0 bytes",
    "server_duplicate_begin_request": "BEGIN_REQUEST for active request id 1",
    "server_duplicate_begin_request_after_params": "BEGIN_REQUEST for active request id 1",
    "server_params_truncated_1byte_length": "truncated name-value length",
    "server_params_truncated_4byte_length": "truncated 4-byte name-value length",
    "server_params_pair_longer_than_stream": "longer than its record stream",
    "server_params_4byte_length_2gb": "longer than its record stream",
    "server_params_value_2gb_across_records": "longer than its record stream",
    "server_params_after_end_of_params": "PARAMS after the end of the stream",
    "server_stdin_before_end_of_params": "STDIN before the end of PARAMS",
    "server_stdin_before_any_params": "STDIN before the end of PARAMS",
    "server_stdout_from_web_server": "type 6 is not sent by a web server",
    "server_stderr_from_web_server": "type 7 is not sent by a web server",
    "server_end_request_from_web_server": "type 3 is not sent by a web server",
    "server_get_values_result_from_web_server": "type 10 is not a management record",
    "server_unknown_type_from_web_server": "type 11 is not a management record",
    "server_unassigned_type_12_on_request_id": "type 12 is not sent by a web server",
    "server_begin_request_on_id_0": "type 1 is not a management record",
    "server_get_values_on_request_id_1": "type 9 is not sent by a web server",
    "server_get_values_truncated_pair": "longer than its record stream",
    "server_get_values_truncated_4byte_length": "truncated 4-byte name-value length",
    "server_http_get_request": "version 71",
    "server_http_request_after_valid_request": "version 80",
    "server_tls_client_hello": "version 22",
    "server_random_garbage": "version 167",
    "client_wrong_version_0": "version 0",
    "client_end_request_body_7_bytes": "END_REQUEST body is 7 bytes",
    "client_end_request_body_9_bytes": "END_REQUEST body is 9 bytes",
    "client_end_request_body_empty": "END_REQUEST body is 0 bytes",
    "client_unknown_type_body_1_byte": "UNKNOWN_TYPE body is not 8 bytes",
    "client_get_values_result_truncated_pair": "longer than its record stream",
    "client_get_values_result_length_2gb": "longer than its record stream",
    "client_begin_request_from_application": "type 1 is not sent by an application",
    "client_params_from_application": "type 4 is not sent by an application",
    "client_stdin_from_application": "type 5 is not sent by an application",
    "client_unassigned_type_200": "type 200 is not sent by an application",
    "client_http_response": "version 72",
    "scanner_get_values_result": "record type 10 is not part of a response",
    "scanner_end_request_body_16_bytes": "END_REQUEST body is 16 bytes, not 8",
    "scanner_http_response_after_stdout": "unsupported FastCGI version 72",
}
CORPUS_FILES = sorted(CORPUS.glob("*.bin"))


def connection_for(path: Path):
    if path.name.startswith("server_"):
        return ServerConnection()
    if path.name.startswith("client_"):
        return ClientConnection()
    if path.name.startswith("scanner_"):
        return ResponseScanner()
    raise AssertionError(f"{path.name}: corpus file names start with server_, client_ or scanner_")


def test_corpus_is_complete_and_documented() -> None:
    names = {p.stem for p in CORPUS_FILES}
    assert names == set(CORPUS_ERRORS)
    readme = (CORPUS / "README.md").read_text()
    listed = set(re.findall(r"`((?:server|client|scanner)_\w+)\.bin`", readme))
    assert listed == names


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.stem)
def test_corpus_file_is_rejected(path: Path) -> None:
    data = path.read_bytes()
    message = re.escape(CORPUS_ERRORS[path.stem])
    with pytest.raises(ProtocolError, match=message):
        connection_for(path).feed(data)
    # Byte by byte, the same error comes, and no later than the last byte.
    conn = connection_for(path)
    with pytest.raises(ProtocolError, match=message):
        for piece in bytewise(data):
            conn.feed(piece)


def feed_only_protocol_errors(conn, pieces) -> None:
    """Feed until the end or a ProtocolError; any other exception fails the test."""
    try:
        for piece in pieces:
            events = conn.feed(piece)
            assert isinstance(events, list)
            assert all(isinstance(e, EVENT_TYPES) for e in events)
    except ProtocolError:
        pass


@PROPERTY
@given(st.binary(max_size=2000), cut_points)
def test_fuzz_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    feed_only_protocol_errors(ServerConnection(), chunks(data, cuts))
    feed_only_protocol_errors(ClientConnection(), chunks(data, cuts))
    # Garbage after a valid version byte reaches the record decoders, not only the header.
    feed_only_protocol_errors(ServerConnection(), chunks(b"\x01" + data, cuts))
    feed_only_protocol_errors(ClientConnection(), chunks(b"\x01" + data, cuts))
    scan_only_protocol_errors(chunks(data, cuts))
    scan_only_protocol_errors(chunks(b"\x01" + data, cuts))


def scan_only_protocol_errors(pieces) -> None:
    """Feed a ResponseScanner until the end or a ProtocolError; what it returns must be the
    input's own bytes, whole records only; any other exception fails the test."""
    scanner = ResponseScanner()
    fed, got = b"", b""
    try:
        for piece in pieces:
            fed += piece
            records, starts, has_output, end = scanner.feed(piece)
            record_sizes(records, starts)
            got += records
            assert fed.startswith(got)
            assert has_output == bool(stdout_content(records, starts))
            assert end is None or type(end) is EndRequest
    except ProtocolError:
        pass


scanner_record_parts = st.tuples(
    st.sampled_from([STDOUT, STDOUT, STDERR, END, END, BEGIN, GET_VALUES_RESULT, 200]),
    st.sampled_from([0, 1, 256, 65535]),
    st.one_of(st.just(b""), st.just(bytes(8)), st.binary(max_size=20)),
    st.one_of(st.none(), st.integers(0, 16)),
)


@PROPERTY
@given(st.lists(scanner_record_parts, max_size=8))
def test_scanner_against_a_model(parts) -> None:
    records = [rec(*part) for part in parts]
    data = b"".join(records)
    bad = [
        rtype not in (STDOUT, STDERR, END) or (rtype == END and len(content) != 8)
        for rtype, _, content, _ in parts
    ]
    first_bad = bad.index(True) if True in bad else len(parts)
    ends = [i for i, part in enumerate(parts) if part[0] == END]

    def expected(i: int) -> tuple[bool, EndRequest | None]:
        rtype, request_id, content, _ = parts[i]
        if rtype == END:
            return False, EndRequest(request_id, *_END_BODY.unpack(content))
        return rtype == STDOUT and bool(content), None

    # All in one read: any bad record, or any record after END_REQUEST, refuses the read.
    if first_bad == len(parts) and (not ends or ends[0] == len(parts) - 1):
        results = [expected(i) for i in range(len(parts))]
        assert ResponseScanner().feed(data) == (
            data,
            [sum(map(len, records[:i])) for i in range(len(records))],
            any(has_output for has_output, _ in results),
            results[-1][1] if results else None,
        )
    else:
        with pytest.raises(ProtocolError):
            ResponseScanner().feed(data)
    # One record a read (one response after another, as on a kept connection): only a bad
    # record is refused, at its own read.
    scanner = ResponseScanner()
    for i, record in enumerate(records):
        if i == first_bad:
            with pytest.raises(ProtocolError):
                scanner.feed(record)
            break
        assert scanner.feed(record) == (record, [0], *expected(i))


fuzz_content = st.one_of(
    st.just(b""),
    st.binary(max_size=40),
    st.builds(begin_body, st.integers(0, 4), st.integers(0, 255)),
    st.builds(lambda k, v: encode_pairs([(k, v)]), small_blob, small_blob),
    st.builds(
        lambda first, rest: bytes([first]) + rest,
        st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]),
        st.binary(max_size=8),
    ),
)
fuzz_record = st.builds(
    rec,
    st.one_of(st.integers(0, 12), st.integers(0, 255)),
    st.sampled_from([0, 1, 2, 3, 65535]),
    fuzz_content,
    st.one_of(st.none(), st.integers(0, 16)),
)


@PROPERTY
@given(
    st.lists(fuzz_record, max_size=16),
    cut_points,
    st.sampled_from([1, 16, 1 << 20]),
    st.lists(st.integers(1, 3), max_size=3),
)
def test_fuzz_well_framed_records(records, cuts, max_params, ended) -> None:
    data = b"".join(records)
    conn = ServerConnection(max_params=max_params)
    try:
        for i, piece in enumerate(chunks(data, cuts)):
            events = conn.feed(piece)
            assert all(isinstance(e, EVENT_TYPES) for e in events)
            if i < len(ended):  # the application ends requests between reads
                conn.end(ended[i])
    except ProtocolError:
        pass
    feed_only_protocol_errors(ClientConnection(), chunks(data, cuts))
    scan_only_protocol_errors(chunks(data, cuts))


@PROPERTY
@given(
    params=request_params.filter(lambda p: len(encode_pairs(p.items())) < 4000),
    body=st.binary(max_size=100),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["set", "insert", "delete"]),
            st.integers(0, 1 << 16),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=4,
    ),
    cuts=cut_points,
)
def test_fuzz_mutated_requests_and_responses(params, body, edits, cuts) -> None:
    for data, make in (
        (encode_request(1, params, body, keep_conn=True), ServerConnection),
        (encode_response(1, 503, body, [("Retry-After", "1")]), ClientConnection),
    ):
        mutated = bytearray(data)
        for op, where, value in edits:
            where %= len(mutated) + 1
            if op == "set" and where < len(mutated):
                mutated[where] = value
            elif op == "insert":
                mutated[where:where] = bytes([value])
            elif where < len(mutated):
                del mutated[where]
        feed_only_protocol_errors(make(), chunks(bytes(mutated), cuts))
        scan_only_protocol_errors(chunks(bytes(mutated), cuts))


def test_fuzz_seeded_corpus_mutations() -> None:
    # Deterministic byte flips of every corpus file and of valid streams: only ProtocolError.
    rnd = random.Random(1234)
    seeds = [p.read_bytes() for p in CORPUS_FILES]
    seeds += [encode_request(7, PARAMS_1, b"body", keep_conn=True), encode_response(7, 200, b"x")]
    for seed in seeds:
        for _ in range(40):
            mutated = bytearray(seed)
            for _ in range(rnd.randint(1, 3)):
                mutated[rnd.randrange(len(mutated))] = rnd.randrange(256)
            feed_only_protocol_errors(ServerConnection(), [bytes(mutated)])
            feed_only_protocol_errors(ClientConnection(), [bytes(mutated)])
            scan_only_protocol_errors([bytes(mutated)])
