"""The compiled, immutable gateway plan: everything the request path reads, nothing it must parse.

The bottom layer: the only contract between the compiler (`flexgw.config`) and the data path
(`ingress`, `egress`, `upstream`, `policies`, `service`). It imports nothing from flexgw, and
holds the value types both sides share: the plan itself, the log settings it carries,
`Problem` (one located configuration problem) and `PolicyConfigError`."""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

import attrs

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.frozen
class Endpoint:
    """One address of a Service's set (an IP literal; `Service.spec.addresses`, Kubernetes
    Endpoints), with its balancing weight."""

    host: str  # IP literal, IPv6 without brackets
    port: int
    weight: int = 1


@attrs.frozen
class Balancing:
    """How a Service's requests spread over its addresses (`Service.spec.loadBalancer` and
    `Service.spec.addresses`, flexgw extensions; flexgw.upstream.cluster applies it)."""

    algorithm: str = "roundRobin"  # roundRobin, leastRequest, ringHash, maglev
    endpoints: tuple[Endpoint, ...] = ()  # explicit addresses; empty: resolve the host
    # ringHash/maglev: what to hash (a flexgw.policies.expressions.Expression, or the string
    # "clientAddress"); None hashes nothing (a random address per request)
    hash_on: Any = attrs.field(default=None, eq=False)
    hash_source: str = ""  # hash_on as written (the identity: Expressions compare by source)
    # Seconds between two resolutions of the host when the answer has no TTL (/etc/hosts, a
    # resolver without TTLs); an answer with a TTL is asked again after it, bounded by these:
    dns_refresh: float = 5.0
    dns_min_refresh: float = 5.0
    dns_max_refresh: float = 300.0
    dns_failure_refresh: float = 30.0  # the longest back-off while the host resolves to nothing
    # With every address unhealthy or ejected: use all of them (True, Envoy's panic mode) or
    # answer 503 no_healthy_upstream (False); `panic_threshold` percent of available addresses
    # under which panic mode starts (0: never).
    fail_open: bool = True
    panic_threshold: float = 50.0


