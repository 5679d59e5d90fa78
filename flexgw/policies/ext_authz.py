"""`native-ext-authz-flex`: Envoy's external authorization (gRPC `Authorization/Check`, or an
HTTP authorization server), as Flex Gateway configures it.

Flex behaviour reproduced (docs `policies-included-external-authorization`, reference §2.2; Flex
runs Envoy's ext_authz filter, so where the docs are silent Envoy's behaviour is Flex's):
- Keys: `uri` (required), `serverType` `grpc` (default) or `http`, `serverVersion` (`v3`),
  `requestTimeout` (ms, default 5000), `includePeerCertificate` (false), `allowedHeaders`, and
  for HTTP servers `serviceRequestHeadersToAdd` (`[{key, value}]`),
  `serviceResponseUpstreamHeaders`, `serviceResponseUpstreamHeadersToAppend`,
  `serviceResponseClientHeaders`, `serviceResponseClientHeadersOnSuccess`.
- gRPC (`h2://` or `h2c://` host:port, plaintext HTTP/2 as in Flex's examples; `h2s://` for
  TLS): `envoy.service.auth.v3.Authorization/Check` with Envoy's own `CheckRequest` (the
  `xds-protos` package: Envoy's data-plane API compiled by the gRPC project), spoken on
  flexgw's own HTTP/2 client pool (connections reused, calls multiplexed). The request's
  attributes: source (client address), request.time, and request.http: method, path (with
  query), host, scheme, protocol, size, headers. Headers: all of them (pseudo-headers
  `:authority`, `:method`, `:path`, `:scheme` included) unless `allowedHeaders` names some;
  with `FLEX_HEADER_RAW_VALUE_ENABLE` true (Flex's default) in `header_map` as raw bytes,
  with it false in the `headers` map as UTF-8 (several values joined with ","). An OK answer
  applies `ok_response`: `headers` to the upstream request (`append` true adds, false
  overwrites; without `append`, `append_action`), `headers_to_remove`, and
  `response_headers_to_add` to the client's response. A denial answers `denied_response`'s
  status (403 when unset), headers and body.
- HTTP (`http://`, `https://`): the authorization request has the client's method, the URI's
  path prefix + the client's path and query, no body (`Content-Length: 0`), the client's Host,
  `Authorization` and the headers `allowedHeaders` names, plus `serviceRequestHeadersToAdd`.
  A 200 allows (Envoy: only 200, not every 2xx); the answer's headers named in
  `serviceResponseUpstreamHeaders` replace the upstream request's, those in
  `...ToAppend` are added, those in `serviceResponseClientHeadersOnSuccess` go to the client's
  response. Any other status denies with that status and body, and the answer's headers named
  in `serviceResponseClientHeaders` (all but framing/hop-by-hop ones when the list is unset;
  `WWW-Authenticate` and `Location` always).
- A server that is unreachable, times out, resets or answers garbage: 403 with an empty body
  (Envoy's `status_on_error`); Flex documents no `failureModeAllow` for this policy, so a
  failure never lets the request through.

Deliberate differences from Flex:
- A gateway-made 403 (server failure) carries `x-flexgw-error: ext_authz_unavailable`,
  `ext_authz_timeout`, `ext_authz_reset` or `ext_authz_bad_response`; a denial by the server
  carries `ext_authz_denied` (Envoy sends neither).
- `serverVersion: v2` (Envoy's removed v2 API) is a config error: Envoy itself no longer serves
  it.
- `includePeerCertificate`: on an mTLS connection the verified client certificate goes in
  `attributes.source.certificate` as URL-encoded PEM (Envoy's form). The HTTP server type does
  not send it, as Envoy does not: its HTTP client (`RawHttpClientImpl::check` in
  `ext_authz_http_impl.cc`) builds the authorization request from the CheckRequest's allowed
  request headers, `headers_to_add` and the body only, never `attributes.source`. (Envoy users
  who want the certificate at an HTTP server add it as a header themselves, e.g. with
  `%DOWNSTREAM_PEER_CERT%`, which Flex's `serviceRequestHeadersToAdd` values do not offer.)
- Answers are bounded (1 MiB for gRPC and HTTP bodies); a larger one is a failure (403).
- The HTTP server type uses treq on a persistent connection pool (or the gateway's side-call
  agent when `Configuration` sets TLS or a forward proxy for policy calls).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from flexgw.http.tracecontext import side_call
from flexgw.policies.base import (
    BuildContext,
    IPolicy,
    IPolicyKind,
    LocalResponse,
    PolicyConfigError,
    PolicyContext,
    UsesRuntime,
)
from flexgw.policies.registry import register
from flexgw.upstream.grpccall import GrpcChannel

_log = Logger(namespace="flexgw.policies.ext_authz")

NAME = "native-ext-authz-flex"
CHECK_PATH = b"/envoy.service.auth.v3.Authorization/Check"
DEFAULT_TIMEOUT_MS = 5000
#: An answer (gRPC message or HTTP body) larger than this is a failure.
MAX_ANSWER = 1 << 20
#: Response headers never copied from an HTTP authorization answer.
_NOT_COPIED = frozenset({
    b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"host",
    b"proxy-connection", b"te", b"trailer", b"upgrade", b"date", b"server",
})
_ALWAYS_TO_CLIENT = (b"www-authenticate", b"location")

_NAMES = {"type": "array", "items": {"type": "string", "minLength": 1}}
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "uri": {"type": "string", "minLength": 1},
        "serverType": {"enum": ["grpc", "http"], "default": "grpc"},
        "serverVersion": {"enum": ["v3", "v2"], "default": "v3"},
        "requestTimeout": {"type": "integer", "minimum": 1, "default": DEFAULT_TIMEOUT_MS},
        "includePeerCertificate": {"type": "boolean", "default": False},
        "allowedHeaders": _NAMES,
        "serviceRequestHeadersToAdd": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"key": {"type": "string", "minLength": 1}, "value": {"type": "string"}},
                "required": ["key", "value"],
                "additionalProperties": False,
            },
        },
        "serviceResponseUpstreamHeaders": _NAMES,
        "serviceResponseUpstreamHeadersToAppend": _NAMES,
        "serviceResponseClientHeaders": _NAMES,
        "serviceResponseClientHeadersOnSuccess": _NAMES,
    },
    "required": ["uri"],
    "additionalProperties": False,
}


def _lower(names: Any) -> tuple[bytes, ...] | None:
    if names is None:
        return None
    return tuple(str(n).lower().encode("latin-1") for n in names)


@attrs.frozen
class Settings:
    """The binding's config, normalised."""

    uri: str
    grpc: bool
    scheme: str  # grpc: "h2c" or "h2"; http: "http" or "https"
    host: str
    port: int
    path_prefix: str
    timeout: float
    allowed: tuple[bytes, ...] | None
    request_headers_to_add: tuple[tuple[bytes, bytes], ...]
    upstream_headers: tuple[bytes, ...]
    upstream_headers_append: tuple[bytes, ...]
    client_headers: tuple[bytes, ...] | None
    client_headers_on_success: tuple[bytes, ...]
    raw_values: bool
    include_peer_certificate: bool = False


