"""The policy plug-in point: policy kinds, per-binding policy objects, and the per-request context.

A policy *kind* (e.g. `http-basic-authentication-flex`) is registered once. At compile time it
validates nothing itself (its JSON Schema does that) and `build`s one policy object per binding,
holding the binding's immutable config and shared state. Per request, the chain calls
`on_request(ctx)` in order; a policy returns None to continue, a `LocalResponse` to answer
without the upstream, or a Deferred firing with either (only policies that do I/O need one).
In the response phase `on_response(ctx)` runs in reverse order and may change the response head.

`PolicyConfigError` lives in `flexgw.plan` (the bottom layer, so TLS settings and the compiler
raise it without importing the plug-in interface); its import path here is the documented
plug-in API and stays, without a deprecation warning.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs
from zope.interface import Attribute, Interface

from flexgw.http.errors import REASONS
from flexgw.plan import PolicyConfigError  # noqa: F401  (plug-in API: re-exported here)
from flexgw.policies.expressions import ExpressionContext

if TYPE_CHECKING:
    from flexgw.http.request import RequestHead

HeaderList = list[tuple[bytes, bytes]]


class IPolicyKind(Interface):
    """A kind of policy, named as in `policyRef.name`."""

    name = Attribute("The policyRef name, e.g. 'http-basic-authentication-flex'.")
    schema = Attribute("JSON Schema (a dict) for the binding's `config`.")
    phase = Attribute("'inbound' (API-level), 'outbound' (bound to a Service) or 'both'.")

    def build(config: dict[str, Any], context: BuildContext) -> IPolicy:  # type: ignore[misc]
        """Build the policy object for one binding (raise PolicyConfigError for bad config)."""


class IPolicy(Interface):
    """One bound policy: immutable config plus shared state, used by every request.

    Besides the two methods, a policy may have these optional members (the compiler reads them
    once, through `PolicyCapabilities.of`; a policy without them gets the defaults):

    - `needs_body` (default False): the exchange buffers the whole request body (bounded,
      413 over the bound) into `ctx.body` before `on_request` runs.
    - `response_phase` (default True): False says `on_response` does nothing, so the chain
      does not call it (one call less per request).
    - `on_done(ctx, status, cause)` (default: none): called once when a request this policy
      let through (its on_request returned None) has ended, whichever way it ended: `status`
      is what the client got (0 when nothing was sent), `cause` the `x-flexgw-error` cause
      of a gateway-made answer (None for the upstream's own response). The circuit breaker
      uses it.
    - `chain_member` (default True): False keeps a policy that only configures something at
      compile time (e.g. `idle-timeout-flex`) out of the per-request chain.
    - `response_async` (default False): `on_response` may return a Deferred (firing with None,
      or a LocalResponse to answer instead of the upstream's response): the exchange holds the
      upstream's response head meanwhile, and may be asked for the whole response body
      (`ctx.want_response_body`). Such a policy sees upstream responses only, not local answers.
      The flag is compiled into the plan (BoundPolicy.responds_async); chains without such a
      policy pay nothing for it.

    In its response phase a policy may set `ctx.response_tap` (see PolicyContext) to be fed the
    response body as it streams downstream; a policy with `needs_body` may `ctx.replace_body`.
    A kind may name `literal_fields`: config keys that `$ENV` expansion leaves as written.
    """

    def on_request(ctx: PolicyContext) -> Any:  # type: ignore[misc]
        """None to go on, a LocalResponse to answer, or a Deferred firing with either."""

    def on_response(ctx: PolicyContext) -> Any:  # type: ignore[misc]
        """Adjust the response head (status, headers) before it is sent downstream (None); a
        `response_async` policy may return a Deferred firing with None or a LocalResponse."""


@attrs.frozen
class PolicyCapabilities:
    """IPolicy's optional members a policy object has (see IPolicy), with their defaults."""

    needs_body: bool = False
    response_phase: bool = True
    on_done: bool = False  # the policy has an `on_done(ctx, status, cause)`
    chain_member: bool = True
    response_async: bool = False

    @classmethod
    def of(cls, policy: Any) -> PolicyCapabilities:
        """Read them from `policy` (the one place they are looked up; at compile time)."""
        return cls(
            needs_body=bool(getattr(policy, "needs_body", False)),
            response_phase=bool(getattr(policy, "response_phase", True)),
            on_done=callable(getattr(policy, "on_done", None)),
            chain_member=bool(getattr(policy, "chain_member", True)),
            response_async=bool(getattr(policy, "response_async", False)),
        )


class UsesRuntime:
    """For policies that do I/O or read time: the build context's reactor and clock, or the
    global reactor taken at first use (under `flexgw validate` there is none, and nothing runs).

    Subclasses set `self._reactor` and `self._clock` (either may be None) in `__init__`.
    """

    _reactor: Any
    _clock: Any

    def _runtime_reactor(self) -> Any:
        """The reactor for side calls."""
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    @property
    def clock(self) -> Any:
        """The clock (the build context's, else the reactor)."""
        if self._clock is None:
            self._clock = self._runtime_reactor()
        return self._clock


@attrs.define
class PolicyServices:
    """What the running gateway lends policy kinds at build time (`BuildContext.services`): its
    reactor and clock, state kept across reloads, and the clients it made for the current plan.
    Every field may be None (`flexgw validate`, tests): a kind then does without it. The gateway's
    own is flexgw.service.policyruntime.PolicyRuntime, which also (re)makes those clients."""

    reactor: Any = None
    clock: Any = None
    # State kept across reloads (e.g. rate-limit counters), keyed by whatever the kind chooses.
    shared: dict[str, Any] = attrs.Factory(dict)
    message_log: Any = None  # a MessageLog (flexgw.service.accesslog), or None: the Twisted log
    redis: Any = None  # a flexgw.storage.redis.RedisClient while the plan has shared storage
    side_agent: Any = None  # the treq Agent policies' side calls use (None: treq's default)
    # --workers: an AMP protocol to the supervisor, which holds the rate-limit and spike-control
    # counters of every worker (flexgw.storage.supervised); None in a single process
    supervisor: Any = None
    token_fetcher: Any = None  # credential-injection-oauth2-flex's fetch (None: treq)
    # rate-limit checks the store could not answer, (api, "refused" | "allowed") -> count
    # (flexgw.policies.rate_limiting; the `flexgw_rate_limit_unknown_quota` metric)
    unknown_quota: dict[tuple[str | None, str], int] = attrs.Factory(dict)


def _services(value: PolicyServices | None) -> PolicyServices:
    return PolicyServices() if value is None else value


@attrs.frozen
class BuildContext:
    """What a policy kind may use when building: names for logs, the clock, shared services."""

    binding: str  # "namespace/name" of the binding (or the inline policy's generated name)
    api: str | None  # "namespace/name" of the ApiInstance, None for Service-bound policies
    clock: Any = None  # IReactorTime, for windows and delays
    reactor: Any = None  # for side calls (JWKS, introspection)
    # gateway-wide shared services (storage, side-call agent, ...); None: PolicyServices()
    services: PolicyServices = attrs.field(default=None, converter=_services)


@attrs.frozen
class LocalResponse:
    """A response a policy gives instead of the upstream's."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    # The access log's and metrics' `error` cause for this answer (also sent as
    # `x-flexgw-error` by `gateway_error`); None: "policy_rejected" for a 4xx/5xx.
    cause: str | None = None

    @classmethod
    def json_error(
        cls, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()
    ) -> LocalResponse:
        """A Flex-style JSON error body: `{"error": message}`."""
        body = json.dumps({"error": message}, separators=(",", ":")).encode("utf-8")
        return cls(status, ((b"Content-Type", b"application/json"), *headers), body)

    @classmethod
    def gateway_error(cls, status: int, cause: str, message: str) -> LocalResponse:
        """A gateway-made error from a policy: JSON body and `x-flexgw-error: cause`, like the
        gateway's own errors (flexgw.http.errors), so a 503 from a breaker is not mistaken
        for the upstream's."""
        body = json.dumps({"error": message}, separators=(",", ":")).encode("utf-8")
        headers = ((b"Content-Type", b"application/json"), (b"x-flexgw-error", cause.encode()))
        return cls(status, headers, body, cause)

    def render(self, close: bool, extra: HeaderList | None = None) -> bytes:
        """The complete HTTP/1.1 response bytes."""
        lines = [b"HTTP/1.1 %d %s\r\n" % (self.status, REASONS.get(self.status, b"Status"))]
        for name, value in self.headers:
            lines.append(name + b": " + value + b"\r\n")
        if extra:
            for name, value in extra:
                lines.append(name + b": " + value + b"\r\n")
        lines.append(b"Content-Length: %d\r\n" % len(self.body))
        if close:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        lines.append(self.body)
        return b"".join(lines)


class PolicyContext:
    """One request as policies see it: the downstream request (read-only), the upstream request
    headers (mutable, copied on first change), variables, authentication and the response head."""

    __slots__ = (
        "_authentication",
        "_expression_context",
        "api",
        "body",
        "body_replaced",
        "changed_headers",
        "client_ip",
        "head",
        "peer_certificate",
        "response_body",
        "response_body_hooks",
        "response_body_replaced",
        "response_extra",
        "response_headers",
        "response_status",
        "response_tap",
        "response_timeout",
        "scheme",
        "scratch",
        "stream_idle_timeout",
        "trace",
        "trusted_proxies",
        "vars",
    )

    def __init__(self, head: RequestHead, client_ip: str, scheme: str, api: str | None) -> None:
        self.head = head
        self.client_ip = client_ip
        self.scheme = scheme
        self.api = api
        self.vars: dict[str, Any] = {}
        self._authentication: Mapping[str, Any] | None = None
        # The upstream request's headers once a policy asked for them (`request_headers`), else
        # None: the downstream's go upstream unchanged. Read it; change headers through the methods.
        self.changed_headers: HeaderList | None = None
        self.response_status = 0
        self.response_headers: HeaderList | None = None
        self.response_extra: HeaderList | None = None  # headers to add to any response
        # Set by a response-phase policy that wants the response body as it streams downstream:
        # an object with `feed(data)` and `abandon()` (flexgw.policies.http_caching's collector).
        # The exchange reads it once after the response phase; nothing is buffered otherwise.
        self.response_tap: Any = None
        self._expression_context: Any = None
        # The whole request body, when a selected policy has `needs_body` (buffered, bounded).
        self.body: bytes | None = None
        # A policy gave the upstream another body (`replace_body`): sent instead, re-framed.
        self.body_replaced = False
        # Per-request timeout overrides in seconds (response-timeout / stream-idle-timeout).
        self.response_timeout: float | None = None
        self.stream_idle_timeout: float | None = None
        # The request's flexgw.http.tracecontext.Trace when it is traced (side calls send a
        # `traceparent` from it), else None.
        self.trace: Any = None
        # `Configuration.spec.http.trustedProxies` when the socket peer is one of them, else ():
        # only then may X-Forwarded-For hops be believed (walked from the right, not the left).
        self.trusted_proxies: tuple[Any, ...] = ()
        # Per-request notes a policy keeps for its own later phases, keyed by the policy
        # object (not visible to expressions, unlike `vars`); None until first used.
        self.scratch: dict[Any, Any] | None = None
        # The client's verified certificate (a pyOpenSSL X509) on an mTLS connection, else None.
        self.peer_certificate: Any = None
        # Asynchronous response phase only (IPolicy `response_async`): callables that want the
        # whole response body (`want_response_body`), and a replacement body for the client.
        self.response_body_hooks: list[Any] | None = None
        self.response_body: bytes | None = None
        self.response_body_replaced = False

    @property
    def authentication(self) -> Mapping[str, Any] | None:
        """Who the request authenticated as (`principal`, `clientId`, `clientName`, `properties`)."""
        return self._authentication

    @authentication.setter
    def authentication(self, value: Mapping[str, Any] | None) -> None:
        """Set by an auth policy; later `#[authentication.*]` expressions see the new value."""
        self._authentication = value
        self._expression_context = None  # built with the old value: rebuild on next use

    def begin_response(self, status: int, headers: HeaderList) -> None:
        """The upstream's response head arrived: the response phase sees it (and
        `#[attributes.statusCode]` does too)."""
        self.response_status = status
        self.response_headers = headers
        self._expression_context = None

    # -- request headers -------------------------------------------------------------------------

    @property
    def request_headers(self) -> HeaderList:
        """The headers the upstream will get (a copy of the downstream's, made on first use)."""
        headers = self.changed_headers
        if headers is None:
            headers = self.changed_headers = list(self.head.headers)
        return headers

    @property
    def request_headers_changed(self) -> bool:
        """True when a policy asked for the mutable header list."""
        return self.changed_headers is not None

    def request_header(self, name: bytes) -> bytes | None:
        """The first value of a request header (case-insensitive), as the upstream would get it."""
        lname = name.lower()
        headers = self.changed_headers
        if headers is None:
            headers = self.head.headers
        for key, value in headers:
            if key.lower() == lname:
                return value
        return None

    def set_request_header(self, name: bytes, value: bytes) -> None:
        """Replace every value of a request header with one value (or add it)."""
        self.remove_request_header(name)
        self.request_headers.append((name, value))

    def add_request_header(self, name: bytes, value: bytes) -> None:
        """Add a value for a request header, keeping existing ones."""
        self.request_headers.append((name, value))

    def remove_request_header(self, name: bytes) -> None:
        """Remove every value of a request header."""
        lname = name.lower()
        headers = self.request_headers
        headers[:] = [(k, v) for k, v in headers if k.lower() != lname]

    def replace_body(self, body: bytes) -> None:
        """Send `body` upstream instead of the buffered one (only for policies with
        `needs_body`, whose request body the exchange holds whole; its length is re-framed)."""
        self.body = body
        self.body_replaced = True

    # -- response --------------------------------------------------------------------------------

    def add_response_header(self, name: bytes, value: bytes) -> None:
        """Add a header to whatever response goes downstream (upstream or local)."""
        if self.response_extra is None:
            self.response_extra = []
        self.response_extra.append((name, value))

    def want_response_body(self, hook: Any) -> None:
        """From a `response_async` policy's response phase: once the phase is done, the exchange
        receives the whole response body (bounded by the gateway's body buffer limit: a larger
        one is a 500, as Envoy's buffering) and calls `hook(pieces, trailers)`, with the pieces
        as they came and the response trailers (None if none). The hook returns None, a
        LocalResponse or a Deferred firing with either, and may `replace_response_body`."""
        if self.response_body_hooks is None:
            self.response_body_hooks = [hook]
        else:
            self.response_body_hooks.append(hook)

    def replace_response_body(self, body: bytes) -> None:
        """Send `body` to the client instead of the upstream's (from a `want_response_body`
        hook; its Content-Length is fixed up)."""
        self.response_body = body
        self.response_body_replaced = True

    # -- expressions -----------------------------------------------------------------------------

    def expression_context(self) -> Any:
        """The `#[...]` evaluation context for this request (built on first use)."""
        context = self._expression_context
        if context is None:
            head = self.head
            # Positional arguments: this runs once per request for every chain with an
            # expression, and keyword calls cost several times more.
            context = self._expression_context = ExpressionContext(
                head.method,
                head.target,
                head.version,
                # The response phase sees the response's headers (Flex: `attributes.headers`
                # is the response's there; expressions.ExpressionContext documents the same).
                head.headers if self.response_headers is None else self.response_headers,
                self.scheme,
                "",
                self.client_ip,
                self.response_status or None,
                self._authentication,
                self.vars,
            )
        return context


def __getattr__(name: str) -> Any:
    """`PolicyRuntime`, the old name of what policies get as `BuildContext.services`: now
    `PolicyServices` (the gateway's runtime moved to flexgw.service.policyruntime)."""
    if name == "PolicyRuntime":
        warnings.warn(
            "flexgw.policies.base.PolicyRuntime is deprecated: use PolicyServices (the services"
            " a policy kind gets); the gateway's runtime is flexgw.service.policyruntime",
            DeprecationWarning,
            stacklevel=2,
        )
        return PolicyServices
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
