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
from math import trunc
from typing import Any

from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span

import flexgw
from flexgw.http.tracecontext import POLICY, UPSTREAM
from flexgw.plan import TracingSettings

# Span.SpanKind values.
_SERVER, _CLIENT, _INTERNAL = 2, 3, 1
_FIXED64 = struct.Struct("<Q")
#: A server span's trace_id (field 1), span_id (2), start and end times (7, 8).
_SERVER_HEAD = struct.Struct("<2s16s2s8sBQBQ")
#: A child span's trace_id, span_id, parent_span_id (4), start and end times.
_CHILD_HEAD = struct.Struct("<2s16s2s8s2s8sBQBQ")
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
(_CONNECTED_0, _CONNECTED_1), (_FIRST_BYTE_0, _FIRST_BYTE_1) = _CONNECTED, _FIRST_BYTE


def _answered_struct(reused: bool, parent: bool) -> tuple[Any, int, int]:
    """The common case's one pack (SpanEncoder.answered), constants between two fields joined:
    the attempt span's ids (its tag and length, its constant part and the trace id's tag come
    before), times and events (`connected` unless the connection was reused, `first_byte`);
    the server span's tag, length (a two-byte varint), ids (its parent's too when it has one),
    times, and its `url.path` attribute up to the path's bytes (which follow, then its constant
    part). Returns the Struct's pack, the size of the attempt span (its trace id's tag
    included) and that of the server span less its path and constant part."""
    attempt = "<16s2s8s2s8sBQBQ" + ("3sQ13s" if reused else "3sQ14sQ13s")
    server = "<2s2s16s2s8s" + ("2s8s" if parent else "") + "BQBQ16s"
    return (struct.Struct(attempt + server[1:]).pack, 2 + struct.calcsize(attempt) - 1,
            struct.calcsize(server) - 2)


_ANSWERED = {(reused, parent): _answered_struct(reused, parent) for reused in (False, True)
             for parent in (False, True)}