def server_address(uri: str, grpc: bool, label: str = "grpc") -> tuple[str, str, int, str]:
    """(pool scheme, host, port, path prefix) of a server's `uri`: `h2://`/`h2c://`/`grpc://`
    (plaintext HTTP/2) or `h2s://`/`grpcs://` (TLS) for gRPC, `http://`/`https://` for HTTP;
    anything else is a config error on `uri`."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if grpc:
        schemes = {"h2": "h2c", "h2c": "h2c", "grpc": "h2c", "h2s": "h2", "grpcs": "h2"}
        default_port = 443 if scheme in ("h2s", "grpcs") else 80
    else:
        schemes = {"http": "http", "https": "https"}
        default_port = 443 if scheme == "https" else 80
    if scheme not in schemes or not parts.hostname:
        wanted = "h2://, h2c:// or h2s://" if grpc else "http:// or https://"
        raise PolicyConfigError(f"a {label} server needs a {wanted} URI: {uri!r}", "uri")
    try:
        port = parts.port or default_port
    except ValueError:
        raise PolicyConfigError(f"bad port in {uri!r}", "uri") from None
    return schemes[scheme], parts.hostname, port, parts.path.rstrip("/")


def settings_from(config: dict[str, Any], environ: Any = os.environ) -> Settings:
    """Check the config; errors name the field."""
    uri = config["uri"]
    grpc = config.get("serverType", "grpc") == "grpc"
    if config.get("serverVersion", "v3") != "v3":
        raise PolicyConfigError("only serverVersion v3 is served (Envoy removed v2)", "serverVersion")
    scheme, host, port, path = server_address(uri, grpc, config.get("serverType", "grpc"))
    raw = str(environ.get("FLEX_HEADER_RAW_VALUE_ENABLE", "true")).strip().lower() != "false"
    return Settings(
        uri=uri,
        grpc=grpc,
        scheme=scheme,
        host=host,
        port=port,
        path_prefix=path,
        timeout=config.get("requestTimeout", DEFAULT_TIMEOUT_MS) / 1000.0,
        allowed=_lower(config.get("allowedHeaders")),
        request_headers_to_add=tuple(
            (h["key"].encode("latin-1"), h["value"].encode("latin-1"))
            for h in config.get("serviceRequestHeadersToAdd", ())
        ),
        upstream_headers=_lower(config.get("serviceResponseUpstreamHeaders")) or (),
        upstream_headers_append=_lower(config.get("serviceResponseUpstreamHeadersToAppend")) or (),
        client_headers=_lower(config.get("serviceResponseClientHeaders")),
        client_headers_on_success=_lower(config.get("serviceResponseClientHeadersOnSuccess")) or (),
        raw_values=raw,
        include_peer_certificate=bool(config.get("includePeerCertificate", False)),
    )


# -- outcomes ------------------------------------------------------------------------------------


def _failed(cause: str) -> LocalResponse:
    """Envoy's status_on_error: 403, empty body; plus flexgw's cause."""
    return LocalResponse(403, ((b"x-flexgw-error", cause.encode("ascii")),), b"", cause)


def _denied(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> LocalResponse:
    """The server's denial, as it asked."""
    if not 200 <= status <= 599:
        status = 403
    return LocalResponse(status, (*headers, (b"x-flexgw-error", b"ext_authz_denied")), body,
                         "ext_authz_denied")


