"""OTLP encoding of finished traces, off the request path and lean: an ExportTraceServiceRequest
written as protobuf wire bytes directly.

What is the same for many spans is built once with the official `opentelemetry-proto` messages
and kept serialized: the Resource, the instrumentation scope, and per (sampler, API, route,
method, scheme, version, port) the server span's name, kind and constant attributes (protobuf
merges repeated fields by appending, so serialized pieces of one Span concatenate into one).
What changes per span (ids, times, path, addresses, status, events) is written here with the
field numbers of `opentelemetry/proto/trace/v1/trace.proto`, without building a message object
per span: that costs about a tenth of filling messages.

The field numbers written are the same in every published copy of the OTLP files, including the
older ones `xds-protos` ships under the same module names (InstrumentationLibrarySpans, field 2 of
ResourceSpans, where newer files have ScopeSpans): whichever copy an installation ends up with,
the bytes are identical, and a collector reading either layout decodes the same spans
(tests/test_tracing.py decodes them with both layouts).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span

import flexgw
from flexgw.http.tracecontext import POLICY, UPSTREAM, ChildSpan, Trace
from flexgw.plan import TracingSettings

# Span.SpanKind values.
_SERVER, _CLIENT, _INTERNAL = 2, 3, 1
#: Span fields 7 and 8 (start_time_unix_nano, end_time_unix_nano), both fixed64.
_TIMES = struct.Struct("<BQBQ")
_FIXED64 = struct.Struct("<Q")
#: Cached pieces: at most this many of each (they come from configuration and traffic).
_CACHE_LIMIT = 4096


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


#: The varints of 0..16383 (one or two bytes), looked up rather than computed.
_VARINTS = [_varint(n) for n in range(1 << 14)]


def varint(n: int) -> bytes:
    """`n` (0 <= n < 2**64) as a protobuf varint."""
    return _VARINTS[n] if n < 16384 else _varint(n)


def field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag byte(s), the length, the payload."""
    n = len(payload)
    return tag + (_VARINTS[n] if n < 16384 else _varint(n)) + payload


def _value(value: Any) -> bytes:
    """An AnyValue's bytes: bool (field 2), int (field 3, int64), else a string (field 1)."""
    if value is True or value is False:
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + varint(value & 0xFFFFFFFFFFFFFFFF)
    return field(b"\x0a", str(value).encode("utf-8"))


def attribute(key: str, value: Any) -> bytes:
    """A Span `attributes` entry (field 9, a KeyValue)."""
    return field(b"\x4a", field(b"\x0a", key.encode("utf-8")) + field(b"\x12", _value(value)))


def attributes(pairs: Iterable[tuple[str, Any]]) -> bytes:
    """Several Span `attributes` entries."""
    return b"".join(attribute(key, value) for key, value in pairs)


def _status(message: str) -> bytes:
    """A Span `status` (field 15): code ERROR (field 3) with `message` (field 2)."""
    return field(b"\x7a", field(b"\x12", message.encode("utf-8")) + b"\x18\x02")


def _event_parts(name: bytes) -> tuple[bytes, bytes]:
    """What comes before and after the time in a Span `events` entry (field 11) named `name`:
    an Event of time_unix_nano (field 1, fixed64) and name (field 2)."""
    return b"\x5a" + _VARINTS[11 + len(name)] + b"\x09", b"\x12" + _VARINTS[len(name)] + name


_CONNECTED = _event_parts(b"connected")
_FIRST_BYTE = _event_parts(b"first_byte")


class _Cache(dict):  # type: ignore[type-arg]
    """Encoded pieces by what they encode; emptied when it grows past _CACHE_LIMIT."""

    def __init__(self, make: Any) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, key: Any) -> bytes:
        if len(self) >= _CACHE_LIMIT:
            self.clear()
        value = self[key] = self.make(key)
        return value