_NEW_ROOT = _ANSWERED[False, False][0]
_NEW_CHILD = _ANSWERED[False, True][0]
_REUSED_ROOT = _ANSWERED[True, False][0]
_REUSED_CHILD = _ANSWERED[True, True][0]
#: What the common case packs between two fields (SpanEncoder.answered).
_CONNECTED_FIRST = _CONNECTED_1 + _FIRST_BYTE_0
_FIRST_SERVER = _FIRST_BYTE_1 + b"\x12"  # (the server span's tag)
#: A `url.path` attribute up to the path, by the path's length (under 100 bytes).
_PATH_HEADS = [b"\x4a%c\x0a\x08url.path\x12%c\x0a%c" % (n + 14, n + 2, n) for n in range(100)]


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
    """OTLP bytes of finished traces: each trace's spans as it ends (`trace`), then whole
    ExportTraceServiceRequests of those (`request`)."""

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
        self._error = _Cache(lambda cause: attribute("error.type", cause) + _status(cause))
        self._child_error = _Cache(_status)
        self._child_head = _Cache(
            lambda pair: field(b"\x2a", pair[0].encode("utf-8")) + b"\x30" + _VARINTS[pair[1]]
        )
        self._request_attributes_cache = _Cache(self._request_attributes)
        self._upstream_parts = _Cache(self._upstream)
        # The common case's constant pieces (or False: the key never is the common case).
        self._answered: dict[tuple[Any, ...], Any] = {}

    def fixed(self, sampler: Any, api: str | None, route: str | None, head: Any, scheme: str, port: int) -> bytes:
        """The serialized constant part of a server span: its name and kind, and the attributes
        that are the same for every request of one API, route, method and listener (and the
        literal labels), made with the official Span message once per such key."""
        key = (sampler, api, route, head.method, head.version, port)
        cached = self._fixed.get(key)
        if cached is None:
            method = head.method.decode("latin-1")
            pairs: list[tuple[str, Any]] = [
                ("http.request.method", method), ("url.scheme", scheme), ("server.port", port),
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

    def _request_attributes(self, key: tuple[str, str, int]) -> bytes:
        """server.address, client.address and http.response.status_code (0: none)."""
        authority, address, status = key
        out = attribute("server.address", _host(authority)) + attribute("client.address", address)
        return out + attribute("http.response.status_code", status) if status else out

    def _upstream(self, key: tuple[Any, bool]) -> bytes:
        """The constant part of an upstream attempt's span: name, kind, server.address, reuse."""
        address, reused = key
        authority = address if isinstance(address, str) else address.authority
        return (self._child_head[("upstream", _CLIENT)] + attribute("server.address", authority)
                + attribute("flexgw.upstream.connection_reused", reused))

    def server_tail(self, trace: Any, head: Any, status: int, cause: str | None) -> bytes:
        """What a server span has besides ids, times, constant part and path: the parent, the
        trace state, the request-header labels, the error status."""
        parts = []
        if trace.parent_id is not None:
            parts.append(b"\x22\x08" + trace.parent_id)
        if trace.tracestate:
            parts.append(field(b"\x1a", trace.tracestate))
        sampler = trace.sampler
        if sampler.labels:
            for name, value in sampler.label_values(head.headers, variable=True):
                parts.append(attribute(name, value))
        if cause is not None:
            parts.append(self._error[cause])  # error.type, and the status
        elif status >= 500 or not status:
            parts.append(b"\x7a\x02\x18\x02")  # status ERROR without a message
        return b"".join(parts)

    def _child(self, trace_id: bytes, parent: bytes, span: Any) -> bytes:
        """A child span (a ChildSpan), tag and length included."""
        parts = []
        if span.kind == UPSTREAM:
            parts.append(self._upstream_parts[(span.address, span.reused)])
            if span.connected is not None:
                parts.append(_CONNECTED[0] + _FIXED64.pack(int(span.connected * 1e9)) + _CONNECTED[1])
        else:
            parts.append(self._child_head[(span.name, _INTERNAL if span.kind == POLICY else _CLIENT)])
        if span.attributes is not None:
            parts.append(attributes(span.attributes))
        if span.error is not None:
            parts.append(self._child_error[span.error])
        tail = b"".join(parts)
        return field(b"\x12", _CHILD_HEAD.pack(
            b"\x0a\x10", trace_id, b"\x12\x08", span.span_id, b"\x22\x08", parent,
            0x39, int(span.start * 1e9), 0x41, int(span.end * 1e9),
        ) + tail)

    def _attempt(self, trace: Any, trace_id: bytes, server: bytes) -> bytes:
        """The span of the trace's last upstream attempt (ended), tag and length included."""
        parts = [self._upstream_parts[(trace.address, trace.reused)]]
        if trace.connected is not None and not trace.reused:
            parts.append(_CONNECTED[0] + _FIXED64.pack(int(trace.connected * 1e9)) + _CONNECTED[1])
        if trace.first_byte is not None:
            parts.append(_FIRST_BYTE[0] + _FIXED64.pack(int(trace.first_byte * 1e9)) + _FIRST_BYTE[1])
        if trace.attempt_error is not None:
            parts.append(self._child_error[trace.attempt_error])
        return field(b"\x12", _CHILD_HEAD.pack(
            b"\x0a\x10", trace_id, b"\x12\x08", trace.attempt, b"\x22\x08", server,
            0x39, int(trace.attempt_start * 1e9), 0x41, int(trace.attempt_end * 1e9),
        ) + b"".join(parts))

    def trace(self, trace: Any, end: float, head: Any, api: str | None, route: str | None,
              status: int, cause: str | None, peer: Any, port: int) -> bytes:
        """The spans of a finished trace (closed: flexgw.http.tracecontext.Trace.close), each a
        ScopeSpans `spans` entry, for `request` to gather: the server span of the request
        `head` (to API `api`, route `route`, answered `status`, failed with `cause`, from
        `peer` on listener port `port`, ended at `end`) and its children.

        (The common case has a faster way: `answered`.)"""
        ids = trace.ids
        trace_id = ids[:16]
        server = ids[24:]
        sampler = trace.sampler
        fixed = (self._fixed.get((sampler, api, route, head.method, head.version, port))
                 or self.fixed(sampler, api, route, head, peer.scheme, port))
        path = head.path.encode("utf-8")
        n = len(path)
        if n < 100:
            path = b"\x4a%c\x0a\x08url.path\x12%c\x0a%c%s" % (n + 14, n + 2, n, path)
        else:
            path = attribute("url.path", head.path)
        common = self._request_attributes_cache[(head.authority, peer.address, status)]
        plain = not (trace.parent_id or trace.tracestate or sampler.labels or cause is not None
                     or status >= 500 or not status)
        tail = b"" if plain else self.server_tail(trace, head, status, cause)
        n = _SERVER_HEAD.size + len(fixed) + len(path) + len(common) + len(tail)
        parts = [
            b"\x12" + varint(n),
            _SERVER_HEAD.pack(b"\x0a\x10", trace_id, b"\x12\x08", server,
                              0x39, int(trace.start * 1e9), 0x41, int(end * 1e9)),
            fixed, path, common, tail,
        ]
        if trace.attempt is not None:
            parts.append(self._attempt(trace, trace_id, server))
        for child in trace.children or ():
            parts.append(self._child(trace_id, server, child))
        return b"".join(parts)

    def answered(self, trace: Any, exchange: Any, port: int, end: float) -> bytes | None:
        """The spans of a finished exchange's trace in the common case, fast, or None when this
        is not it (then `trace` encodes them). The common case: a server span without trace
        state or error (a parent is fine) whose one upstream attempt answered (the Trace is
        closed: `attempt_end`, `first_byte`), of an API without request-header labels, to a
        path under 100 bytes.

        Everything but the ids, the times and the path is the same for every request of one
        API, route, method, listener, authority, client address, status and upstream address:
        those pieces come from one cache lookup, the rest is one struct pack."""
        head = exchange.head
        address = trace.address
        reused = trace.reused
        route = exchange.route
        key = (trace.sampler, exchange.api_key, id(route), head.method, head.version, port,
               head.authority, exchange.front.peer.address, exchange.response_status,
               id(address), reused)
        entry = self._answered.get(key)
        if entry is None:
            entry = self._answered_entry(key, trace, exchange, route, address)
        if not entry:
            return None
        path = head.path.encode("utf-8")
        n = len(path)
        if n >= 100:
            return None
        prefix, constant, size, _, _ = entry
        ids = trace.ids
        trace_id = ids[:16]
        server = ids[24:]
        attempt_end = trunc(end * 1e9)
        parent = trace.parent_id
        size += n if parent is None else n + 10  # (the parent_span_id field: 10 bytes)
        if reused:
            if parent is None:
                packed = _REUSED_ROOT(
                    trace_id, b"\x12\x08", trace.attempt, b"\x22\x08", server,
                    0x39, trunc(trace.attempt_start * 1e9), 0x41, attempt_end,
                    _FIRST_BYTE_0, trunc(trace.first_byte * 1e9), _FIRST_SERVER,
                    _VARINTS[size], b"\x0a\x10", trace_id, b"\x12\x08", server,
                    0x39, trunc(trace.start * 1e9), 0x41, attempt_end, _PATH_HEADS[n],
                )
            else:
                packed = _REUSED_CHILD(
                    trace_id, b"\x12\x08", trace.attempt, b"\x22\x08", server,
                    0x39, trunc(trace.attempt_start * 1e9), 0x41, attempt_end,
                    _FIRST_BYTE_0, trunc(trace.first_byte * 1e9), _FIRST_SERVER,
                    _VARINTS[size], b"\x0a\x10", trace_id, b"\x12\x08", server, b"\x22\x08", parent,
                    0x39, trunc(trace.start * 1e9), 0x41, attempt_end, _PATH_HEADS[n],
                )
        elif parent is None:
            packed = _NEW_ROOT(
                trace_id, b"\x12\x08", trace.attempt, b"\x22\x08", server,
                0x39, trunc(trace.attempt_start * 1e9), 0x41, attempt_end,
                _CONNECTED_0, trunc(trace.connected * 1e9), _CONNECTED_FIRST,
                trunc(trace.first_byte * 1e9), _FIRST_SERVER,
                _VARINTS[size], b"\x0a\x10", trace_id, b"\x12\x08", server,
                0x39, trunc(trace.start * 1e9), 0x41, attempt_end, _PATH_HEADS[n],
            )
        else:
            packed = _NEW_CHILD(
                trace_id, b"\x12\x08", trace.attempt, b"\x22\x08", server,
                0x39, trunc(trace.attempt_start * 1e9), 0x41, attempt_end,
                _CONNECTED_0, trunc(trace.connected * 1e9), _CONNECTED_FIRST,
                trunc(trace.first_byte * 1e9), _FIRST_SERVER,
                _VARINTS[size], b"\x0a\x10", trace_id, b"\x12\x08", server, b"\x22\x08", parent,
                0x39, trunc(trace.start * 1e9), 0x41, attempt_end, _PATH_HEADS[n],
            )
        return b"".join((prefix, packed, path, constant))

    def _answered_entry(self, key: tuple[Any, ...], trace: Any, exchange: Any, route: Any,
                        address: Any) -> Any:
        """The cached pieces of `answered` for `key`: the attempt span's tag, length and constant
        part (and the trace id's tag); the server span's constant part; the server span's size
        less the path's bytes (and its parent's id); the route and the upstream address (kept alive, so that their
        id() in the key is never another's). False when requests of this key never are the
        common case."""
        sampler, api, _, _, _, port, authority, client, status, _, reused = key
        entry: Any = False
        if not (status >= 500 or not status or route is None
                or any(label.type == "requestHeader" for label in sampler.labels)):
            head = exchange.head
            # (environment labels are read when the configuration is applied: constant here)
            labels = b"".join(attribute(name, value) for name, value in sampler.label_values(
                head.headers, variable=True))
            constant = (self.fixed(sampler, api, route.name, head, exchange.front.peer.scheme, port)
                        + labels + self._request_attributes((authority, client, status)))
            _, attempt_size, server_size = _ANSWERED[reused, False]
            upstream = self._upstream((address, reused))
            size = server_size + len(constant)
            if 128 <= size < 16384 - 110:
                entry = (b"\x12" + varint(len(upstream) + attempt_size) + upstream + b"\x0a\x10",
                         constant, size, route, address)
        if len(self._answered) >= _CACHE_LIMIT:
            self._answered.clear()
        self._answered[key] = entry
        return entry

    def request(self, traces: list[bytes]) -> bytes:
        """An ExportTraceServiceRequest holding the spans of `traces` (each what `trace` made):
        one ResourceSpans of one ScopeSpans, joined in one copy."""
        scope_spans = len(self._scope) + sum(map(len, traces))
        scope_head = b"\x12" + varint(scope_spans)
        parts = [b"\x0a", varint(len(self._resource) + len(scope_head) + scope_spans),
                 self._resource, scope_head, self._scope]
        parts += traces
        return b"".join(parts)


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


def encode(settings: TracingSettings, traces: Iterable[tuple[Any, ...]]) -> bytes:
    """An ExportTraceServiceRequest holding the spans of `traces` (each the arguments of
    SpanEncoder.trace), serialized (one-off: tests, tools)."""
    encoder = SpanEncoder(settings)
    return encoder.request([encoder.trace(*arguments) for arguments in traces])
