"""Gateway metrics: plain counters on the request path, Prometheus families built at scrape time.

The request path pays for two dict updates and two bucket searches per finished exchange
(`GatewayMetrics.exchange`); labels, status classes, cumulative buckets and gauges (connections,
upstream pools) are worked out only when `/metrics` is scraped, by `GatewayCollector`.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from zope.interface import implementer

from flexgw.ingress.contract import IExchangeObserver

if TYPE_CHECKING:
    from flexgw.http.errors import GatewayError
    from flexgw.ingress.exchange import ProxyExchange
    from flexgw.service.gateway import GatewayService

# Seconds; the upper bounds of the latency buckets (+Inf is implicit).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
_NONE = "none"  # label value for "no API", "no route", "no error", "no response status"


#: Finished exchanges kept before they are counted (`GatewayMetrics._settle`): a bound on memory.
_BATCH = 1024


@implementer(IExchangeObserver)
class GatewayMetrics:
    """What the gateway counts: requests, latencies and reloads, in plain Python containers.

    A finished exchange costs one tuple on the request path. The counts are brought up to date
    a batch at a time (`_settle`), whenever `requests` or `latency` is read (a scrape, the
    dashboard) and every `_BATCH` exchanges, mostly by C code: the requests by a Counter, each
    histogram by sorting its batch of durations once and bisecting it at each bucket bound.
    """

    def __init__(self, clock: Any, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.clock = clock
        self.buckets = buckets
        # (api, route, status, cause) -> count; status 0 when no response was sent
        self._requests: dict[tuple[str | None, str | None, int, str | None], int] = {}
        # (api, route) -> [total buckets.., +Inf, total sum, upstream buckets.., +Inf, upstream sum,
        #                  gateway-added buckets.., +Inf, gateway-added sum]
        self._latency: dict[tuple[str | None, str | None], list[float]] = {}
        self._pending: list[tuple[Any, ...]] = []  # finished exchanges not counted yet
        self.reloads: dict[str, int] = {"ok": 0, "error": 0}
        self.last_reload_time = 0.0

    @property
    def requests(self) -> dict[tuple[str | None, str | None, int, str | None], int]:
        """Requests by (api, route, status, cause), every finished exchange counted."""
        if self._pending:
            self._settle()
        return self._requests

    @property
    def latency(self) -> dict[tuple[str | None, str | None], list[float]]:
        """Latency buckets and sums by (api, route), every finished exchange counted."""
        if self._pending:
            self._settle()
        return self._latency

    def exchange_finished(self, exchange: ProxyExchange, listener: object = None) -> None:
        """Count one finished exchange (called once per exchange, on the request path)."""
        pending = self._pending
        pending.append(
            (
                exchange.api_key,
                exchange.route,
                exchange.response_status,
                exchange.error_cause,
                self.clock.seconds() - exchange.started,
                exchange.upstream_elapsed,
            )
        )
        if len(pending) >= _BATCH:
            self._settle()

    def _settle(self) -> None:
        """Count the pending exchanges."""
        pending, self._pending = self._pending, []
        apis, routes, statuses, causes, durations, upstreams = zip(*pending, strict=True)
        names = [None if route is None else route.name for route in routes]
        requests = self._requests
        for key, count in Counter(zip(apis, names, statuses, causes)).items():
            requests[key] = requests.get(key, 0) + count
        groups: dict[tuple[str | None, str | None], list[int]] = {}
        keys = list(zip(apis, names))
        if keys.count(keys[0]) == len(keys):
            groups[keys[0]] = list(range(len(keys)))  # (nearly always: one API and route)
        else:
            for index, key in enumerate(keys):
                groups.setdefault(key, []).append(index)
        buckets = self.buckets
        width = len(buckets) + 1
        for key, indexes in groups.items():
            slots = self._latency.get(key)
            if slots is None:
                slots = self._latency[key] = [0.0] * (3 * width + 3)
            if len(indexes) == len(durations):
                total, upstream = list(durations), list(upstreams)
            else:
                total = [durations[i] for i in indexes]
                upstream = [upstreams[i] for i in indexes]
            added = [t if u is None else t - u for t, u in zip(total, upstream, strict=True)]
            reached = [u for u in upstream if u is not None]
            self._count(slots, 0, total)
            self._count(slots, width + 1, reached)
            self._count(slots, 2 * width + 2, added)

    def _count(self, slots: list[float], base: int, values: list[float]) -> None:
        """Add `values` to the histogram at `slots[base:]` (buckets, +Inf, then the sum)."""
        if not values:
            return
        values.sort()
        below = 0
        for i, bound in enumerate(self.buckets):
            upto = bisect_right(values, bound)  # values <= bound: bisect_left(buckets, v) <= i
            slots[base + i] += upto - below
            below = upto
        width = len(self.buckets) + 1
        slots[base + width - 1] += len(values) - below
        slots[base + width] += sum(values)

    def tunnel_opened(self, exchange: ProxyExchange, listener: object = None) -> None:
        """Count an exchange that became a tunnel, when it does: its latency is the time to the
        switch (a tunnel's lifetime is no request latency, and no time the gateway added)."""
        self.exchange_finished(exchange)

    def tunnel_closed(self, exchange: ProxyExchange, listener: object = None) -> None:
        """A tunnel was counted when it opened."""

    def request_refused(self, peer: object, error: GatewayError, listener: object = None) -> None:
        """Count a request refused before it was parsed whole (no API, no route)."""
        key = (None, None, error.status, error.cause)
        self._requests[key] = self._requests.get(key, 0) + 1

    def reload(self, ok: bool) -> None:
        """Count one configuration reload and its result."""
        self.reloads["ok" if ok else "error"] += 1
        self.last_reload_time = self.clock.seconds()


def source_statuses(source: Any) -> list[Any]:
    """The connection statuses a config source reports (none for the file source)."""
    statuses = getattr(source, "statuses", None)
    return list(statuses()) if statuses is not None else []


def status_class(status: int) -> str:
    """"2xx" for 200..299 and so on; "none" when no response status was sent."""
    return f"{status // 100}xx" if status else _NONE


def _label(value: str | None) -> str:
    return _NONE if value is None else value


class GatewayCollector:
    """A prometheus-client collector reading a GatewayService and its GatewayMetrics at scrape time."""

    def __init__(self, gateway: GatewayService) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[Metric]:
        """The metric families, computed now."""
        gateway = self.gateway
        metrics = gateway.metrics
        yield from self._requests(metrics)
        yield from self._latency(metrics)
        yield from self._storage(gateway.runtime)
        connections = GaugeMetricFamily(
            "flexgw_downstream_connections_active",
            "Open downstream connections, by listener.",
            labels=["listener"],
        )
        for (host, port), factory in sorted(gateway.factories.items()):
            connections.add_metric([f"{host}:{port}"], len(factory.connections))
        yield connections
        pool_labels = ["upstream", "address"]
        idle = GaugeMetricFamily(
            "flexgw_upstream_connections_idle", "Idle pooled upstream connections.", labels=pool_labels
        )
        active = GaugeMetricFamily(
            "flexgw_upstream_connections_active",
            "Upstream connections carrying a request.",
            labels=pool_labels,
        )
        connecting = GaugeMetricFamily(
            "flexgw_upstream_connections_connecting",
            "Upstream connection attempts in progress.",
            labels=pool_labels,
        )
        for upstream, address, pool in gateway.pools.all_pools():
            labels = [upstream.key, address]
            idle.add_metric(labels, len(pool.idle))
            active.add_metric(labels, pool.active)
            connecting.add_metric(labels, pool.connecting)
        yield idle
        yield active
        yield connecting
        yield from self._clusters(gateway)
        reloads = CounterMetricFamily(
            "flexgw_config_reloads", "Configuration reloads, by result.", labels=["result"]
        )
        for result, count in sorted(metrics.reloads.items()):
            reloads.add_metric([result], count)
        yield reloads
        yield GaugeMetricFamily(
            "flexgw_config_last_reload_success",
            "1 when the last reload applied without errors.",
            value=1 if gateway.last_reload_ok else 0,
        )
        yield GaugeMetricFamily(
            "flexgw_config_last_reload_timestamp_seconds",
            "When the configuration was last reloaded (Unix time).",
            value=metrics.last_reload_time,
        )
        yield GaugeMetricFamily(
            "flexgw_config_generation", "The configuration generation in force.",
            value=gateway.plan.generation,
        )
        served = GaugeMetricFamily(
            "flexgw_apis_served", "ApiInstances served, by listener.", labels=["listener"]
        )
        for listener in gateway.plan.listeners:
            served.add_metric([f"{listener.host}:{listener.port}"], len(listener.apis))
        yield served
        tracing = getattr(gateway, "tracing", None)
        if tracing is not None:
            exported, dropped, failures = tracing.counts()
            yield CounterMetricFamily(
                "flexgw_tracing_spans_exported", "Spans the collector accepted.", value=exported
            )
            yield CounterMetricFamily(
                "flexgw_tracing_spans_dropped",
                "Spans dropped: the export queue was full (a slow or absent collector), or their"
                " export failed.",
                value=dropped,
            )
            yield CounterMetricFamily(
                "flexgw_tracing_export_failures", "Span exports that failed or timed out.",
                value=failures,
            )
        yield from self._sources(gateway)

    def _sources(self, gateway: GatewayService) -> Iterator[Metric]:
        """Remote config sources (Kubernetes API, etcd): connected or not, and since when."""
        statuses = source_statuses(gateway.source)
        if not statuses:
            return
        connected = GaugeMetricFamily(
            "flexgw_config_source_connected",
            "1 while a remote config source answers; 0 while it is away (the last applied"
            " configuration keeps serving).",
            labels=["source"],
        )
        since = GaugeMetricFamily(
            "flexgw_config_source_state_since_timestamp_seconds",
            "When the source last connected or disconnected (Unix time).",
            labels=["source"],
        )
        errors = CounterMetricFamily(
            "flexgw_config_source_errors",
            "Failed lists/watches of a remote config source (bad_event: garbage or an unknown"
            " event on a watch stream, reconnected).",
            labels=["source", "kind"],
        )
        for status in statuses:
            connected.add_metric([status.name], 1 if status.connected else 0)
            since.add_metric([status.name], status.since or 0)
            errors.add_metric([status.name, "error"], status.counts.get("errors", 0))
            errors.add_metric([status.name, "bad_event"], status.counts.get("bad_events", 0))
        yield connected
        yield since
        yield errors

    def _clusters(self, gateway: Any) -> Iterator[Metric]:
        """Per address of Services with several (flexgw.upstream.cluster): state and counts."""
        labels = ["upstream", "address"]
        state = GaugeMetricFamily(
            "flexgw_upstream_address_healthy",
            "1 when the address is in rotation (not failed by health checks, not ejected).",
            labels=labels,
        )
        counters = {
            name: CounterMetricFamily(f"flexgw_upstream_address_{name}", text, labels=labels)
            for name, text in (
                ("requests", "Requests (tries) sent to the address."),
                ("failures", "Tries that failed: 5xx, connect failure, reset, timeout."),
                ("retries", "Retries sent to the address."),
                ("ejections", "Times outlier detection ejected the address."),
            )
        }
        dns = CounterMetricFamily(
            "flexgw_upstream_dns_failures",
            "Resolutions of a Service's name that gave no address (the last set is kept).",
            labels=["upstream"],
        )
        panic = GaugeMetricFamily(
            "flexgw_upstream_panic",
            "1 when too few addresses are in rotation and every address is used (panic mode).",
            labels=["upstream"],
        )
        exhausted = CounterMetricFamily(
            "flexgw_upstream_retry_budget_exhausted",
            "Retries the retry budget refused (upstream-retry).",
            labels=["upstream"],
        )
        for upstream, cluster in sorted(gateway.pools.clusters.items(), key=lambda i: i[0].key):
            dns.add_metric([upstream.key], cluster.dns_failures)
            if cluster.budget is not None:
                exhausted.add_metric([upstream.key], cluster.budget.exhausted)
            panic.add_metric([upstream.key], 1 if cluster.panic else 0)
            for member in cluster.members.values():
                values = [upstream.key, member.address]
                state.add_metric(values, 1 if member.state() == "healthy" else 0)
                for name, family in counters.items():
                    family.add_metric(values, getattr(member, name))
        yield state
        yield from counters.values()
        yield dns
        yield panic
        yield exhausted

    def _requests(self, metrics: GatewayMetrics) -> Iterator[Metric]:
        by_class: dict[tuple[str, str, str, str], int] = {}
        rejected: dict[tuple[str, str], int] = {}
        for (api, route, status, cause), count in list(metrics.requests.items()):
            key = (_label(api), _label(route), status_class(status), _label(cause))
            by_class[key] = by_class.get(key, 0) + count
            if cause == "policy_rejected":
                rkey = (_label(api), str(status))
                rejected[rkey] = rejected.get(rkey, 0) + count
        requests = CounterMetricFamily(
            "flexgw_requests",
            "Finished requests, by API, route, status class and gateway error cause.",
            labels=["api", "route", "status_class", "cause"],
        )
        for labels, count in sorted(by_class.items()):
            requests.add_metric(list(labels), count)
        yield requests
        policy = CounterMetricFamily(
            "flexgw_policy_rejections",
            "Requests a policy answered with an error status, by API and status.",
            labels=["api", "status"],
        )
        limited = CounterMetricFamily(
            "flexgw_rate_limit_rejections",
            "Requests a policy refused with 429 (rate limiting, spike control), by API.",
            labels=["api"],
        )
        for (api, status), count in sorted(rejected.items()):
            policy.add_metric([api, status], count)
            if status == "429":
                limited.add_metric([api], count)
        yield policy
        yield limited

    def _storage(self, runtime: Any) -> Iterator[Metric]:
        """Unknown-quota decisions, and the shared store's (Redis) breaker when there is one."""
        unknown = CounterMetricFamily(
            "flexgw_rate_limit_unknown_quota",
            "Rate-limit checks the store could not answer (Redis down), by API and outcome"
            " (refused: 429 quota_unavailable; allowed: blockOnUnknownQuota false).",
            labels=["api", "outcome"],
        )
        for (api, outcome), count in sorted(
            runtime.unknown_quota.items(), key=lambda item: (_label(item[0][0]), item[0][1])
        ):
            unknown.add_metric([_label(api), outcome], count)
        yield unknown
        redis = runtime.redis
        if redis is None:
            return
        breaker = redis.breaker
        yield GaugeMetricFamily(
            "flexgw_shared_storage_up", "1 while the shared storage (Redis) is not known down.",
            value=0 if breaker.down else 1,
        )
        yield CounterMetricFamily(
            "flexgw_shared_storage_outages", "Times the shared storage (Redis) was marked down.",
            value=breaker.outages,
        )
        yield CounterMetricFamily(
            "flexgw_shared_storage_refusals",
            "Rate-limit checks the shared storage (Redis) refused with an error reply while up.",
            value=breaker.refusals,
        )

    def _latency(self, metrics: GatewayMetrics) -> Iterator[Metric]:
        bounds = [_bound(b) for b in metrics.buckets] + ["+Inf"]
        width = len(metrics.buckets) + 1
        families = (
            HistogramMetricFamily(
                "flexgw_request_duration_seconds",
                "Time from the request head to the end of the response, by API and route.",
                labels=["api", "route"],
            ),
            HistogramMetricFamily(
                "flexgw_upstream_response_seconds",
                "Time from sending upstream to the upstream response head, by API and route.",
                labels=["api", "route"],
            ),
            HistogramMetricFamily(
                "flexgw_gateway_added_seconds",
                "Time the gateway added: the request duration less the upstream response time"
                " (all of it when the gateway answered itself), by API and route.",
                labels=["api", "route"],
            ),
        )
        for (api, route), slots in sorted(
            metrics.latency.items(), key=lambda item: (_label(item[0][0]), _label(item[0][1]))
        ):
            for n, family in enumerate(families):
                base = n * (width + 1)
                cumulative = []
                total = 0.0
                for i in range(width):
                    total += slots[base + i]
                    cumulative.append((bounds[i], total))
                if n == 1 and not total:
                    continue  # never reached an upstream
                family.add_metric([_label(api), _label(route)], cumulative, slots[base + width])
        yield from families


def _bound(value: float) -> str:
    return repr(float(value))


def make_registry(gateway: GatewayService, process: bool = True) -> CollectorRegistry:
    """A private registry with the gateway's collector (and the process collector)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gateway))
    if process:
        ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text exposition format."""
    return generate_latest(registry)