@attrs.frozen(cache_hash=True)
class Upstream:
    """One upstream cluster: a `Service` resource, or an inline service of an ApiInstance."""

    key: str  # "namespace/name"; inline services are named "<api>-<serviceKey>"
    scheme: str  # "http", "https", "h2c" (HTTP/2 with prior knowledge) or "h2" (over TLS)
    host: str  # hostname or IP literal, IPv6 without brackets
    port: int
    path_prefix: str = ""  # path of the Service address, no trailing slash ("" for none or "/")
    # `idle-timeout-flex` bound to the Service: its pool's idle timeout (None: the gateway's).
    # Not part of the identity: a changed value is applied to the existing pool.
    idle_timeout: float | None = attrs.field(default=None, eq=False)
    # Configuration.spec.forwardProxy (a flexgw.config.forwardproxy.ForwardProxy) unless its
    # noProxy matches the host: connections go to the proxy, CONNECT for https.
    proxy: Any = None
    # The request target prefix and the end of the request line, precomputed: for a plain-HTTP
    # upstream behind the proxy, absolute-form (`http://authority`) and the Proxy-Authorization
    # header line; otherwise empty and the plain line end (no per-request check).
    request_prefix: bytes = attrs.field(default=b"", eq=False)
    request_line_end: bytes = attrs.field(default=b" HTTP/1.1\r\n", eq=False, repr=False)
    # flexgw.tls.contexts.ClientTLS for TLS upstreams (https://, or a tls-outbound binding);
    # compares by settings, so an unchanged Service keeps its pool across reloads.
    tls: Any = None
    # The checked address to connect to instead of resolving `host` (forward-proxy destinations:
    # the SSRF guard checked this address; connecting by name would look it up again).
    connect_host: str | None = None
    # flexgw extensions (flexgw.upstream.cluster): the address set and balancer; the retry
    # policy (`upstream-retry`, a flexgw.upstream.retry.RetryPolicy), passive outlier detection
    # (`upstream-outlier-detection`) and active health checks (`upstream-health-check`).
    balancing: Balancing | None = None
    retry: Any = None
    outlier: Any = None
    health: Any = None

    # `authority` encoded, as the Host line carries it (computed once, not per request).
    host_value: bytes = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "host_value", self.authority.encode("latin-1"))

    @property
    def authority(self) -> str:
        """The Host header value the upstream expects (port omitted when it is the scheme default)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme in ("https", "h2") else 80
        return host if self.port == default else f"{host}:{self.port}"


@attrs.frozen
class Destination:
    """Where a route sends a request: an upstream, a path prefix and a weight."""

    upstream: Upstream
    destination_path: str = ""  # normalised: "" or "/v1" (no trailing slash)
    weight: int = 100
    policies: tuple[BoundPolicy, ...] = ()  # outbound policies bound to the upstream's Service
    # The whole chain for requests sent here: the API's policies, then these outbound ones
    # (computed at compile time), and whether any of them has rules to check per request.
    chain: tuple[BoundPolicy, ...] = ()
    chain_has_rules: bool = False


@attrs.frozen
class Rule:
    """One routing/policy rule: every present field must match (AND); None means "any"."""

    path: re.Pattern[str] | None = None  # full match against the path after the base path
    methods: re.Pattern[str] | None = None  # full match against the method
    host: re.Pattern[str] | None = None  # full match against the Host (port stripped)
    headers: tuple[tuple[str, re.Pattern[str]], ...] = ()  # (lower-case name, full-match regex)


@attrs.frozen(eq=False)
class BoundPolicy:
    """One policy binding compiled: its rules and the policy object built for it."""

    name: str  # "namespace/binding", or "<api>-<policy>-<n>" for inline policies
    kind: str  # policyRef name, e.g. "http-basic-authentication-flex"
    order: int
    rules: tuple[Rule, ...]  # empty: applies to every request
    policy: Any  # provides flexgw.policies.base.IPolicy
    needs_body: bool = False  # the policy reads the request body (buffered, bounded)
    responds: bool = True  # the policy has a response phase (`response_phase`, default True)
    finishes: bool = False  # the policy wants `on_done` when the request ends
    # its response phase may wait for I/O (`response_async`): it sees upstream responses only
    responds_async: bool = False


@attrs.frozen
class Route:
    """One route: rules (OR across items; no rules matches everything) and weighted destinations."""

    name: str  # "namespace/binding" or "<api>-<serviceKey>-route-<n>" for inline routes
    order: int
    rules: tuple[Rule, ...]
    destinations: tuple[Destination, ...]


@attrs.frozen
class Api:
    """One ApiInstance as served on a listener."""

    key: str  # "namespace/name"
    base_path: str  # "" or "/orders" (no trailing slash)
    routes: tuple[Route, ...]  # in evaluation order: by `order`, then name
    policies: tuple[BoundPolicy, ...] = ()  # inbound chain: CORS, Selector-bound, then by order
    # A forward-proxy ApiInstance (`forward-proxy` binding): its ForwardProxyConfig, and the
    # Services whose address a proxied request may match (their outbound chain and settings).
    forward_proxy: Any = None
    proxy_services: tuple[Destination, ...] = ()
    # The API's tracing decision (flexgw.http.tracecontext.Sampler): Configuration spec.tracing,
    # overridden by a `tracing-flex` binding; None when tracing is not configured.
    tracing: Any = attrs.field(default=None, eq=False)


@attrs.frozen
class Listener:
    """One bound address and the APIs it serves, longest base path first."""

    scheme: str  # "http", or "https" when the port has a `tls` binding
    host: str  # "0.0.0.0", "127.0.0.1", "::" ...
    port: int
    apis: tuple[Api, ...]
    tls: Any = None  # flexgw.tls.contexts.ServerTLS of an https listener

    @property
    def forward_proxy(self) -> Api | None:
        """The forward-proxy API this listener serves (alone on its port), if it is one."""
        apis = self.apis
        return apis[0] if len(apis) == 1 and apis[0].forward_proxy is not None else None

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) pair that identifies this listener across reloads."""
        return (self.host, self.port)


