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
    phase = Attribute("'inbound' (API-level) or 'outbound' (bound to a Service).")

    def build(config: dict[str, Any], context: BuildContext) -> IPolicy:  # type: ignore[misc]
        """Build the policy object for one binding (raise PolicyConfigError for bad config)."""


class IPolicy(Interface):
    """One bound policy: immutable config plus shared state, used by every request."""

    def on_request(ctx: PolicyContext) -> Any:  # type: ignore[misc]
        """None to go on, a LocalResponse to answer, or a Deferred firing with either."""

    def on_response(ctx: PolicyContext) -> None:  # type: ignore[misc]
        """Adjust the response head (status, headers) before it is sent downstream.

        A policy whose `on_response` does nothing may say so with an attribute
        `response_phase = False`: the chain then does not call it (one call less per request).
        """

    # Optional: `on_done(ctx, status, cause)` is called once when a request this policy let
    # through (its on_request returned None) has ended, whichever way it ended: `status` is
    # what the client got (0 when nothing was sent), `cause` the `x-flexgw-error` cause of a
    # gateway-made answer (None for the upstream's own response). The circuit breaker uses it.
    # Optional: `chain_member = False` keeps a policy that only configures something at
    # compile time (e.g. `idle-timeout-flex`) out of the per-request chain.


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
class PolicyRuntime:
    """What the running gateway lends policies: its reactor and clock, and state kept across
    reloads (e.g. rate-limit counters), keyed by whatever the policy kind chooses."""

    reactor: Any
    clock: Any
    shared: dict[str, Any] = attrs.Factory(dict)
    message_log: Any = None  # a flexgw.service.accesslog.MessageLog, or None: the Twisted log
    redis: Any = None  # a flexgw.storage.redis.RedisClient while the plan has shared storage
    shared_storage: Any = None  # the flexgw.plan.SharedStorage `redis` was made for
    side_tls: Any = None  # TLSSettings of Configuration.defaultTLS.outboundPolicyCalls, or None
    forward_proxy: Any = None  # Configuration.spec.forwardProxy, or None
    side_agent: Any = None  # the treq Agent policies' side calls use (None: treq's default)
    # --workers: an AMP protocol to the supervisor, which holds the rate-limit and spike-control
    # counters of every worker (flexgw.storage.supervised); None in a single process
    supervisor: Any = None
    # rate-limit checks the store could not answer, (api, "refused" | "allowed") -> count
    # (flexgw.policies.rate_limiting; the `flexgw_rate_limit_unknown_quota` metric)
    unknown_quota: dict[tuple[str | None, str], int] = attrs.Factory(dict)

    def use_side_tls(self, settings: Any) -> None:
        """Called with each new plan's `defaultTLS.outboundPolicyCalls` settings (before its
        policies are built): a new Agent for side calls when they changed."""
        if settings == self.side_tls:
            return
        self.side_tls = settings
        self._make_side_agent()

    def use_forward_proxy(self, proxy: Any) -> None:
        """Called with each new plan's forward proxy (before its policies are built): side
        calls go through it (flexgw.upstream.sidecalls) while one is configured."""
        if proxy == self.forward_proxy:
            return
        self.forward_proxy = proxy
        self._make_side_agent()

    def _make_side_agent(self) -> None:
        """The side-call Agent for the current TLS settings and forward proxy."""
        tls_policy = direct = None
        if self.side_tls is not None:
            from twisted.web.client import Agent

            from flexgw.tls.contexts import SideCallTLSPolicy

            tls_policy = SideCallTLSPolicy(self.side_tls)
            direct = Agent(self.reactor, contextFactory=tls_policy)
        if self.forward_proxy is not None:
            from flexgw.upstream.sidecalls import ForwardProxyAgent

            self.side_agent = ForwardProxyAgent(self.reactor, self.forward_proxy, direct, tls_policy)
        else:
            self.side_agent = direct

    def use_shared_storage(self, settings: Any) -> None:
        """Called with each new plan's shared storage (before its policies are built): a new
        client when the settings changed (the old one is closed), none without settings."""
        if settings == self.shared_storage:
            return
        old, self.redis, self.shared_storage = self.redis, None, settings
        if old is not None:
            old.close()
        if settings is not None:
            from flexgw.storage.redis import RedisClient

            tls = None
            if settings.tls is not None:
                from flexgw.tls.contexts import client_creator

                no_alpn = attrs.evolve(settings.tls, alpn=())  # Redis speaks no ALPN

                def tls(host: str) -> Any:
                    """TLS for one host (a sentinel or the master), SNI and check for it."""
                    return client_creator(no_alpn, host)

            self.redis = RedisClient(
                self.reactor,
                settings.host,
                settings.port,
                username=settings.username,
                password=settings.password,
                db=settings.db,
                sentinel=settings.sentinel,
                tls=tls,
                connect_timeout=settings.command_timeout,
                command_timeout=settings.command_timeout,
                max_backoff=settings.probe_interval,
                summary_interval=settings.summary_interval,
            )


@attrs.frozen
class BuildContext:
    """What a policy kind may use when building: names for logs, the clock, shared services."""

    binding: str  # "namespace/name" of the binding (or the inline policy's generated name)
    api: str | None  # "namespace/name" of the ApiInstance, None for Service-bound policies
    clock: Any = None  # IReactorTime, for windows and delays
    reactor: Any = None  # for side calls (JWKS, introspection)
    services: Any = None  # gateway-wide shared services (storage, ...)


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
        "_request_headers",
        "api",
        "body",
        "client_ip",
        "head",
        "response_extra",
        "response_headers",
        "response_status",
        "response_timeout",
        "scheme",
        "scratch",
        "stream_idle_timeout",
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
        self._request_headers: HeaderList | None = None
        self.response_status = 0
        self.response_headers: HeaderList | None = None
        self.response_extra: HeaderList | None = None  # headers to add to any response
        self._expression_context: Any = None
        # The whole request body, when a selected policy has `needs_body` (buffered, bounded).
        self.body: bytes | None = None
        # Per-request timeout overrides in seconds (response-timeout / stream-idle-timeout).
        self.response_timeout: float | None = None
        self.stream_idle_timeout: float | None = None
        # `Configuration.spec.http.trustedProxies` when the socket peer is one of them, else ():
        # only then may X-Forwarded-For hops be believed (walked from the right, not the left).
        self.trusted_proxies: tuple[Any, ...] = ()
        # Per-request notes a policy keeps for its own later phases, keyed by the policy
        # object (not visible to expressions, unlike `vars`); None until first used.
        self.scratch: dict[Any, Any] | None = None

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
        if self._request_headers is None:
            self._request_headers = list(self.head.headers)
        return self._request_headers

    @property
    def request_headers_changed(self) -> bool:
        """True when a policy asked for the mutable header list."""
        return self._request_headers is not None

    def request_header(self, name: bytes) -> bytes | None:
        """The first value of a request header (case-insensitive), as the upstream would get it."""
        lname = name.lower()
        headers = self._request_headers if self._request_headers is not None else self.head.headers
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

    # -- response --------------------------------------------------------------------------------

    def add_response_header(self, name: bytes, value: bytes) -> None:
        """Add a header to whatever response goes downstream (upstream or local)."""
        if self.response_extra is None:
            self.response_extra = []
        self.response_extra.append((name, value))

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
