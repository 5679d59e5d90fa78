"""`native-ext-proc-flex`: Envoy's external processing (ext_proc), as Flex Gateway configures it:
one bidirectional gRPC stream per request to `envoy.service.ext_proc.v3.ExternalProcessor/Process`.

Flex behaviour reproduced (docs `policies-included-external-processing`, reference §2.2; Flex runs
Envoy's ext_proc filter, so where the docs are silent Envoy's behaviour is Flex's):
- Keys and defaults: `uri` (required; `h2://`/`h2c://` host:port is plaintext HTTP/2 as in Flex's
  examples, `h2s://` TLS), `messageTimeout` 1000 ms, `maxMessageTimeout` 0,
  `requestHeaderMode`/`responseHeaderMode` `send` (or `skip`), `requestBodyMode`/
  `responseBodyMode` `none` (or `streamed`, `buffered`, `bufferedPartial`),
  `requestTrailerMode`/`responseTrailerMode` `skip` (or `send`), `failureModeAllow` false,
  `allowModeOverride` true.
- Messages are Envoy's own (`xds-protos`), on flexgw's HTTP/2 client pool (connections reused,
  streams multiplexed; flexgw.upstream.grpccall.StreamCall). Headers go in a HeaderMap as
  `raw_value` bytes, pseudo-headers first (`:authority`, `:method`, `:path`, `:scheme`;
  `:status` for responses); `end_of_stream` says whether a body follows.
- Each answer must come within `messageTimeout`; a processor may extend the wait for one answer
  with `override_message_timeout` up to `maxMessageTimeout` (0: not allowed), as Envoy.
- An answer of another kind than the message asked for (a spurious one), an undecodable one, a
  reset, an early end, an error status or a message over 2 MiB is a failure; so is a timeout.
  A failure answers 500 (504 for a timeout), as Envoy's local replies, unless `failureModeAllow`
  is true: then the request (or response) goes on unprocessed and the stream is dropped.
- Header mutations (`set_headers` with Envoy's `append`/`append_action` rule, `remove_headers`)
  apply to the request headers (answers to request headers and body) and the response headers
  (answers to response headers and body), trailer mutations to the response trailers. As Envoy's
  default mutation rules, pseudo-headers (`:`-prefixed) and `host` are never changed, nor are
  `content-length` and `transfer-encoding` (the gateway frames the message itself).
- A `body_mutation` (`body`, or `clear_body`) replaces the body; Content-Length is fixed up. An
  answer to headers with `CONTINUE_AND_REPLACE` replaces the body with its body mutation and
  skips the body phase, as Envoy.
- An `immediate_response` answers the client at once: its status (200 when unset), header
  mutations, body, and `grpc-status` when `grpc_status` is set.
- `mode_override` in an answer to headers changes the later phases when `allowModeOverride`.
- `clear_route_cache` is ignored: flexgw routes a request before its policies run, and a
  processor's header changes never re-route it (noted once in the log).
- Bodies sent whole (`buffered`) are bounded by the gateway's body buffer limit
  (`http.bodyBufferLimitBytes`, 1 MiB): a larger request body is a 413, a larger response body
  a 500, as Envoy's buffer limit.

Deliberate differences from Flex/Envoy:
- `streamed` bodies are held by the gateway too (bounded as `buffered`): a request body is sent as
  one message; a response body is sent in the pieces it arrived in, one message each, and the
  client gets the processed pieces once every answer is in. Envoy forwards each piece as soon as
  its answer arrives. `bufferedPartial` is `buffered`: a body over the limit is refused, where
  Envoy (`BUFFERED_PARTIAL` in processing_mode.proto: "the body contents up to the buffer limit
  will be sent") sends the first part, one message, and lets the rest through unprocessed.
  Doing so needs the exchange to hand a policy the first part while it streams the remainder
  (the exchange reads the whole body, 413 over the limit, before a body-reading policy runs).
- Request trailers are not sent to the processor (`requestTrailerMode: send` is accepted):
  policies are not given them (the HTTP/2 front keeps a request's trailers for the upstream on
  its exchange; the HTTP/1.1 front drops them). Response trailers are sent (`responseTrailerMode: send`) when a response body mode is set too.
- A request body mode turned on by `mode_override` applies only when the binding's own
  `requestBodyMode` is not `none` (only then does the gateway buffer the body before the
  policies run). Envoy honours it (external_processor.proto: an override in the answer to the
  request headers changes how the rest of the request is processed, unless
  `send_body_without_waiting_for_header_response`): it holds the body while it waits for that
  answer. flexgw holds the body then too, but has no way yet for a policy to ask for it whole
  once its headers answer is in.
- The response phase sees upstream responses only: an answer made by the gateway or another
  policy is not sent to the processor.
- Failures carry `x-flexgw-error`: `ext_proc_timeout`, `ext_proc_unavailable`, `ext_proc_reset`,
  `ext_proc_bad_response`.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from flexgw.http.request import BODY_NONE
from flexgw.http.tracecontext import side_call
from flexgw.policies.base import (
    BuildContext,
    HeaderList,
    IPolicy,
    IPolicyKind,
    LocalResponse,
    PolicyContext,
    UsesRuntime,
)
from flexgw.policies.ext_authz import (
    option_appends,
    option_name,
    option_overwrites,
    option_value,
    server_address,
)
from flexgw.policies.registry import register
from flexgw.upstream.grpccall import GrpcCallError, GrpcChannel, StreamCall

_log = Logger(namespace="flexgw.policies.ext_proc")

NAME = "native-ext-proc-flex"
PROCESS_PATH = b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"
DEFAULT_MESSAGE_TIMEOUT_MS = 1000
#: A processor message larger than this is a failure.
MAX_MESSAGE = 2 << 20
#: Header names a mutation never touches (besides `:`-prefixed ones).
_PROTECTED = frozenset({b"host", b"content-length", b"transfer-encoding"})
_CONTINUE_AND_REPLACE = 1

_HEADER_MODE = {"enum": ["send", "skip"]}
_BODY_MODE = {"enum": ["none", "streamed", "buffered", "bufferedPartial"]}
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "uri": {"type": "string", "minLength": 1},
        "messageTimeout": {"type": "integer", "minimum": 1, "default": DEFAULT_MESSAGE_TIMEOUT_MS},
        "maxMessageTimeout": {"type": "integer", "minimum": 0, "default": 0},
        "requestHeaderMode": {**_HEADER_MODE, "default": "send"},
        "responseHeaderMode": {**_HEADER_MODE, "default": "send"},
        "requestBodyMode": {**_BODY_MODE, "default": "none"},
        "responseBodyMode": {**_BODY_MODE, "default": "none"},
        "requestTrailerMode": {**_HEADER_MODE, "default": "skip"},
        "responseTrailerMode": {**_HEADER_MODE, "default": "skip"},
        "failureModeAllow": {"type": "boolean", "default": False},
        "allowModeOverride": {"type": "boolean", "default": True},
    },
    "required": ["uri"],
    "additionalProperties": False,
}
_BODY_NAMES = {0: "none", 1: "streamed", 2: "buffered", 3: "bufferedPartial"}


@attrs.frozen
class Modes:
    """What is sent to the processor (Envoy's ProcessingMode)."""

    request_headers: bool = True
    response_headers: bool = True
    request_body: str = "none"
    response_body: str = "none"
    request_trailers: bool = False
    response_trailers: bool = False

    def override(self, mode: Any) -> Modes:
        """Envoy's `mode_override`: fields left at DEFAULT (0) keep their value."""
        changes: dict[str, Any] = {}
        for field, name in (("response_header_mode", "response_headers"),
                            ("request_trailer_mode", "request_trailers"),
                            ("response_trailer_mode", "response_trailers")):
            value = getattr(mode, field)
            if value:
                changes[name] = value == 1  # SEND (2: SKIP)
        for field, name in (("request_body_mode", "request_body"),
                            ("response_body_mode", "response_body")):
            value = getattr(mode, field)
            if value in _BODY_NAMES:
                changes[name] = _BODY_NAMES[value]
        return attrs.evolve(self, **changes)

    @property
    def response_phase(self) -> bool:
        """Whether anything of the response goes to the processor."""
        return self.response_headers or self.response_body != "none" or self.response_trailers


@attrs.frozen
class Settings:
    """The binding's config, normalised."""

    uri: str
    scheme: str  # "h2c" or "h2"
    host: str
    port: int
    timeout: float  # messageTimeout, seconds
    max_timeout: float  # maxMessageTimeout, seconds (0: no override allowed)
    modes: Modes
    failure_mode_allow: bool
    allow_mode_override: bool


def settings_from(config: dict[str, Any]) -> Settings:
    """Check the config; errors name the field."""
    uri = config["uri"]
    scheme, host, port, _ = server_address(uri, True)
    modes = Modes(
        request_headers=config.get("requestHeaderMode", "send") == "send",
        response_headers=config.get("responseHeaderMode", "send") == "send",
        request_body=config.get("requestBodyMode", "none"),
        response_body=config.get("responseBodyMode", "none"),
        request_trailers=config.get("requestTrailerMode", "skip") == "send",
        response_trailers=config.get("responseTrailerMode", "skip") == "send",
    )
    return Settings(
        uri=uri,
        scheme=scheme,
        host=host,
        port=port,
        timeout=config.get("messageTimeout", DEFAULT_MESSAGE_TIMEOUT_MS) / 1000.0,
        max_timeout=config.get("maxMessageTimeout", 0) / 1000.0,
        modes=modes,
        failure_mode_allow=bool(config.get("failureModeAllow", False)),
        allow_mode_override=bool(config.get("allowModeOverride", True)),
    )


class _Immediate(Exception):
    """The processor answered with an immediate_response."""

    def __init__(self, response: LocalResponse) -> None:
        super().__init__("immediate response")
        self.response = response


class _Failed(Exception):
    """The processing failed: `cause` (x-flexgw-error) and the status to answer."""

    def __init__(self, cause: str, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.cause = cause
        self.status = status


def _pb() -> Any:
    from envoy.service.ext_proc.v3 import external_processor_pb2

    return external_processor_pb2


def _fill(header_map: Any, pairs: Any) -> None:
    entries = header_map.headers
    for name, value in pairs:
        entry = entries.add()
        entry.key = name.decode("latin-1").lower()
        entry.raw_value = value


def _settable(name: bytes) -> bool:
    lname = name.lower()
    return not lname.startswith(b":") and lname not in _PROTECTED


def _mutate_list(headers: HeaderList, mutation: Any) -> None:
    """Apply a HeaderMutation to a header list (response headers, trailers) in place."""
    for option in mutation.set_headers:
        name = option_name(option)
        if not _settable(name):
            continue
        lname = name.lower()
        exists = any(n.lower() == lname for n, _ in headers)
        value = option_value(option)
        if option_appends(option, exists):
            headers.append((name, value))
        elif option_overwrites(option, exists):
            headers[:] = [(n, v) for n, v in headers if n.lower() != lname]
            headers.append((name, value))
    for text in mutation.remove_headers:
        name = text.encode("latin-1").lower()
        if _settable(name):
            headers[:] = [(n, v) for n, v in headers if n.lower() != name]


def _mutate_request(ctx: PolicyContext, mutation: Any) -> None:
    """Apply a HeaderMutation to the upstream request's headers."""
    for option in mutation.set_headers:
        name = option_name(option)
        if not _settable(name):
            continue
        value = option_value(option)
        exists = ctx.request_header(name) is not None
        if option_appends(option, exists):
            ctx.add_request_header(name, value)
        elif option_overwrites(option, exists):
            ctx.set_request_header(name, value)
    for text in mutation.remove_headers:
        name = text.encode("latin-1")
        if _settable(name):
            ctx.remove_request_header(name)


def _immediate(message: Any) -> LocalResponse:
    """An ImmediateResponse as the client's answer."""
    headers: HeaderList = []
    _mutate_list(headers, message.headers)
    if message.HasField("grpc_status"):
        headers.append((b"grpc-status", b"%d" % message.grpc_status.status))
    status = message.status.code if message.HasField("status") and message.status.code else 200
    cause = "ext_proc_immediate_response" if status >= 400 else None  # (the access log's)
    return LocalResponse(status, tuple(headers), message.body, cause)


def _new_body(common: Any, body: bytes) -> bytes | None:
    """The body a CommonResponse's body_mutation asks for (None: unchanged)."""
    if not common.HasField("body_mutation"):
        return None
    mutation = common.body_mutation
    which = mutation.WhichOneof("mutation")
    if which == "body":
        return mutation.body
    if which == "clear_body" and mutation.clear_body:
        return b""
    return None


_route_cache_noted = False


def _note_route_cache(common: Any) -> None:
    global _route_cache_noted
    if common.clear_route_cache and not _route_cache_noted:
        _route_cache_noted = True
        _log.info("ext_proc: clear_route_cache is ignored (flexgw routes before policies run)")


class _Run:
    """One request's processing: its stream and the modes in force."""

    def __init__(self, policy: ExtProcPolicy, ctx: PolicyContext) -> None:
        self.policy = policy
        self.ctx = ctx
        settings = policy.settings
        self.modes = settings.modes
        self.timeout = settings.timeout
        self.call: StreamCall | None = None
        # A traced request's stream is a side call whose span ends when this fires (None: not
        # traced, or processing is over).
        self.over: Deferred[None] | None = None

    # -- the stream ------------------------------------------------------------------------------

    async def ask(self, message: Any, expected: str) -> Any:
        """Send one ProcessingRequest; its answer (a ProcessingResponse of the `expected` kind).
        Raises _Immediate for an immediate_response, _Failed for anything wrong."""
        call = self.call
        if call is None:
            call = self._open()
        call.send(message.SerializeToString())
        settings = self.policy.settings
        timeout = self.timeout
        while True:
            waiting = call.receive()
            waiting.addTimeout(timeout, self.policy.clock)
            try:
                data = await waiting
            except TimeoutError:
                raise _Failed("ext_proc_timeout", f"no answer in {timeout:g}s", 504) from None
            except GrpcCallError as e:
                cause = {"status": "unavailable", "closed": "reset"}.get(e.cause, e.cause)
                raise _Failed(f"ext_proc_{cause}", str(e)) from None
            reply = _pb().ProcessingResponse()
            try:
                reply.ParseFromString(data)
            except Exception as e:  # noqa: BLE001 (protobuf's DecodeError and kin)
                raise _Failed("ext_proc_bad_response", f"not a ProcessingResponse: {e}") from None
            which = reply.WhichOneof("response")
            if which is None and reply.HasField("override_message_timeout"):
                wanted = reply.override_message_timeout.ToTimedelta().total_seconds()
                if 0 < wanted <= settings.max_timeout:
                    timeout = wanted  # the processor needs longer for this answer
                continue
            break
        if which == "immediate_response":
            raise _Immediate(_immediate(reply.immediate_response))
        if which != expected:
            raise _Failed("ext_proc_bad_response", f"a {which} answer to {expected}")
        if (reply.HasField("mode_override") and settings.allow_mode_override
                and expected.endswith("_headers")):
            self.modes = self.modes.override(reply.mode_override)
        return reply

    def _open(self) -> StreamCall:
        """Open the stream to the processor. For a traced request it is a side call: a span
        lasting until processing is over, whose `traceparent` the processor gets as call
        metadata."""
        pool = self.policy.channel.pool
        trace = self.ctx.trace
        if trace is None:
            call = self.call = StreamCall(pool, PROCESS_PATH, limit=MAX_MESSAGE).open()
            return call

        def start(traceparent: bytes | None) -> Deferred[None]:
            metadata = () if traceparent is None else ((b"traceparent", traceparent),)
            self.call = StreamCall(pool, PROCESS_PATH, metadata, limit=MAX_MESSAGE).open()
            over = self.over = Deferred()
            return over

        side_call(trace, "ext_proc", start, "ext_proc_failed",
                  (("url.full", self.policy.settings.uri),)).addErrback(lambda _: None)
        return self.call  # type: ignore[return-value]

    def close(self) -> None:
        """Processing is over: half-close; the processor ends the stream (else it is reset)."""
        call, self.call = self.call, None
        if call is not None:
            call.close(self.policy.settings.timeout, self.policy.clock)
        over, self.over = self.over, None
        if over is not None:
            over.callback(None)

    def abandon(self) -> None:
        """Processing failed or was cancelled: reset the stream."""
        call, self.call = self.call, None
        if call is not None:
            call.cancel()
        over, self.over = self.over, None
        if over is not None:
            over.errback(Failure(CancelledError()))

    async def guarded(self, phase: Any) -> LocalResponse | None:
        """Run a phase: an immediate response or a failure ends processing (failureModeAllow:
        the message goes on unprocessed)."""
        try:
            return await phase
        except _Immediate as immediate:
            self.close()
            return immediate.response
        except _Failed as failed:
            self.abandon()
            self.policy.failures += 1
            _log.warn("External processing at {uri} failed ({cause}): {error}",
                      uri=self.policy.settings.uri, cause=failed.cause, error=str(failed))
            if self.policy.settings.failure_mode_allow:
                self._forget()
                return None
            cause = failed.cause.encode("ascii")
            return LocalResponse(failed.status, ((b"x-flexgw-error", cause),), b"", failed.cause)
        except CancelledError:
            self.abandon()
            raise

    def _forget(self) -> None:
        scratch = self.ctx.scratch
        if scratch is not None:
            scratch.pop(self.policy, None)

    # -- request ---------------------------------------------------------------------------------

    async def request(self) -> LocalResponse | None:
        """Request headers, then the request body, as the modes say."""
        ctx = self.ctx
        head = ctx.head
        has_body = head.body != BODY_NONE
        pb = _pb()
        skip_body = False
        if self.modes.request_headers:
            message = pb.ProcessingRequest()
            headers = message.request_headers
            authority = ctx.request_header(b"host") or (head.authority or "").encode("latin-1")
            _fill(headers.headers, (
                (b":authority", authority), (b":method", head.method), (b":path", head.target),
                (b":scheme", ctx.scheme.encode("ascii")),
                *(ctx.request_headers if ctx.request_headers_changed else head.headers)))
            headers.end_of_stream = not has_body
            common = (await self.ask(message, "request_headers")).request_headers.response
            _note_route_cache(common)
            _mutate_request(ctx, common.header_mutation)
            if common.status == _CONTINUE_AND_REPLACE:
                skip_body = True
                body = _new_body(common, ctx.body or b"")
                if body is not None and (ctx.body is not None or not has_body):
                    ctx.replace_body(body)
        if has_body and not skip_body and self.modes.request_body != "none" and ctx.body is not None:
            message = pb.ProcessingRequest()
            message.request_body.body = ctx.body
            message.request_body.end_of_stream = True
            common = (await self.ask(message, "request_body")).request_body.response
            _mutate_request(ctx, common.header_mutation)
            body = _new_body(common, ctx.body)
            if body is not None:
                ctx.replace_body(body)
        if self.modes.response_phase:
            if ctx.scratch is None:
                ctx.scratch = {}
            ctx.scratch[self.policy] = self
        else:
            self.close()
        return None

    # -- response --------------------------------------------------------------------------------

    async def response(self) -> LocalResponse | None:
        """Response headers; the body (and trailers) are asked of the exchange if the modes say."""
        ctx = self.ctx
        self._forget()
        if self.modes.response_headers:
            message = _pb().ProcessingRequest()
            headers = message.response_headers
            fields: HeaderList = ctx.response_headers or []
            _fill(headers.headers, ((b":status", b"%d" % ctx.response_status), *fields))
            headers.end_of_stream = (ctx.response_status in (204, 304)
                                     or ctx.head.method == b"HEAD")
            common = (await self.ask(message, "response_headers")).response_headers.response
            _note_route_cache(common)
            _mutate_list(fields, common.header_mutation)
            if common.status == _CONTINUE_AND_REPLACE:
                body = _new_body(common, b"")
                if body is not None:
                    ctx.want_response_body(lambda pieces, trailers: ctx.replace_response_body(body))
                self.close()
                return None
        if self.modes.response_body != "none":
            ctx.want_response_body(self.body_hook)
            return None
        self.close()
        return None

    def body_hook(self, pieces: list[bytes], trailers: HeaderList | None) -> Deferred[Any]:
        """The whole response body is here (ctx.want_response_body)."""
        return ensureDeferred(self.guarded(self.response_body(pieces, trailers)))

    async def response_body(self, pieces: list[bytes], trailers: HeaderList | None) -> None:
        """Send the body (whole, or piece by piece when streamed) and the trailers."""
        ctx = self.ctx
        pb = _pb()
        if self.modes.response_body == "streamed":
            parts = pieces or [b""]
        else:
            parts = [b"".join(pieces)]
        changed = False
        out = []
        call_parts = []
        for index, part in enumerate(parts):
            message = pb.ProcessingRequest()
            message.response_body.body = part
            message.response_body.end_of_stream = index == len(parts) - 1
            call_parts.append((message, part))
        for message, part in call_parts:
            common = (await self.ask(message, "response_body")).response_body.response
            _mutate_list(ctx.response_headers or [], common.header_mutation)
            body = _new_body(common, part)
            if body is not None:
                changed = True
                part = body
            out.append(part)
        if changed:
            ctx.replace_response_body(b"".join(out))
        if self.modes.response_trailers and trailers is not None:
            message = pb.ProcessingRequest()
            _fill(message.response_trailers.trailers, trailers)
            reply = await self.ask(message, "response_trailers")
            _mutate_list(trailers, reply.response_trailers.header_mutation)
        self.close()


@implementer(IPolicy)
class ExtProcPolicy(UsesRuntime):
    """One binding: the settings and (from first use) the processor's HTTP/2 pool."""

    response_async = True

    def __init__(
        self, settings: Settings, reactor: Any = None, clock: Any = None,
        shared: dict[Any, Any] | None = None, tls_settings: Any = None,
    ) -> None:
        self.settings = settings
        self._reactor = reactor
        self._clock = clock
        self._shared = shared if shared is not None else {}
        self._tls = tls_settings
        self._channel: GrpcChannel | None = None
        # The request body is buffered (bounded) before the policy runs when it is sent.
        self.needs_body = settings.modes.request_body != "none"
        self.response_phase = settings.modes.response_phase or settings.allow_mode_override
        self.calls = 0
        self.failures = 0

    @property
    def channel(self) -> GrpcChannel:
        """The HTTP/2 pool to the processor, shared by bindings naming the same one."""
        if self._channel is None:
            s = self.settings
            key = (NAME, s.scheme, s.host, s.port, self._tls)
            channel = self._shared.get(key)
            if channel is None:
                channel = self._shared[key] = GrpcChannel(
                    self._runtime_reactor(), self.clock, s.scheme, s.host, s.port, s.timeout,
                    self._tls, key=f"ext-proc {s.uri}")
            self._channel = channel
        return self._channel

    def on_request(self, ctx: PolicyContext) -> Any:
        """Open the stream; process the request headers and body as the modes say."""
        self.calls += 1
        run = _Run(self, ctx)
        return ensureDeferred(run.guarded(run.request()))

    def on_done(self, ctx: PolicyContext, status: int, cause: str | None) -> None:
        """The request ended: a stream still open (no response reached this policy: a local
        answer, an upstream failure, the client gone) is reset."""
        scratch = ctx.scratch
        run = scratch.pop(self, None) if scratch is not None else None
        if run is not None:
            run.abandon()

    def on_response(self, ctx: PolicyContext) -> Any:
        """Process the response headers (the body through ctx.want_response_body)."""
        scratch = ctx.scratch
        run = scratch.get(self) if scratch is not None else None
        if run is None:
            return None
        return ensureDeferred(run.guarded(run.response()))


@implementer(IPolicyKind)
class ExtProcKind:
    """The `native-ext-proc-flex` policy kind."""

    name = NAME
    schema = SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> ExtProcPolicy:
        """Check the config; connections are made at the first request."""
        services = context.services
        return ExtProcPolicy(
            settings_from(config),
            context.reactor or services.reactor,
            context.clock or services.clock,
            services.shared,
            getattr(services, "side_tls", None),
        )


KIND = register(ExtProcKind())