@attrs.frozen
class Timeouts:
    """`Configuration.spec.timeouts`, in seconds, with Flex's defaults."""

    upstream_response: float = 15.0
    stream_idle: float = 300.0
    upstream_idle: float = 60.0


@attrs.frozen
class HttpSettings:
    """flexgw's own HTTP front settings (`Configuration.spec.http`), with safe defaults."""

    max_header_bytes: int = 60 * 1024  # request line + headers; over it: 431
    header_timeout: float = 10.0  # a started request head must complete within this; else 408
    keepalive_timeout: float = 60.0  # idle downstream connection between requests is closed after
    connect_timeout: float = 10.0  # upstream TCP connect; over it: 503
    rewrite_host: bool = True  # Flex's FLEX_REWRITE_HOST_HEADER default
    trusted_proxies: tuple[IPNetwork, ...] = ()  # peers whose X-Forwarded-* headers are kept
    # Idle pooled connections kept per upstream: as many as a Service may have in use by default
    # (Envoy's maxConnections, 1024), so that the end of a burst of concurrent requests (ten
    # HTTP/2 streams on each of 50 connections are 500 upstream requests at once) does not close
    # connections the next burst opens again. Idle ones still close after the idle timeout.
    max_idle_per_upstream: int = 1024
    body_buffer_limit: int = 1024 * 1024  # bodies policies buffer; over it: 413
    # x-forwarded-client-cert for verified client certificates (FLEX_FORWARD_CLIENT_CERT_DETAILS:
    # SANITIZE_SET, the default here, sets it; SANITIZE only strips). A client's is always removed.
    forward_client_cert: bool = True
    # HTTP/2 (`http.http2`): SETTINGS_MAX_CONCURRENT_STREAMS, and the flood guards' limits per
    # connection over 10 seconds (over either: GOAWAY ENHANCE_YOUR_CALM)
    h2_max_concurrent_streams: int = 100
    h2_max_resets: int = 200
    h2_max_control_frames: int = 1000
    # `headersWithUnderscoresAction` (Envoy's): allow, dropHeader or rejectRequest (400). The
    # underscore forms of framing, hop-by-hop, Host and X-Forwarded-* headers are dropped always.
    headers_with_underscores: str = "allow"
    # Request path normalisation (flexgw.http.path, Envoy's names): `normalizePath` (decode
    # unreserved escapes, remove dot segments), `mergeSlashes`, `pathWithEscapedSlashesAction`
    # (keepUnchanged, rejectRequest, unescapeAndRedirect, unescapeAndForward).
    normalize_path: bool = True
    merge_slashes: bool = True
    escaped_slashes: str = "rejectRequest"


@attrs.frozen
class RedisSentinel:
    """`sharedStorage.redis.sentinel`: the sentinels asked, in order, for the master's address."""

    master_name: str
    addresses: tuple[tuple[str, int], ...]  # (host, port), port 26379 when not written
    password: str | None = attrs.field(default=None, repr=False)


@attrs.frozen
class SharedStorage:
    """`Configuration.spec.sharedStorage.redis`: the Redis that rate-limit counters are shared in.

    With `sentinel`, `host`/`port` are unused ("" / 0): the master is asked of the sentinels.
    `tls` (a flexgw.tls.settings.TLSSettings, or None for plaintext) applies to the master and to
    the sentinels alike. The last three are flexgw extensions (flexgw.config.storage)."""

    host: str
    port: int = 6379
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    db: int = 0
    sentinel: RedisSentinel | None = None
    tls: Any = None
    command_timeout: float = 2.0  # seconds for a connection or a reply (then Redis is down)
    probe_interval: float = 0.5  # longest delay between two probes while Redis is down
    summary_interval: float = 60.0  # seconds between two "still down" log records