def _cause(failure: Failure) -> str:
    from flexgw.upstream.grpccall import GrpcCallError

    error = failure.value
    if isinstance(error, GrpcCallError):
        return {"status": "ext_authz_unavailable"}.get(error.cause, f"ext_authz_{error.cause}")
    if failure.check(TimeoutError, CancelledError):
        return "ext_authz_timeout"
    if isinstance(error, _BadAnswer):
        return "ext_authz_bad_response"
    return "ext_authz_unavailable"


def _timed_out(result: Any, timeout: float) -> Failure:
    """treq's cancellation (however it reports it) after `timeout`: a timeout."""
    return Failure(TimeoutError(f"no answer in {timeout:g}s"))


class _BadAnswer(Exception):
    """The authorization server's answer is not usable."""


# -- the policy ----------------------------------------------------------------------------------


@implementer(IPolicy)
class ExtAuthzPolicy(UsesRuntime):
    """One binding: the settings and (from first use) the client for the server."""

    def __init__(
        self, settings: Settings, reactor: Any = None, clock: Any = None,
        shared: dict[Any, Any] | None = None, agent: Any = None, tls_settings: Any = None,
    ) -> None:
        self.settings = settings
        self._reactor = reactor
        self._clock = clock
        self._shared = shared if shared is not None else {}
        self._agent = agent
        self._tls = tls_settings
        self._client: Any = None
        self.calls = 0

    # -- clients ---------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The HTTP/2 pool (gRPC) or treq pool (HTTP), shared by bindings with the same server."""
        if self._client is None:
            s = self.settings
            key = (NAME, s.scheme, s.host, s.port, s.timeout, self._tls, id(self._agent))
            client = self._shared.get(key)
            if client is None:
                client = self._shared[key] = (
                    _GrpcClient(self) if s.grpc else _HttpClient(self)
                )
            self._client = client
        return self._client

    # -- the request -----------------------------------------------------------------------------

    def on_request(self, ctx: PolicyContext) -> Any:
        """Ask the server; apply its answer."""
        self.calls += 1
        client, settings = self.client, self.settings
        d = side_call(ctx.trace, "ext_authz", lambda traceparent: client.check(ctx, settings, traceparent),
                      "ext_authz_failed", (("url.full", settings.uri),))
        return d.addErrback(self._error)

    def _error(self, failure: Failure) -> LocalResponse:
        cause = _cause(failure)
        _log.warn("External authorization at {uri} failed ({cause}): {error}",
                  uri=self.settings.uri, cause=cause, error=failure.getErrorMessage())
        return _failed(cause)

    def on_response(self, ctx: PolicyContext) -> None:
        """Nothing here: client headers from the server are added in on_request."""

    response_phase = False


def _header_pairs(ctx: PolicyContext) -> list[tuple[bytes, bytes]]:
    return ctx.request_headers if ctx.request_headers_changed else list(ctx.head.headers)


