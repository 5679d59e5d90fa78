"""W3C Trace Context on the data path: the sampling decision per request, the trace an exchange
carries (its server span, the upstream attempts and the policies it waited for), and the
`traceparent` it sends upstream and on side calls.

Nothing here is built per request unless the request is traced: an API without tracing has
`Api.tracing is None`, and a sampler that can never trace (`overall: 0`) answers at once.
Spans are plain records; flexgw.service.tracing turns finished traces into OTLP messages off the
request path.
"""

from __future__ import annotations

import random
import re
from binascii import hexlify
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from flexgw.http.headers import HeaderList

#: First bytes of the header names begin() looks at (t, T, x, X).
_T_OR_X = frozenset(b"tTxX")
_ZEROS = bytes(8)
#: What a `traceparent` value has around the trace id and span id (in hex, `-` between).
_TP_START = b"00-"
_TP_END = b"-01"
_TP_LINE_START = b"traceparent: 00-"
_TP_LINE_END = b"-01\r\n"
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
#: A header counting as a client's request to be traced (Envoy's, which Flex's `client` reads).
CLIENT_TRACE_HEADER = b"x-client-trace-id"


def parse_traceparent(value: bytes) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) from a `traceparent` value; None when invalid (W3C
    Trace Context level 1: version ff, all-zero ids and a short future version are refused)."""
    match = _TRACEPARENT.fullmatch(value.strip().lower())
    if match is None:
        return None
    version, trace, span, flags, rest = match.groups()
    if version == b"ff" or (version == b"00" and rest):
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def traceparent(trace_id: int, span_id: int, sampled: bool = True) -> bytes:
    """A version-00 `traceparent` value."""
    return b"00-%032x-%016x-%s" % (trace_id, span_id, b"01" if sampled else b"00")


@attrs.frozen
class TraceLabel:
    """A `labels[]` entry: a span attribute from an environment variable, a request header or a
    literal (`defaultValue` when the variable or header is absent)."""

    name: str
    type: str  # "environment", "requestHeader" or "literal"
    key: str = ""
    default: str = ""


@attrs.frozen(eq=False)
class Sampler:
    """One API's tracing decision (Configuration `spec.tracing`, overridden by `tracing-flex`).

    Percentages as Flex and Envoy define them: `client` of the requests the client asks to trace
    (an incoming sampled `traceparent`, or `x-client-trace-id`), `random` of the others, then
    `overall` of what those selected. An incoming `traceparent` that is not sampled is honoured
    (not traced; it still reaches the upstream as it came).
    """

    client: float = 100.0
    random: float = 100.0
    overall: float = 100.0
    labels: tuple[TraceLabel, ...] = ()
    span_name: str | None = None
    environ: Any = attrs.field(factory=dict, repr=False)  # for `environment` labels
    rng: Callable[[], float] = attrs.field(factory=lambda: random.random, repr=False)
    ids: Callable[[int], int] = attrs.field(factory=lambda: random.getrandbits, repr=False)

    def begin(self, headers: HeaderList, now: float, clock: Any) -> Trace | None:
        """A Trace for a request whose head has `headers` (started at `now`; `clock` times its
        child spans), or None when it is not traced (then nothing is allocated)."""
        overall = self.overall
        if overall <= 0:
            return None
        parent = None
        state = None
        client = False
        for name, value in headers:
            if name[0] in _T_OR_X:  # traceparent, tracestate, x-client-trace-id
                lname = name.lower()
                if lname == b"traceparent":
                    parent = parse_traceparent(value)
                elif lname == b"tracestate":
                    state = value if state is None else state + b"," + value
                elif lname == CLIENT_TRACE_HEADER:
                    client = True
        # (a percentage of 100 needs no draw: rng() < 1.0)
        if parent is not None:
            if not parent[2] or (self.client < 100.0 and self.rng() * 100.0 >= self.client):
                return None
        elif client:
            if self.client < 100.0 and self.rng() * 100.0 >= self.client:
                return None
        elif self.random < 100.0 and self.rng() * 100.0 >= self.random:
            return None
        if overall < 100.0 and self.rng() * 100.0 >= overall:
            return None
        if parent is None:
            # One draw: the trace id, the first upstream attempt's span id, the server span's id
            # (W3C: no id is all zeros; eight zero bytes in a row, about 2**-59 likely: drawn again).
            ids = self.ids(256).to_bytes(32, "big")
            while _ZEROS in ids:
                ids = self.ids(256).to_bytes(32, "big")
            return Trace(self, ids, None, None, now, clock)
        ids = self.ids(128).to_bytes(16, "big")
        while _ZEROS in ids:
            ids = self.ids(128).to_bytes(16, "big")
        return Trace(self, parent[0].to_bytes(16, "big") + ids, parent[1].to_bytes(8, "big"), state, now, clock)

    def label_values(self, headers: HeaderList, variable: bool = False) -> list[tuple[str, str]]:
        """(attribute name, value) of each label for a request with `headers` (at export); with
        `variable`, only those that are not literals (read from the request)."""
        out = []
        for label in self.labels:
            if label.type == "literal":
                if variable:
                    continue
                value = label.default
            elif label.type == "environment":
                value = self.environ.get(label.key, label.default)
            else:
                value = _header(headers, label.key) or label.default
            out.append((label.name, value))
        return out


def _header(headers: HeaderList, name: str) -> str | None:
    """The first value of header `name` (`:method`, `:path`, `:authority` as HTTP/2 names them)."""
    wanted = name.lower().encode("latin-1")
    for key, value in headers:
        if key.lower() == wanted:
            return value.decode("latin-1")
    return None


#: The kinds of child span a trace records.
UPSTREAM = "upstream"
POLICY = "policy"
SIDE_CALL = "side_call"


class ChildSpan:
    """A span under the server span besides the upstream attempt under way (which the Trace
    holds itself): a policy the request waited for, a side call, an attempt that was retried.
    Times are the clock's seconds (`end` None until it ends); `span_id` is 8 bytes; `error` the
    failure cause, if any. An attempt keeps its address (a flexgw.plan.Upstream, or a string),
    whether its connection was reused and when it connected (None: never); `attributes` holds
    any other (name, value) pairs (None while there are none). Nothing here is OTLP: the
    exporter encodes it when the exchange ends."""

    __slots__ = ("address", "attributes", "connected", "end", "error", "kind", "name", "reused",
                 "span_id", "start")

    def __init__(self, kind: str, name: str, span_id: bytes, start: float) -> None:
        self.kind = kind
        self.name = name
        self.span_id = span_id
        self.start = start
        self.end: float | None = None
        self.error: str | None = None
        self.attributes: list[tuple[str, Any]] | None = None
        self.address: Any = None
        self.reused = False
        self.connected: float | None = None

    def set_attribute(self, name: str, value: Any) -> None:
        """Add an attribute (a string, an int or a bool) to the span."""
        if self.attributes is None:
            self.attributes = [(name, value)]
        else:
            self.attributes.append((name, value))

    def ended(self, clock: Any, error: str | None = None) -> None:
        """The span ends now (by `clock`), failed with cause `error` when given."""
        self.end = clock.seconds()
        if error is not None:
            self.error = error


class Trace:
    """The trace one exchange belongs to: its server span's ids and timing, its upstream attempt
    under way, and its other child spans.

    `ids` holds the trace id (16 bytes), the id of the first upstream attempt's span (8) and the
    server span's id (8), drawn at once; the attempt's fields are the Trace's own (an `attempt`
    id of None: no attempt yet), so that a request with one upstream attempt allocates nothing
    more. A retried attempt moves into `children` (None while there are none) as a ChildSpan.
    """

    __slots__ = ("address", "attempt", "attempt_end", "attempt_error", "attempt_start", "children",
                 "clock", "connected", "first_byte", "ids", "parent_id", "policy", "reused",
                 "sampler", "start", "tracestate")

    def __init__(
        self,
        sampler: Sampler,
        ids: bytes,
        parent_id: bytes | None,
        tracestate: bytes | None,
        start: float,
        clock: Any,
    ) -> None:
        self.sampler = sampler
        self.clock = clock
        self.ids = ids
        self.parent_id = parent_id  # None: a root span
        self.tracestate = tracestate
        self.start = start
        self.children: list[ChildSpan] | None = None
        self.attempt: bytes | None = None  # the span id of the upstream attempt under way
        self.policy: ChildSpan | None = None  # the policy being waited for

    @property
    def trace_id(self) -> int:
        """The trace id, as a number."""
        return int.from_bytes(self.ids[:16], "big")

    @property
    def span_id(self) -> int:
        """The server span's id, as a number."""
        return int.from_bytes(self.ids[24:], "big")

    def log_ids(self) -> tuple[str, str]:
        """The trace id and the server span's id in hex (for the access log)."""
        text = self.ids.hex()
        return text[:32], text[48:]

    def spans(self) -> int:
        """How many spans the trace has: the server span, the upstream attempt, the others."""
        children = self.children
        return (1 if self.attempt is None else 2) + (0 if children is None else len(children))

    def child(self, kind: str, name: str, start: float) -> ChildSpan:
        """A new child span, started at `start`."""
        span = ChildSpan(kind, name, (self.sampler.ids(64) or 1).to_bytes(8, "big"), start)
        if self.children is None:
            self.children = [span]
        else:
            self.children.append(span)
        return span

    def upstream_attempt(self, started: float, now: float, address: Any, reused: bool) -> bytes:
        """An upstream connection to `address` (a flexgw.plan.Upstream: its authority is read at
        export) is ready (`now`; asked for at `started`): the attempt's span starts (an earlier
        attempt ends here, failed), and its `traceparent` header line is returned, to send."""
        attempt = self.attempt
        if attempt is None:
            self.attempt = self.ids[16:24]
            line = _TP_LINE_START + hexlify(self.ids[:24], b"-", -16) + _TP_LINE_END
        else:
            self._retried(now)
            started = now
            attempt = self.attempt = (self.sampler.ids(64) or 1).to_bytes(8, "big")
            line = _TP_LINE_START + hexlify(self.ids[:16] + attempt, b"-", -16) + _TP_LINE_END
        self.attempt_start = started
        self.connected = now
        self.address = address
        self.reused = reused
        self.first_byte = self.attempt_end = self.attempt_error = None
        return line

    def _retried(self, now: float) -> None:
        """The attempt under way gives way to another: it becomes a child span, ended at `now`
        (failed: `retried`, unless its cause is known)."""
        span = ChildSpan(UPSTREAM, "upstream", self.attempt, self.attempt_start)  # type: ignore[arg-type]
        span.address = self.address
        span.reused = self.reused
        span.connected = self.connected
        span.end = self.attempt_end if self.attempt_end is not None else now
        span.error = self.attempt_error or "retried"
        if self.children is None:
            self.children = [span]
        else:
            self.children.append(span)

    def policy_waiting(self, name: str, kind: str, started: float | None = None) -> None:
        """The request waits for policy `name` (of `kind`), which started at `started` (before
        its on_request ran; None: now) and answered with a Deferred: its span, from that start."""
        span = self.policy = self.child(POLICY, f"policy {kind}", self.clock.seconds() if started is None else started)
        span.set_attribute("flexgw.policy.binding", name)

    def policy_done(self, error: str | None = None) -> None:
        """The policy being waited for has finished (`error`: how it failed)."""
        span, self.policy = self.policy, None
        if span is not None:
            span.end = self.clock.seconds()
            span.error = error

    def side_call(self, name: str) -> tuple[ChildSpan, bytes]:
        """A side call (a policy's own request) starts now: its span (the caller ends it with
        `span.ended(clock)`; else the exchange's end closes it) and the `traceparent` value to
        send with it."""
        span = self.child(SIDE_CALL, name, self.clock.seconds())
        return span, _TP_START + hexlify(self.ids[:16] + span.span_id, b"-", -16) + _TP_END

    def close(self, now: float, first_byte: float | None, error: str | None,
              upstream_started: float | None = None, address: Any = None) -> None:
        """The exchange ended at `now`: end what is still open (the last attempt gets its time to
        first byte, and the exchange's error cause if it had one). An upstream asked for at
        `upstream_started` (None: never) that never connected gets its failed attempt span here."""
        if self.attempt is None and upstream_started is not None and address is not None:
            self.attempt = self.ids[16:24]
            self.attempt_start = upstream_started
            self.address = address
            self.reused = False
            self.connected = self.first_byte = self.attempt_end = self.attempt_error = None
        if self.attempt is not None and self.attempt_end is None:
            self.attempt_end = now
            if first_byte is not None:
                self.first_byte = first_byte
            if error is not None and error.startswith(("upstream_", "dns_", "stream_idle")):
                self.attempt_error = error
        if self.policy is not None:
            self.policy_done("cancelled")
        for span in self.children or ():
            if span.end is None:
                span.end = now


def side_call(
    trace: Trace | None,
    name: str,
    start: Callable[[bytes | None], Deferred[Any]],
    failed: str,
    attributes: Sequence[tuple[str, Any]] = (),
) -> Deferred[Any]:
    """Make a side call (a policy's own request: JWKS, token, introspection, ext_authz, LDAP) for
    a request whose trace is `trace`: `start(traceparent)` begins the call and returns its
    Deferred; `traceparent` is the value to send with it (as a header, or gRPC metadata), or None
    when the request is not traced. A traced call is a child span of the server span, named
    `name`, with `attributes`, ending when the call does (`failed` is its error when the call
    fails). Every side call of the gateway is made through here."""
    if trace is None:
        return start(None)
    span, value = trace.side_call(name)
    for key, item in attributes:
        span.set_attribute(key, item)
    clock = trace.clock

    def ended(result: Any) -> Any:
        span.end = clock.seconds()
        if isinstance(result, Failure):
            span.error = failed
        return result

    try:
        d = start(value)
    except BaseException:
        ended(Failure())
        raise
    return d.addBoth(ended)
