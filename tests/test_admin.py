"""Probes, `flexgw probe`, the admin listener's /metrics and /status, against real gateways."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import tempfile
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.python.usage import UsageError
from twisted.trial.unittest import TestCase

from flexgw import cli
from flexgw.service.admin import admin_site
from flexgw.service.metrics import GatewayMetrics
from flexgw.tap import Options
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import PROCESS_TEST_TIMEOUT, Gateway, api_document, free_port
from tests.test_sigterm import start_twistd, write_conf

HEADER = "apiVersion: gateway.mulesoft.com/v1alpha1\n"


def probe_config(port: int, enabled: str = "true") -> str:
    """A Configuration document enabling the probe listener on 127.0.0.1:`port`."""
    return (
        f"{HEADER}kind: Configuration\nmetadata: {{name: probes}}\n"
        f"spec:\n  probe: {{enabled: {enabled}, port: {port}, host: 127.0.0.1}}\n"
    )


def binding(name: str, target: str, policy: str, config: str) -> str:
    """A PolicyBinding document (config: a flow mapping)."""
    return (
        f"{HEADER}kind: PolicyBinding\nmetadata: {{name: {name}}}\n"
        f"spec:\n  targetRef: {{kind: ApiInstance, name: {target}}}\n"
        f"  policyRef: {{name: {policy}}}\n  config: {config}\n"
    )


def get(path: str) -> bytes:
    """A GET for `path` that closes the connection."""
    return f"GET {path} HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n".encode()


class AdminTestCase(TestCase):
    """A recording upstream and gateways on loopback ports."""

    timeout = 20

    def setUp(self) -> None:
        """A recording upstream."""
        self.upstream = RecordingUpstream(reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)

    def gateway(self, *documents: str) -> Gateway:
        """A started gateway on the concatenated documents."""
        gateway = Gateway(self, {"api.yaml": "---\n".join(documents)})
        gateway.start()
        return gateway

    def api(self, port: int, name: str = "test-api") -> str:
        """An ApiInstance on 127.0.0.1:`port` in front of the recording upstream."""
        return api_document(port, self.upstream.address[1], name)

    def admin(self, gateway: Gateway) -> int:
        """Bind the admin site of `gateway` on an ephemeral loopback port; its port number."""
        port = reactor.listenTCP(0, admin_site(gateway.service), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    async def fetch(self, port: int, path: str) -> Any:
        """One GET against a loopback port."""
        return await client.request(reactor, "127.0.0.1", port, get(path))


class ProbeTests(AdminTestCase):
    """/probes/readiness and /probes/liveness on the `Configuration.spec.probe` listener."""

    async def test_ready_and_alive(self) -> None:
        """One API served without errors: readiness 200, liveness 200."""
        probe = free_port()
        self.gateway(self.api(free_port()), probe_config(probe))
        ready = await self.fetch(probe, "/probes/readiness")
        self.assertEqual((ready.status, json.loads(ready.body)), (200, {"status": "ready"}))
        alive = await self.fetch(probe, "/probes/liveness")
        self.assertEqual(alive.status, 200)

    async def test_no_api_is_not_ready(self) -> None:
        """No ApiInstance: readiness 503 naming why; liveness still 200."""
        probe = free_port()
        self.gateway(probe_config(probe))
        ready = await self.fetch(probe, "/probes/readiness")
        self.assertEqual(ready.status, 503)
        self.assertIn("no API is served", json.loads(ready.body)["reasons"])
        self.assertEqual((await self.fetch(probe, "/probes/liveness")).status, 200)

    async def test_policy_error_and_its_flag(self) -> None:
        """A PolicyBinding error: 503, 200 with allowPolicyErrors, 503 with the other flags."""
        probe = free_port()
        self.gateway(
            self.api(free_port()),
            probe_config(probe),
            binding("bad", "missing-api", "http-basic-authentication-flex",
                    "{username: u, password: p}"),
        )
        self.assertEqual((await self.fetch(probe, "/probes/readiness")).status, 503)
        allowed = await self.fetch(probe, "/probes/readiness?allowPolicyErrors=")
        self.assertEqual(allowed.status, 200)
        others = await self.fetch(probe, "/probes/readiness?allowAPIErrors=&allowEnvoyErrors=")
        self.assertEqual(others.status, 503)
        explicit_no = await self.fetch(probe, "/probes/readiness?allowPolicyErrors=false")
        self.assertEqual(explicit_no.status, 503)

    async def test_api_error_and_its_flag(self) -> None:
        """An invalid ApiInstance beside a good one: 503, 200 with allowAPIErrors only."""
        probe = free_port()
        broken = (
            f"{HEADER}kind: ApiInstance\nmetadata: {{name: broken}}\n"
            "spec:\n  address: 'not an address'\n"
        )
        self.gateway(self.api(free_port()), broken, probe_config(probe))
        self.assertEqual((await self.fetch(probe, "/probes/readiness")).status, 503)
        self.assertEqual(
            (await self.fetch(probe, "/probes/readiness?allowPolicyErrors=")).status, 503
        )
        self.assertEqual((await self.fetch(probe, "/probes/readiness?allowAPIErrors=")).status, 200)

    async def test_unbound_listener_and_envoy_flag(self) -> None:
        """A listener that cannot be bound: 503, 200 with allowEnvoyErrors."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        probe = free_port()
        self.gateway(
            self.api(free_port()), self.api(taken.getsockname()[1], "blocked"), probe_config(probe)
        )
        self.assertEqual((await self.fetch(probe, "/probes/readiness")).status, 503)
        self.assertEqual(
            (await self.fetch(probe, "/probes/readiness?allowEnvoyErrors=")).status, 200
        )

    async def test_readiness_503_while_draining(self) -> None:
        """During a drain the probe listener stays and readiness answers 503 ("draining"); it
        closes once the drain is over."""
        from tests.test_ingress_upstream import Held

        held = Held()
        slow = RecordingUpstream(held.responder, reactor=reactor)
        slow.listen(reactor)
        self.addCleanup(slow.stop)
        port, probe = free_port(), free_port()
        gateway = self.gateway(api_document(port, slow.address[1]), probe_config(probe))
        self.assertEqual((await self.fetch(probe, "/probes/readiness")).status, 200)
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(b"GET /slow HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        await held.wait(1)
        stopped = gateway.service.stopService()
        draining = await self.fetch(probe, "/probes/readiness")
        self.assertEqual(draining.status, 503)
        self.assertIn("the gateway is draining", json.loads(draining.body)["reasons"])
        self.assertEqual((await self.fetch(probe, "/probes/liveness")).status, 200)
        held.answer_all(b"late")
        response = await conn.read_final_response()
        self.assertEqual((response.status, response.body), (200, b"late"))
        await stopped
        with self.assertRaises(ConnectionRefusedError):
            await client.connect(reactor, "127.0.0.1", probe, timeout=5)

    async def test_disabled_probe_binds_nothing(self) -> None:
        """`enabled: false` (and no probe block at all) binds no probe listener."""
        gateway = self.gateway(self.api(free_port()), probe_config(free_port(), "false"))
        self.assertIsNone(gateway.service.probe.port)

    async def test_probe_follows_reload(self) -> None:
        """A reload moving the probe port closes the old listener and opens the new one."""
        first, second = free_port(), free_port()
        gateway = self.gateway(self.api(free_port()), probe_config(first))
        self.assertEqual((await self.fetch(first, "/probes/liveness")).status, 200)
        gateway.write({"api.yaml": "---\n".join([self.api(free_port()), probe_config(second)])})
        gateway.service.reload()
        self.assertEqual((await self.fetch(second, "/probes/liveness")).status, 200)
        self.assertEqual(gateway.service.probe.port.getHost().port, second)


class ProbeCommandTests(AdminTestCase):
    """`flexgw probe` exit codes against a real probe listener (the command blocks: a thread)."""

    async def run_probe(self, *args: str) -> tuple[int, str]:
        """Run `flexgw probe ARGS` in a thread; (exit status, output)."""
        out = io.StringIO()
        status = await deferToThread(cli.main, ["probe", "--timeout", "5", *args], out)
        return status, out.getvalue()

    async def test_exit_codes(self) -> None:
        """0 when ready or alive; 1 when not ready; 0 again with the tolerating flag."""
        probe = free_port()
        self.gateway(
            self.api(free_port()),
            probe_config(probe),
            binding("bad", "missing-api", "http-basic-authentication-flex",
                    "{username: u, password: p}"),
        )
        port = str(probe)
        status, output = await self.run_probe("--check=readiness", "--port", port)
        self.assertEqual(status, 1, output)
        status, output = await self.run_probe(
            "--check=readiness", "--port", port, "--allow-api-errors", "--allow-envoy-errors",
            "--allow-policy-errors",
        )
        self.assertEqual(status, 0, output)
        status, output = await self.run_probe("--check=liveness", "--port", port)
        self.assertEqual(status, 0, output)

    async def test_nothing_listening(self) -> None:
        """Nobody on the port: exit 1."""
        status, output = await self.run_probe("--check=liveness", "--port", str(free_port()))
        self.assertEqual(status, 1)
        self.assertIn("cannot reach", output)


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page: (name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text.decode("utf-8")):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


class MetricsTests(AdminTestCase):
    """/metrics after requests through a real gateway."""

    async def test_requests_latency_pools_reloads(self) -> None:
        """Counters by status class and cause, rate-limit rejections, histograms, gauges."""
        port = free_port()
        limit = (
            "{rateLimits: [{maximumRequests: 2, timePeriodInMilliseconds: 60000}]}"
        )
        gateway = self.gateway(
            self.api(port, "rl-api"), binding("rl", "rl-api", "rate-limiting-flex", limit)
        )
        admin = self.admin(gateway)
        statuses = [
            (await client.request(reactor, "127.0.0.1", port, get("/x"))).status for _ in range(3)
        ]
        self.assertEqual(statuses, [200, 200, 429])
        page = await self.fetch(admin, "/metrics")
        self.assertEqual(page.status, 200)
        self.assertIn(b"text/plain", dict(page.headers).get(b"Content-Type", b""))
        got = samples(page.body)
        api, route = "default/rl-api", "rl-api-b-route-1"

        def value(name: str, **labels: str) -> float:
            return got[(name, tuple(sorted(labels.items())))]

        base = {"api": api, "route": route}
        self.assertEqual(
            value("flexgw_requests_total", status_class="2xx", cause="none", **base), 2
        )
        self.assertEqual(
            value("flexgw_requests_total", status_class="4xx", cause="policy_rejected", **base), 1
        )
        self.assertEqual(value("flexgw_rate_limit_rejections_total", api=api), 1)
        self.assertEqual(value("flexgw_policy_rejections_total", api=api, status="429"), 1)
        self.assertEqual(value("flexgw_request_duration_seconds_count", **base), 3)
        self.assertEqual(value("flexgw_request_duration_seconds_bucket", le="+Inf", **base), 3)
        self.assertEqual(value("flexgw_upstream_response_seconds_count", **base), 2)
        # every request has gateway-added time, also the 429 the gateway answered itself
        self.assertEqual(value("flexgw_gateway_added_seconds_count", **base), 3)
        self.assertLessEqual(
            value("flexgw_gateway_added_seconds_sum", **base),
            value("flexgw_request_duration_seconds_sum", **base),
        )
        upstream = {"upstream": "default/rl-api-b",
                    "address": f"http://127.0.0.1:{self.upstream.address[1]}"}
        self.assertEqual(value("flexgw_upstream_connections_active", **upstream), 0)
        self.assertIn(("flexgw_upstream_connections_idle", tuple(sorted(upstream.items()))), got)
        self.assertEqual(
            value("flexgw_downstream_connections_active", listener=f"127.0.0.1:{port}"), 0
        )
        self.assertEqual(value("flexgw_config_reloads_total", result="ok"), 1)
        self.assertEqual(value("flexgw_config_last_reload_success"), 1)
        self.assertEqual(value("flexgw_apis_served", listener=f"127.0.0.1:{port}"), 1)

    def test_buckets_in_memory(self) -> None:
        """One exchange lands in the bucket of its duration, of its upstream time, and of the
        time the gateway added (the difference)."""
        clock = Clock()
        metrics = GatewayMetrics(clock, buckets=(0.1, 1.0))

        class Exchange:
            route = None
            api_key = None
            response_status = 502
            error_cause = "upstream_reset"
            started = 0.0
            upstream_elapsed = 0.05

        clock.advance(0.5)
        metrics.exchange_finished(Exchange())  # type: ignore[arg-type]
        self.assertEqual(metrics.requests, {(None, None, 502, "upstream_reset"): 1})
        # total 0.5 s, upstream 0.05 s, gateway-added 0.45 s: one bucket and one sum each
        self.assertEqual(
            metrics.latency[(None, None)], [0, 1, 0, 0.5, 1, 0, 0, 0.05, 0, 1, 0, 0.45]
        )


class StatusTests(AdminTestCase):
    """/status: what is served, from which file, and the problems; never secrets."""

    async def test_bindings_files_no_secrets(self) -> None:
        """A basic-auth binding shows its name, kind and file; its password appears nowhere."""
        port = free_port()
        secret = "Pa55-w0rd-do-not-show"
        gateway = self.gateway(
            self.api(port, "secured"),
            binding("auth", "secured", "http-basic-authentication-flex",
                    f"{{username: chris, password: {secret}}}"),
            binding("broken", "elsewhere", "http-basic-authentication-flex",
                    f"{{username: [{secret}x], password: {secret}y}}"),
        )
        admin = self.admin(gateway)
        page = await self.fetch(admin, "/status")
        self.assertEqual(page.status, 200)
        self.assertNotIn(secret.encode(), page.body)
        status = json.loads(page.body)
        (listener,) = status["listeners"]
        (api,) = listener["apis"]
        file = api["file"]
        self.assertTrue(file.endswith("api.yaml"))
        self.assertEqual(api["key"], "default/secured")
        self.assertIn(
            {"name": "default/auth", "kind": "http-basic-authentication-flex", "order": 50,
             "file": file},
            api["policies"],
        )
        self.assertTrue(status["problems"])
        self.assertTrue(
            any(p.get("resource") == "PolicyBinding default/broken" for p in status["problems"])
        )
        kinds = {(r["kind"], r["name"]) for r in status["resources"]}
        self.assertIn(("PolicyBinding", "auth"), kinds)


class AdminOptionTests(TestCase):
    """`twistd flexgw --admin`: loopback by default, `off`, and a bad endpoint refused."""

    def options(self, *args: str) -> Options:
        """Options parsed with a fresh conf dir and `args`."""
        conf = self.mktemp()
        os.makedirs(conf)
        options = Options()
        options.parseOptions(["--conf", conf, *args])
        return options

    def test_default_is_loopback(self) -> None:
        """Without --admin: port 9901 on 127.0.0.1."""
        self.assertEqual(self.options()["admin"], "tcp:9901:interface=127.0.0.1")

    def test_off_and_endpoint(self) -> None:
        """`off` and a valid endpoint string are kept as given."""
        self.assertEqual(self.options("--admin", "off")["admin"], "off")
        self.assertEqual(self.options("--admin", "tcp:0")["admin"], "tcp:0")

    def test_bad_endpoint_refused(self) -> None:
        """An endpoint string that does not parse is a usage error."""
        with self.assertRaises(UsageError):
            self.options("--admin", "nosuchtype:1234")


class TwistdAdminTests(TestCase):
    """`twistd flexgw --admin ENDPOINT`: the real process serves /metrics and /status there."""

    timeout = PROCESS_TEST_TIMEOUT  # (a hang guard: tests.harness)

    async def test_admin_listener_under_twistd(self) -> None:
        """After READY=1 and one proxied request, /metrics counts it and /status lists the API."""
        upstream = RecordingUpstream(reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        directory = tempfile.mkdtemp(prefix="flexgw-adm-")  # short: AF_UNIX path limit
        self.addCleanup(shutil.rmtree, directory, True)
        port, admin = free_port(), free_port()
        conf = write_conf(directory, api_document(port, upstream.address[1]))
        await start_twistd(self, directory, conf, "--admin", f"tcp:{admin}:interface=127.0.0.1")
        response = await client.request(reactor, "127.0.0.1", port, get("/hello"))
        self.assertEqual(response.status, 200)
        metrics = await client.request(reactor, "127.0.0.1", admin, get("/metrics"))
        got = samples(metrics.body)
        key = (
            "flexgw_requests_total",
            tuple(sorted({"api": "default/test-api", "route": "test-api-b-route-1",
                          "status_class": "2xx", "cause": "none"}.items())),
        )
        self.assertEqual(got.get(key), 1, metrics.body.decode(errors="replace"))
        status = await client.request(reactor, "127.0.0.1", admin, get("/status"))
        self.assertEqual(json.loads(status.body)["listeners"][0]["apis"][0]["key"],
                         "default/test-api")