class _GrpcClient(GrpcChannel):
    """Check over gRPC on flexgw's HTTP/2 pool (a GrpcChannel)."""

    def __init__(self, policy: ExtAuthzPolicy) -> None:
        s = policy.settings
        super().__init__(policy._runtime_reactor(), policy.clock, s.scheme, s.host, s.port,
                         s.timeout, policy._tls, key=f"ext-authz {s.uri}")
        self.clock = policy.clock

    def check(self, ctx: PolicyContext, settings: Settings,
              traceparent: bytes | None = None) -> Deferred[Any]:
        """One Check for `ctx`, with the binding's `settings` (bindings share this client), and
        the request's `traceparent` as gRPC metadata when it is traced."""
        from flexgw.upstream.grpccall import unary

        message = self.request(ctx, settings).SerializeToString()
        metadata = ((b"traceparent", traceparent),) if traceparent is not None else ()
        return unary(self.pool, CHECK_PATH, message, settings.timeout, self.clock,
                     metadata, limit=MAX_ANSWER).addCallback(self.answered, ctx)

    def request(self, ctx: PolicyContext, s: Settings) -> Any:
        """Envoy's CheckRequest for this request."""
        from envoy.service.auth.v3 import external_auth_pb2

        head = ctx.head
        req = external_auth_pb2.CheckRequest()
        attributes = req.attributes
        source = attributes.source.address.socket_address
        source.address = ctx.client_ip
        if s.include_peer_certificate and ctx.peer_certificate is not None:
            from flexgw.tls.contexts import url_encoded_pem

            attributes.source.certificate = url_encoded_pem(ctx.peer_certificate)
        attributes.request.time.FromNanoseconds(int(self.clock.seconds() * 1e9))
        http = attributes.request.http
        method = head.method.decode("latin-1")
        target = head.target.decode("latin-1")
        host = ctx.request_header(b"host") or b""
        http.method = method
        http.path = target
        http.host = host.decode("latin-1")
        http.scheme = ctx.scheme
        version = head.version
        http.protocol = "HTTP/" + (version.decode() if isinstance(version, bytes) else version)
        length = ctx.request_header(b"content-length")
        http.size = int(length) if length is not None and length.isdigit() else -1
        pseudo = ((b":authority", host), (b":method", head.method), (b":path", head.target),
                  (b":scheme", ctx.scheme.encode("ascii")))
        allowed = s.allowed
        headers = [(n.lower(), v) for n, v in _header_pairs(ctx)]
        if allowed is not None:
            headers = [(n, v) for n, v in headers if n in allowed]
        if s.raw_values:
            entries = http.header_map.headers
            for name, value in (*pseudo, *headers):
                entry = entries.add()
                entry.key = name.decode("latin-1")
                entry.raw_value = value
        else:
            joined: dict[str, str] = {}
            for name, value in (*pseudo, *headers):
                key, text = name.decode("latin-1"), value.decode("utf-8", "replace")
                joined[key] = f"{joined[key]},{text}" if key in joined else text
            http.headers.update(joined)
        return req

    def answered(self, message: bytes, ctx: PolicyContext) -> LocalResponse | None:
        """Apply a CheckResponse."""
        from envoy.service.auth.v3 import external_auth_pb2
        from google.protobuf.message import DecodeError

        reply = external_auth_pb2.CheckResponse()
        try:
            reply.ParseFromString(message)
        except DecodeError as e:
            raise _BadAnswer(f"not a CheckResponse: {e}") from None
        if reply.status.code != 0:
            denied = reply.denied_response
            status = int(denied.status.code) or 403
            headers = [(option_name(o), option_value(o)) for o in denied.headers]
            return _denied(status, headers, denied.body.encode("utf-8"))
        ok = reply.ok_response
        for option in ok.headers:
            name, value = option_name(option), option_value(option)
            if option_appends(option, ctx.request_header(name) is not None):
                ctx.add_request_header(name, value)
            elif option_overwrites(option, ctx.request_header(name) is not None):
                ctx.set_request_header(name, value)
        for name in ok.headers_to_remove:
            ctx.remove_request_header(name.encode("latin-1"))
        for option in ok.response_headers_to_add:
            ctx.add_response_header(option_name(option), option_value(option))
        return None


def option_name(option: Any) -> bytes:
    """An Envoy HeaderValueOption's header name."""
    return option.header.key.encode("latin-1")


def option_value(option: Any) -> bytes:
    """Its value: `raw_value` bytes, else `value` as UTF-8."""
    header = option.header
    return header.raw_value or header.value.encode("utf-8")