@attrs.frozen
class TracingSettings:
    """`Configuration.spec.tracing.provider` (OpenTelemetry): where and how spans are exported."""

    # h2c://host:4317 or h2s://host:4317 (OTLP/gRPC, plain or TLS; Flex writes h2://) or
    # http(s)://host:4318[/v1/traces] (OTLP/HTTP)
    address: str
    protocol: str  # "grpc" or "http"
    service_name: str = "flexgw"
    service_type: str = "grpc"
    timeout: float = 10.0  # seconds for one export
    resource_attributes: tuple[tuple[str, str], ...] = ()
    max_queue: int = 2048  # spans waiting for export; more are dropped (counted)
    max_batch: int = 512  # spans per export request
    delay: float = 0.5  # seconds a span may wait for its batch
    # TLS to the collector (h2s://, https://): Configuration.defaultTLS.outboundPolicyCalls (a
    # flexgw.tls.settings.TLSSettings; None: the system trust store)
    tls: Any = None


@attrs.frozen
class ProbeSettings:
    """`Configuration.spec.probe`: the readiness/liveness HTTP listener (off unless enabled, as Flex)."""

    enabled: bool = False
    port: int = 3000  # Flex's default probe port
    host: str = "0.0.0.0"  # flexgw extension; Flex listens on every interface (the kubelet probes it)


@attrs.frozen
class Template:
    """A compiled `template`: literal text and variable names, alternating (literal first)."""

    source: str
    literals: tuple[str, ...]
    names: tuple[str, ...]  # canonical names (aliases resolved)


@attrs.frozen
class LogOutput:
    """One served output: stdout or a file, JSON lines or a template."""

    name: str
    type: str  # "file" or "stdout"
    path: str | None = None  # the file (None for stdout)
    template: Template | None = None  # None: JSON lines


@attrs.frozen
class LoggingSettings:
    """`Configuration.spec.logging` (plus FLEX_LOG_LEVEL) as the gateway applies it."""

    runtime_level: str | None = None  # a Twisted level name; None: not configured (info)
    runtime_outputs: tuple[LogOutput, ...] = ()  # empty: the default (twistd's log, stdout)
    access_outputs: tuple[LogOutput, ...] = ()  # empty: the default (--access-log)


class PolicyConfigError(Exception):
    """A config value a schema cannot catch is wrong; `field` is its dotted path in `config`."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field


@attrs.frozen
class Problem:
    """One configuration problem, located in its file."""

    severity: Literal["error", "warning", "info"]  # info: a note (e.g. an Ingress of another class)
    message: str
    file: str | None = None
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based
    resource: str | None = None  # "Kind namespace/name"
    field: str | None = None  # dotted path, e.g. "spec.services.json.address"

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        parts = [f"{where}: {self.severity}:"]
        if self.resource and self.resource != self.file:  # an API object's origin is its name
            parts.append(f"{self.resource}:")
        if self.field:
            parts.append(f"{self.field}:")
        parts.append(self.message)
        return " ".join(parts)


@attrs.frozen
class GatewayPlan:
    """Everything compiled from one configuration generation; swapped whole on reload."""

    listeners: tuple[Listener, ...] = ()
    timeouts: Timeouts = Timeouts()
    http: HttpSettings = HttpSettings()
    problems: tuple[Problem, ...] = ()
    generation: int = 0
    shared_storage: SharedStorage | None = None  # Redis for rate-limit counters; None: memory
    probe: ProbeSettings = ProbeSettings()
    logging: LoggingSettings = attrs.field(factory=LoggingSettings)  # spec.logging, FLEX_LOG_LEVEL
    proxy_protocol: bool = False  # spec.proxyProtocol.enabled: every listener expects PROXY v1/v2
    tracing: TracingSettings | None = None  # spec.tracing (OpenTelemetry export); None: off
    tls_files: tuple[str, ...] = ()  # certificate/key/CA files the plan read (watched for changes)

    def listener_at(self, host: str, port: int) -> Listener | None:
        """The listener bound to (host, port), if this plan has one."""
        for listener in self.listeners:
            if listener.host == host and listener.port == port:
                return listener
        return None