class SpanEncoder:
    """ExportTraceServiceRequest bytes from the records flexgw.service.tracing.Tracer queues."""

    def __init__(self, settings: TracingSettings) -> None:
        self.settings = settings
        resource = Resource(attributes=[
            KeyValue(key=key, value=AnyValue(string_value=str(value)))
            for key, value in [("service.name", settings.service_name),
                               ("service.type", settings.service_type),
                               *settings.resource_attributes]
        ])
        # opentelemetry-proto >= 0.19 names it InstrumentationScope; older copies (xds-protos
        # ships some) InstrumentationLibrary: the same fields (name 1, version 2).
        scope = getattr(common_pb2, "InstrumentationScope", None) or common_pb2.InstrumentationLibrary
        # ResourceSpans: resource (1), then scope_spans (2) holding scope (1) and spans (2).
        self._resource = field(b"\x0a", resource.SerializeToString())
        self._scope = field(b"\x0a", scope(name="flexgw", version=flexgw.__version__).SerializeToString())
        self._fixed: dict[tuple[Any, ...], bytes] = {}
        # Attributes and statuses that repeat from span to span, encoded once.
        self._client = _Cache(lambda address: attribute("client.address", address))
        self._server = _Cache(lambda authority: attribute("server.address", _host(authority)))
        self._peer = _Cache(lambda address: attribute(
            "server.address", address if isinstance(address, str) else address.authority))
        self._status_code = _Cache(lambda status: attribute("http.response.status_code", status))
        self._error = _Cache(lambda cause: attribute("error.type", cause) + _status(cause))
        self._child_error = _Cache(_status)
        self._child_head = _Cache(
            lambda pair: field(b"\x2a", pair[0].encode("utf-8")) + b"\x30" + _VARINTS[pair[1]]
        )

    def fixed(self, record: tuple[Any, ...]) -> bytes:
        """The serialized constant part of a server span: its name and kind, and the attributes
        that are the same for every request of one API, route, method and listener (and the
        literal labels), made with the official Span message once per such key."""
        trace, _, head, api, route, _, _, peer, port = record
        sampler = trace.sampler
        key = (sampler, api, route, head.method, peer.scheme, head.version, port)
        cached = self._fixed.get(key)
        if cached is None:
            method = head.method.decode("latin-1")
            pairs: list[tuple[str, Any]] = [
                ("http.request.method", method), ("url.scheme", peer.scheme), ("server.port", port),
                ("network.protocol.version", head.version.decode("latin-1")), ("flexgw.api", api or ""),
            ]
            if route is not None:
                pairs += [("http.route", route), ("flexgw.route", route)]
            pairs += [(label.name, label.default) for label in sampler.labels if label.type == "literal"]
            span = Span(
                name=sampler.span_name or (f"{method} {route}" if route else method),
                kind=_SERVER,
                attributes=[KeyValue(key=k, value=_any(v)) for k, v in pairs],
            )
            if len(self._fixed) >= _CACHE_LIMIT:
                self._fixed.clear()
            cached = self._fixed[key] = span.SerializeToString()
        return cached

    def server_span(self, record: tuple[Any, ...], ids: bytes) -> bytes:
        """One exchange's server span (`ids`: its trace_id and span_id fields): the OpenTelemetry
        HTTP semantic-convention attributes, the API and route, the labels, the error cause as
        the status."""
        trace, end, head, _, _, status, cause, peer, _ = record
        parts = [ids, self.fixed(record),
                 _TIMES.pack(0x39, int(trace.start * 1e9), 0x41, int(end * 1e9)),
                 attribute("url.path", head.path), self._server[head.authority],
                 self._client[peer.address]]
        if trace.parent_id:
            parts.append(b"\x22\x08" + trace.parent_id.to_bytes(8, "big"))
        if trace.tracestate:
            parts.append(field(b"\x1a", trace.tracestate))
        if status:
            parts.append(self._status_code[status])
        sampler = trace.sampler
        if sampler.labels:
            for name, value in sampler.label_values(head.headers, variable=True):
                parts.append(attribute(name, value))
        if cause is not None:
            parts.append(self._error[cause])  # error.type, and the status
        elif status >= 500 or not status:
            parts.append(b"\x7a\x02\x18\x02")  # status ERROR without a message
        return b"".join(parts)

    def child_span(self, child: ChildSpan, common: bytes) -> bytes:
        """A child span (`common`: its trace_id and parent_span_id fields): an upstream attempt
        (with its connected and first_byte events), a policy wait, a side call."""
        parts = [
            common, b"\x12\x08", child.span_id.to_bytes(8, "big"),
            self._child_head[(child.name, _INTERNAL if child.kind == POLICY else _CLIENT)],
            _TIMES.pack(0x39, int(child.start * 1e9), 0x41, int(child.end * 1e9)),
        ]
        if child.kind == UPSTREAM:
            if child.address is not None:
                parts.append(self._peer[child.address])
            parts.append(_REUSED if child.reused else _NOT_REUSED)
            if child.connected:
                parts += (_CONNECTED[0], _FIXED64.pack(int(child.connected * 1e9)), _CONNECTED[1])
            if child.first_byte:
                parts += (_FIRST_BYTE[0], _FIXED64.pack(int(child.first_byte * 1e9)), _FIRST_BYTE[1])
        if child.attributes is not None:
            parts.append(attributes(child.attributes))
        if child.error is not None:
            parts.append(self._child_error[child.error])
        return b"".join(parts)

    def encode(self, records: list[tuple[Any, ...]]) -> bytes:
        """An ExportTraceServiceRequest holding the spans of `records`, serialized."""
        spans = [self._scope]
        append = spans.append
        server_span = self.server_span
        child_span = self.child_span
        for record in records:
            trace: Trace = record[0]
            trace_id = b"\x0a\x10" + trace.trace_id.to_bytes(16, "big")
            span_id = trace.span_id.to_bytes(8, "big")
            span = server_span(record, trace_id + b"\x12\x08" + span_id)
            n = len(span)
            append(b"\x12" + (_VARINTS[n] if n < 16384 else _varint(n)) + span)
            children = trace.children
            if children:
                common = trace_id + b"\x22\x08" + span_id
                for child in children:
                    span = child_span(child, common)
                    n = len(span)
                    append(b"\x12" + (_VARINTS[n] if n < 16384 else _varint(n)) + span)
        resource_spans = self._resource + field(b"\x12", b"".join(spans))
        return field(b"\x0a", resource_spans)


def _any(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    return AnyValue(string_value=str(value))


def _host(authority: str) -> str:
    """The host of a request's authority (no port, no IPv6 brackets)."""
    host = authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority
    return host.strip("[]")


_REUSED = attribute("flexgw.upstream.connection_reused", True)
_NOT_REUSED = attribute("flexgw.upstream.connection_reused", False)


def encode(settings: TracingSettings, records: list[tuple[Any, ...]]) -> bytes:
    """An ExportTraceServiceRequest holding the spans of `records`, serialized (one-off)."""
    return SpanEncoder(settings).encode(records)