def option_appends(option: Any, exists: bool) -> bool:
    """Envoy's rule: a set `append` decides (true adds); else `append_action`."""
    if option.HasField("append"):
        return option.append.value
    return option.append_action == 0  # APPEND_IF_EXISTS_OR_ADD


def option_overwrites(option: Any, exists: bool) -> bool:
    """Whether it replaces the header's values (Envoy's `append`, else `append_action`)."""
    if option.HasField("append"):
        return not option.append.value
    action = option.append_action
    return action == 2 or (action == 1 and not exists) or (action == 3 and exists)


class _HttpClient:
    """Check against an HTTP authorization server, with treq."""

    def __init__(self, policy: ExtAuthzPolicy) -> None:
        self.settings = policy.settings
        self.reactor = policy._runtime_reactor()
        self.agent = policy._agent
        self.pool: Any = None
        if self.agent is None:
            from twisted.web.client import HTTPConnectionPool

            self.pool = HTTPConnectionPool(self.reactor, persistent=True)
            self.pool.maxPersistentPerHost = 16
            self.pool.retryAutomatically = False

    def close_with_gateway(self) -> Any:
        """The gateway stops: close the pooled connections."""
        if self.pool is not None:
            return self.pool.closeCachedConnections()
        return None

    def check(self, ctx: PolicyContext, s: Settings, traceparent: bytes | None = None) -> Deferred[Any]:
        """One check for `ctx`, with the binding's settings `s` (bindings share this client),
        and the request's `traceparent` when it is traced."""
        import treq

        from flexgw.sidecalls.bounded import read_bounded

        head = ctx.head
        keep = {b"host", b"authorization", *(s.allowed or ())}
        headers: dict[bytes, list[bytes]] = {}
        for name, value in _header_pairs(ctx):
            lname = name.lower()
            if lname in keep:
                headers.setdefault(lname, []).append(value)
        headers[b"content-length"] = [b"0"]
        for name, value in s.request_headers_to_add:
            headers[name.lower()] = [value]
        if traceparent is not None:
            headers[b"traceparent"] = [traceparent]
        url = f"{s.scheme}://{_authority(s)}{s.path_prefix}{head.target.decode('latin-1')}"
        kwargs: dict[str, Any] = {"reactor": self.reactor}
        if self.agent is not None:
            kwargs["agent"] = self.agent
        else:
            kwargs["pool"] = self.pool
        d: Deferred[Any] = treq.request(
            head.method.decode("latin-1"), url.encode("latin-1"), headers=headers, **kwargs
        )

        def got(response: Any) -> Deferred[Any]:
            return read_bounded(
                response, MAX_ANSWER, lambda: _BadAnswer("authorization answer too large")
            ).addCallback(lambda body: self.answered(response, body, ctx, s))

        d.addCallback(got)
        d.addTimeout(s.timeout, self.reactor, onTimeoutCancel=_timed_out)
        return d

    def answered(
        self, response: Any, body: bytes, ctx: PolicyContext, s: Settings
    ) -> LocalResponse | None:
        """200: allow with the configured header copies; else deny as the server said."""
        pairs = [
            (name.lower(), value)
            for name, values in response.headers.getAllRawHeaders()
            for value in values
        ]
        if response.code == 200:
            for name, value in pairs:
                if name in s.upstream_headers:
                    ctx.set_request_header(name, value)
            for name, value in pairs:
                if name in s.upstream_headers_append:
                    ctx.add_request_header(name, value)
            for name, value in pairs:
                if name in s.client_headers_on_success:
                    ctx.add_response_header(name, value)
            return None
        if s.client_headers is None:
            chosen = [(n, v) for n, v in pairs if n not in _NOT_COPIED]
        else:
            wanted = (*s.client_headers, *_ALWAYS_TO_CLIENT)
            chosen = [(n, v) for n, v in pairs if n in wanted and n not in _NOT_COPIED]
        return _denied(response.code, chosen, body)


def _authority(s: Settings) -> str:
    host = f"[{s.host}]" if ":" in s.host else s.host
    return f"{host}:{s.port}"


@implementer(IPolicyKind)
class ExtAuthzKind:
    """The `native-ext-authz-flex` policy kind."""

    name = NAME
    schema = SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> ExtAuthzPolicy:
        """Check the config; connections are made at the first request."""
        services = context.services
        return ExtAuthzPolicy(
            settings_from(config),
            context.reactor or services.reactor,
            context.clock or services.clock,
            services.shared,
            services.side_agent,
            getattr(services, "side_tls", None),
        )


KIND = register(ExtAuthzKind())
