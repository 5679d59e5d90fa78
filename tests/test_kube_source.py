"""Scenarios of the Kubernetes API source (flexgw.config.sources.kubernetes.KubernetesSource)
feeding a real GatewayService, against the in-test API server over TLS on loopback, with a
recording upstream: objects added/changed/deleted while watching, a watch cut mid-stream,
compaction forcing a re-list, token rotation, the API server down and back, a restart from the
state-dir snapshot, located problems, Secrets watched by name, the namespace filter, and a
resource named by both --conf files and the API."""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from flexgw.config.ingress import ingress_options
from flexgw.config.sources import CombinedSource
from flexgw.config.sources.files import FileSource
from flexgw.config.sources.kubeconnect import KubeConnectionError, from_kubeconfig, in_cluster
from flexgw.config.sources.kubernetes import KubernetesSource
from flexgw.config.sources.state import snapshot_path
from flexgw.service.admin import readiness, status_json
from flexgw.service.gateway import GatewayService
from flexgw.service.metrics import make_registry, render
from flexgw.testing import client
from flexgw.testing.certs import CertificateAuthority
from flexgw.testing.kubeapi import KubeAPI
from flexgw.testing.upstream import RecordingUpstream, fixed
from tests.harness import PROCESS_TEST_TIMEOUT, free_port
from tests.probes import Conditions

FAST = {"backoff_initial": 0.01, "backoff_max": 0.05, "jitter": lambda: 0.5}


def service(upstream_port: int, namespace: str = "shop") -> dict[str, Any]:
    """A v1 Service whose clusterIP is loopback, on the recording upstream's port."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "shop", "namespace": namespace},
        "spec": {"clusterIP": "127.0.0.1", "ports": [{"name": "http", "port": upstream_port}]},
    }


def ingress(name: str, path: str, upstream_port: int, namespace: str = "shop", **spec: Any) -> dict[str, Any]:
    """An Ingress of class flexgw routing `path` (Prefix) to Service shop."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "ingressClassName": "flexgw",
            "rules": [{"http": {"paths": [{
                "path": path, "pathType": "Prefix",
                "backend": {"service": {"name": "shop", "port": {"number": upstream_port}}},
            }]}}],
            **spec,
        },
    }


def write_json(path: str, value: Any) -> str:
    """Write `value` as JSON (which is YAML) to `path`; return the path."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle)
    return path


class KubeSourceCase(TestCase):
    """A TLS API server with token "t1" (read from a token file), an upstream, and a gateway
    serving a KubernetesSource from a kubeconfig."""

    timeout = 30
    namespaces: tuple[str, ...] = ()

    def setUp(self) -> None:
        self.ca = CertificateAuthority()
        self.api = KubeAPI(reactor, tokens={"t1": None})
        self.api.listen(tls=self.ca.issue("127.0.0.1", ips=["127.0.0.1"]))
        self.addCleanup(lambda: self.api.stop())
        self.upstream = RecordingUpstream(fixed(status=200, body=b"ok"), reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.up = self.upstream.address[1]
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.token_file = os.path.join(self.dir, "token")
        self.write_token("t1")
        self.kubeconfig = os.path.join(self.dir, "config")
        config = json.loads(self.api.kubeconfig(None, self.ca.pem))
        config["users"][0]["user"] = {"tokenFile": "token"}  # relative to the kubeconfig
        with open(self.kubeconfig, "w", encoding="utf-8") as handle:
            json.dump(config, handle)
        self.state_dir = os.path.join(self.dir, "state")
        self.port = free_port()
        self.conditions = Conditions()

    def write_token(self, token: str) -> None:
        """(Re)write the token file, as the kubelet does on rotation."""
        with open(self.token_file, "w", encoding="utf-8") as handle:
            handle.write(token + "\n")

    def connect(self) -> Any:
        """A connection from the kubeconfig, its idle connections closed when the test ends."""
        connection = from_kubeconfig(reactor, self.kubeconfig)
        self.addCleanup(connection.close)
        return connection

    def make_source(self) -> KubernetesSource:
        """A source on the kubeconfig (fast backoff), snapshotting into the state dir."""
        connection = self.connect()
        return KubernetesSource(reactor, connection, self.namespaces, state_dir=self.state_dir, **FAST)

    def start(self, source: Any = None, debounce: float = 0.01, strict: bool = False) -> GatewayService:
        """A gateway on `source` (default: a new KubernetesSource), watching it."""
        self.source = source if source is not None else self.make_source()
        gateway = GatewayService(reactor, self.source, {}, strict=strict)
        gateway.ingress = ingress_options("flexgw", False, f"http://127.0.0.1:{self.port}")
        reload = gateway.reload

        def reloaded() -> bool:
            ok = reload()
            self.check()
            return ok

        gateway.reload = reloaded  # type: ignore[method-assign]
        watcher = self.source.watcher(reactor, gateway.reload, debounce)
        gateway.startService()
        watcher.start()
        self.addCleanup(gateway.stopService)
        self.addCleanup(watcher.stop)
        self.gateway = gateway
        return gateway

    def check(self) -> None:
        """Fire the waiters whose predicate holds."""
        self.conditions.check()

    def until(self, predicate: Callable[[], bool]) -> defer.Deferred[None]:
        """Fire once `predicate()` holds after a reload (or now)."""
        return self.conditions.until(predicate)

    def routes(self) -> set[str]:
        """The served route names."""
        return {route.name for listener in self.gateway.plan.listeners for api in listener.apis
                for route in api.routes}

    def serves(self, name: str) -> Callable[[], bool]:
        """A predicate: a route of Ingress `name` is served."""
        return lambda: any(r.startswith(name + ":") for r in self.routes())

    async def get(self, path: bytes) -> int:
        """The status of GET `path` through the default Ingress listener."""
        raw = b"GET " + path + b" HTTP/1.1\r\nHost: shop.example\r\n\r\n"
        response = await client.request(reactor, "127.0.0.1", self.port, raw)
        return response.status  # type: ignore[no-any-return]

    def queries(self) -> list[tuple[str, dict[str, str]]]:
        """(path, query) of every GET the API server saw."""
        out = []
        for method, target in self.api.requests:
            parts = urlsplit(target)
            if method == "GET":
                out.append((parts.path, {k: v[-1] for k, v in parse_qs(parts.query).items()}))
        return out


class WatchScenarioTests(KubeSourceCase):
    """Changes while watching, cut watches, compaction, rotation, loss of the API server."""

    async def test_add_change_delete_while_watching(self) -> None:
        """Objects added, changed and deleted in the API are served, changed and dropped, each
        change applied in one debounced reload."""
        self.api.put(service(self.up))
        self.api.put(ingress("web", "/orders", self.up))
        self.start()
        await self.until(self.serves("shop/web"))
        self.assertEqual(await self.get(b"/orders/1"), 200)
        self.assertEqual(self.upstream.received[-1].target, b"/orders/1")
        self.api.put(ingress("carts", "/carts", self.up))
        await self.until(self.serves("shop/carts"))
        self.assertEqual(await self.get(b"/carts"), 200)
        self.api.put(ingress("web", "/v2/orders", self.up))
        await self.until(lambda: self.serves("shop/web")() and self.gateway.plan.listeners
                         and any("/v2/orders" in str(r) for r in self.gateway.plan.listeners[0].apis[0].routes))
        self.assertEqual(await self.get(b"/orders/1"), 404)
        self.assertEqual(await self.get(b"/v2/orders/1"), 200)
        self.api.remove("networking.k8s.io/v1", "Ingress", "shop", "carts")
        await self.until(lambda: not self.serves("shop/carts")())
        self.assertEqual(await self.get(b"/carts"), 404)
        self.assertTrue(self.gateway.last_reload_ok)
        [status] = status_json(self.gateway)["sources"]
        self.assertTrue(status["connected"])
        resources = {(r["kind"], r["file"]) for r in status_json(self.gateway)["resources"]}
        self.assertIn(("Ingress", "Ingress shop/web"), resources)

    async def test_ingress_class_of_the_manifests(self) -> None:
        """An IngressClass naming deploy/kubernetes's domain-prefixed controller (what a real API
        server requires) makes its Ingresses served; another controller's class does not."""
        self.api.put(service(self.up))
        for name, controller in (("edge", "flexgw.dev/ingress-controller"), ("nginx", "k8s.io/ingress-nginx")):
            self.api.put({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
                          "metadata": {"name": name}, "spec": {"controller": controller}})
            self.api.put(ingress(f"via-{name}", f"/{name}", self.up, ingressClassName=name))
        self.start()
        await self.until(self.serves("shop/via-edge"))
        self.assertFalse(self.serves("shop/via-nginx")())

    async def test_burst_is_one_reload(self) -> None:
        """Three objects written together after the sync are applied in a single reload."""
        self.api.put(service(self.up))
        self.start(debounce=0.3)
        await self.until(lambda: self.source.synced and self.gateway.reloads >= 2)
        before = self.gateway.reloads
        for name in ("a", "b", "c"):
            self.api.put(ingress(name, f"/{name}", self.up))
        await self.until(lambda: all(self.serves(f"shop/{n}")() for n in "abc"))
        self.assertEqual(self.gateway.reloads, before + 1)

    async def test_watch_cut_and_compaction(self) -> None:
        """A watch cut mid-stream resumes from its version (a change made meanwhile arrives); a
        compacted version re-lists."""
        self.api.put(service(self.up))
        self.start()
        await self.until(lambda: self.source.synced)
        opened = self.api.watches_opened
        self.api.cut_watches()
        self.api.put(ingress("web", "/orders", self.up))  # while no watch is open
        await self.until(self.serves("shop/web"))
        await self.api.watch_opened(opened + len(self.source.collections))
        lists = sum(c.counts["lists"] for c in self.source.collections)
        self.api.cut_watches()
        self.api.put(ingress("late", "/late", self.up))
        self.api.compact()  # the versions the watches resume from are gone
        await self.until(self.serves("shop/late"))
        relisted = sum(c.counts["relists_gone"] for c in self.source.collections)
        self.assertGreater(relisted, 0)
        self.assertGreater(sum(c.counts["lists"] for c in self.source.collections), lists)

    async def test_token_rotation(self) -> None:
        """After the token file is rewritten and the old token revoked, requests carry the new
        token: the source keeps following changes."""
        self.api.put(service(self.up))
        self.start()
        await self.until(lambda: self.source.synced)
        self.write_token("t2")
        self.api.set_token("t2")
        self.api.revoke("t1")
        self.api.cut_watches()
        self.api.put(ingress("web", "/orders", self.up))
        await self.until(self.serves("shop/web"))
        self.assertEqual(await self.get(b"/orders"), 200)

    async def test_api_server_down_and_back(self) -> None:
        """While the API server is away the gateway serves the last configuration, readiness is
        unchanged, /status and /metrics say disconnected since when; back, it catches up."""
        self.api.put(service(self.up))
        self.api.put(ingress("web", "/orders", self.up))
        gateway = self.start()
        await self.until(self.serves("shop/web"))
        ready_before = readiness(gateway)
        port = self.api.port.getHost().port
        await self.api.stop()
        status = self.source.status
        await self.until_status(lambda: not status.connected)
        self.assertEqual(await self.get(b"/orders"), 200)
        self.assertEqual(readiness(gateway), ready_before)
        [shown] = status_json(gateway)["sources"]
        self.assertFalse(shown["connected"])
        self.assertIsNotNone(shown["since"])
        self.assertIn("lastError", shown)
        metrics = render(make_registry(gateway, process=False)).decode()
        self.assertIn(f'flexgw_config_source_connected{{source="{status.name}"}} 0.0', metrics)
        self.api.put(ingress("more", "/more", self.up))
        self.api.listen(port, tls=self.ca.issue("127.0.0.1", ips=["127.0.0.1"]))
        await self.until(self.serves("shop/more"))
        await self.until_status(lambda: status.connected)
        self.assertEqual(await self.get(b"/more"), 200)

    def until_status(self, predicate: Callable[[], bool]) -> defer.Deferred[None]:
        """Fire once `predicate()` holds, checked at every state change of a collection."""
        for collection in self.source.collections:
            previous = collection.on_state

            def on_state(state: str, previous: Any = previous) -> None:
                previous(state)
                self.check()

            collection.on_state = on_state
            answer = collection.on_answer

            def on_answer(answer: Any = answer) -> None:
                answer()
                self.check()

            collection.on_answer = on_answer
        return self.until(predicate)

    async def test_garbage_on_the_stream_is_counted(self) -> None:
        """Garbage on a watch stream reconnects, is counted in /status, and changes keep flowing."""
        self.start()
        await self.until(lambda: self.source.synced)
        opened = len(self.source.collections)
        await self.api.watch_opened(opened)  # every first watch is open: each gets the garbage
        self.api.send_raw(b"{not json\n")
        await self.api.watch_opened(opened + 1)  # one reconnected after it
        self.api.put(service(self.up))
        self.api.put(ingress("web", "/orders", self.up))
        await self.until(self.serves("shop/web"))
        [shown] = status_json(self.gateway)["sources"]
        self.assertGreater(shown["counts"]["bad_events"], 0)


class SnapshotRestartTests(KubeSourceCase):
    """The last applied resources are snapshotted; a restart with the API away serves them."""

    async def test_restart_while_api_is_away(self) -> None:
        """A new source started while the API server is down serves the snapshot, says so in
        /status, and switches to the API's view once it answers."""
        self.api.put(service(self.up))
        self.api.put(ingress("web", "/orders", self.up))
        gateway = self.start()
        await self.until(self.serves("shop/web"))
        self.assertTrue(os.path.exists(snapshot_path(self.state_dir, "kubernetes")))
        await gateway.stopService()
        self.source.stop()
        port = self.api.port.getHost().port
        await self.api.stop()
        self.start()  # a restart: a new source and gateway
        self.assertTrue(self.serves("shop/web")())  # from the snapshot, before any answer
        [shown] = status_json(self.gateway)["sources"]
        self.assertIn(self.state_dir, shown["fromSnapshot"])
        self.assertEqual(await self.get(b"/orders"), 200)
        self.api.remove("networking.k8s.io/v1", "Ingress", "shop", "web")
        self.api.put(ingress("new", "/new", self.up))
        self.api.listen(port, tls=self.ca.issue("127.0.0.1", ips=["127.0.0.1"]))
        await self.until(lambda: self.serves("shop/new")() and not self.serves("shop/web")())
        self.assertNotIn("fromSnapshot", status_json(self.gateway)["sources"][0])


class ProblemTests(KubeSourceCase):
    """Bad objects are located problems on that object; everything else keeps serving."""

    namespaces = ("shop",)

    async def test_bad_object_keeps_last_good(self) -> None:
        """An invalid change to a served Ingress keeps its last good version, with the problem
        located at "Ingress shop/web" and the field; a new invalid one is an error alone."""
        self.api.put(service(self.up))
        self.api.put(ingress("web", "/orders", self.up))
        self.start()
        await self.until(self.serves("shop/web"))
        bad = ingress("web", "/orders", self.up)
        bad["spec"]["rules"][0]["http"]["paths"][0]["pathType"] = "Sometimes"
        self.api.put(bad)
        other = ingress("other", "/other", self.up)
        other["spec"]["rules"][0]["http"]["paths"][0]["pathType"] = "Sometimes"
        self.api.put(other)
        await self.until(lambda: any(p.file == "Ingress shop/other" for p in self.gateway.state.problems))
        problems = {(p.file, p.severity, p.field) for p in self.gateway.state.problems if p.file and p.field}
        self.assertIn(("Ingress shop/web", "error", "spec.rules[0].http.paths[0].pathType"), problems)
        self.assertIn(("Ingress shop/other", "error", "spec.rules[0].http.paths[0].pathType"), problems)
        self.assertEqual(await self.get(b"/orders"), 200)  # the last good version serves
        self.assertFalse(readiness(self.gateway)[0])
        self.assertTrue(readiness(self.gateway, {"allowAPIErrors": True})[0])

    async def test_namespace_filter_and_secrets_by_name(self) -> None:
        """With --kube-namespace shop, only that namespace's collections are read; a TLS Secret
        an Ingress names is fetched by name, never listed cluster-wide."""
        self.api.put(service(self.up))
        self.api.put(ingress("elsewhere", "/elsewhere", self.up, namespace="other"))
        issued = self.ca.issue("shop.example", dns=["shop.example"])
        self.api.put({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": "shop-tls", "namespace": "shop"},
            "data": {"tls.crt": base64.b64encode(issued.cert_pem).decode(),
                     "tls.key": base64.b64encode(issued.key_pem).decode()},
        })
        self.api.put({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "unrelated", "namespace": "shop"},
                      "data": {"password": base64.b64encode(b"hunter2").decode()}})
        self.api.put(ingress("web", "/orders", self.up,
                             tls=[{"hosts": ["shop.example"], "secretName": "shop-tls"}]))
        self.start()
        await self.until(lambda: self.serves("shop/web")() and bool(self.source.secrets)
                         and self.source.synced and self.gateway.reloads >= 2)
        self.assertFalse(self.serves("other/elsewhere")())
        self.assertEqual(list(self.source.secrets), [("shop", "shop-tls")])
        secret_queries = [(p, q) for p, q in self.queries() if "/secrets" in p]
        self.assertTrue(secret_queries)
        for path, query in secret_queries:
            self.assertEqual(path, "/api/v1/namespaces/shop/secrets")
            self.assertEqual(query.get("fieldSelector"), "metadata.name=shop-tls")
        for path, _ in self.queries():
            if "namespaces/" not in path:
                self.assertIn(path, ("/apis/networking.k8s.io/v1/ingressclasses",))
        origins = {r.origin for r in self.gateway.state.resources.values()}
        self.assertIn("Secret shop/shop-tls", origins)
        self.assertNotIn("Secret shop/unrelated", origins)


class FlexCrdTests(KubeSourceCase):
    """The Flex CRDs from the API: an ApiInstance, a Service and a PolicyBinding, v1alpha1 and
    v1beta1 alike; a Secret that is not a key pair is a problem on that Secret alone."""

    async def test_flex_resources_from_the_api(self) -> None:
        """An ApiInstance (v1beta1) routed to a Flex Service (v1alpha1) with a PolicyBinding
        adding a header is served from the API; an unknown key in another ApiInstance is an error
        located on it under --strict (once: "ApiInstance shop/broken: error: spec.surprise: ..."),
        and the first keeps serving."""
        port = free_port()
        flex = "gateway.mulesoft.com/"
        self.api.put({"apiVersion": flex + "v1beta1", "kind": "ApiInstance",
                      "metadata": {"name": "orders", "namespace": "shop"},
                      "spec": {"address": f"http://127.0.0.1:{port}",
                               "services": {"backend": {"address": f"http://127.0.0.1:{self.up}",
                                                        "routes": [{"config": {"destinationPath": "/"}}]}}}})
        self.api.put({"apiVersion": flex + "v1alpha1", "kind": "PolicyBinding",
                      "metadata": {"name": "tag", "namespace": "shop"},
                      "spec": {"targetRef": {"kind": "ApiInstance", "name": "orders"},
                               "policyRef": {"name": "header-injection-flex"},
                               "config": {"inboundHeaders": [{"key": "x-from", "value": "crd"}]}}})
        self.api.put({"apiVersion": flex + "v1alpha1", "kind": "ApiInstance",
                      "metadata": {"name": "broken", "namespace": "shop"},
                      "spec": {"address": f"http://127.0.0.1:{free_port()}", "surprise": 1}})
        self.start(strict=True)
        await self.until(lambda: any(api.key == "shop/orders" for listener in self.gateway.plan.listeners
                                     for api in listener.apis))
        raw = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
        response = await client.request(reactor, "127.0.0.1", port, raw)
        self.assertEqual(response.status, 200)
        self.assertEqual(self.upstream.received[-1].header("x-from"), [b"crd"])
        [problem] = [p for p in self.gateway.state.errors if p.file == "ApiInstance shop/broken"]
        self.assertEqual(problem.field, "spec.surprise")
        self.assertTrue(str(problem).startswith("ApiInstance shop/broken: error: spec.surprise: "), str(problem))

    async def test_bad_tls_secret(self) -> None:
        """A referenced Secret whose key does not match its certificate is an error on
        "Secret shop/bad-tls"; the Ingress' plain-HTTP route keeps serving."""
        one, other = self.ca.issue("shop.example", dns=["shop.example"]), self.ca.issue("x")
        self.api.put(service(self.up))
        self.api.put({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": "bad-tls", "namespace": "shop"},
            "data": {"tls.crt": base64.b64encode(one.cert_pem).decode(),
                     "tls.key": base64.b64encode(other.key_pem).decode()},
        })
        self.api.put(ingress("web", "/orders", self.up, tls=[{"hosts": ["shop.example"], "secretName": "bad-tls"}]))
        self.start()
        await self.until(lambda: self.serves("shop/web")() and any(
            p.file == "Secret shop/bad-tls" for p in self.gateway.state.errors))
        self.assertEqual(await self.get(b"/orders"), 200)


class CombinedSourceTests(KubeSourceCase):
    """--conf files and the API together; a resource named by both is a located conflict."""

    def write_conf(self, files: dict[str, Any]) -> str:
        """A conf dir holding each document as JSON (which is YAML); its path."""
        conf = os.path.join(self.dir, "conf")
        os.makedirs(conf)
        for name, document in files.items():
            with open(os.path.join(conf, name), "w", encoding="utf-8") as handle:
                json.dump(document, handle)
        return conf

    async def test_conflict_between_sources(self) -> None:
        """The same Ingress in a file and in the API: an error naming both, the file's kept."""
        conf = self.write_conf({"web.yaml": ingress("web", "/from-file", self.up)})
        self.api.put(service(self.up))
        self.api.put(ingress("web", "/from-api", self.up))
        self.api.put(ingress("api-only", "/api-only", self.up))
        source = CombinedSource([("files", FileSource([conf])), ("kubernetes", self.make_source())])
        self.start(source)
        kube = source.sources[1][1]
        await self.until(lambda: kube.synced and self.serves("shop/api-only")())
        [conflict] = [p for p in self.gateway.state.problems if "one source only" in p.message]
        self.assertEqual((conflict.severity, conflict.file, conflict.resource),
                         ("error", "Ingress shop/web", "Ingress shop/web"))
        self.assertIn("web.yaml", conflict.message)
        self.assertEqual(await self.get(b"/from-file"), 200)
        self.assertEqual(await self.get(b"/from-api"), 404)
        self.assertEqual([s.name for s in source.statuses()], [kube.status.name])


class ConnectionTests(TestCase):
    """In-cluster and kubeconfig connection settings."""

    def test_in_cluster(self) -> None:
        """KUBERNETES_SERVICE_HOST/PORT, the service account CA, namespace and token (re-read)."""
        sa = self.mktemp()
        os.makedirs(sa)
        ca = CertificateAuthority()
        for name, data in (("ca.crt", ca.pem.decode()), ("token", "one\n"), ("namespace", "gw")):
            with open(os.path.join(sa, name), "w", encoding="utf-8") as handle:
                handle.write(data)
        connection = in_cluster(reactor, {"KUBERNETES_SERVICE_HOST": "fd00::1",
                                          "KUBERNETES_SERVICE_PORT": "443"}, sa)
        self.assertEqual((connection.server, connection.namespace, connection.token()),
                         ("https://[fd00::1]:443", "gw", "one"))
        with open(os.path.join(sa, "token"), "w", encoding="utf-8") as handle:
            handle.write("two\n")
        self.assertEqual(connection.token(), "two")
        with self.assertRaises(KubeConnectionError):
            in_cluster(reactor, {}, sa)

    async def test_kubeconfig_client_certificate(self) -> None:
        """A kubeconfig user with client-certificate/client-key files (relative to it) reaches an
        API server that requires a client certificate; without one the TLS handshake fails."""
        ca = CertificateAuthority()
        api = KubeAPI(reactor)
        api.listen(tls=ca.issue("127.0.0.1", ips=["127.0.0.1"]), client_ca_pem=ca.pem)
        self.addCleanup(api.stop)
        directory = os.path.abspath(self.mktemp())
        ca.issue("flexgw", client=True).write(directory, "client")
        config = json.loads(api.kubeconfig(None, ca.pem))
        user = {"client-certificate": "client.crt", "client-key": "client.key"}
        for with_cert, name in ((True, "with.json"), (False, "without.json")):
            config["users"][0]["user"] = user if with_cert else {}
            path = write_json(os.path.join(directory, name), config)
            connection = from_kubeconfig(reactor, path)
            self.addCleanup(connection.close)
            if with_cert:
                code, body = await connection.request("GET", "/api/v1/namespaces/shop/services")
                self.assertEqual((code, body["kind"]), (200, "ServiceList"))
            else:
                with self.assertRaises(Exception):  # noqa: B017 - the TLS alert's error type varies
                    await connection.request("GET", "/api/v1/namespaces/shop/services")

    def test_kubeconfig_errors(self) -> None:
        """A missing context, an exec plug-in, half a client certificate: clear errors."""
        path = os.path.join(self.mktemp())
        base = {"clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x"}
        cases = [
            ({**base, "current-context": "nope"}, "no context named 'nope'"),
            ({**base, "users": [{"name": "u", "user": {"exec": {"command": "aws"}}}]}, "uses exec"),
            ({**base, "users": [{"name": "u", "user": {"client-certificate-data": "AA=="}}]}, "both cert and key"),
        ]
        for config, message in cases:
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(config, handle)
            with self.assertRaises(KubeConnectionError) as raised:
                from_kubeconfig(reactor, path)
            self.assertIn(message, str(raised.exception))


class TwistdTests(KubeSourceCase):
    """The real `twistd flexgw --kubeconfig ...` process against the in-test API server."""

    timeout = PROCESS_TEST_TIMEOUT  # (a hang guard: tests.harness)

    def short_dir(self) -> str:
        """A directory with a short path (a UNIX socket's path is at most 107 bytes)."""
        directory = tempfile.mkdtemp(prefix="kube")
        self.addCleanup(shutil.rmtree, directory, True)
        return directory

    async def test_serves_the_api_then_restarts_from_the_snapshot(self) -> None:
        """twistd serves an Ingress from the API and, elected leader, publishes --publish-address
        in its status; restarted while the API server is down, it says it serves the snapshot from
        --state-dir, and does."""
        from tests.test_sigterm import start_twistd

        self.patch(os, "environ", {**os.environ, "FLEX_SYNC_DEBOUNCE_TIME": "10ms"})
        self.api.put(service(self.up))
        self.api.put(ingress("web", "/orders", self.up))
        conf = os.path.join(self.dir, "conf")
        os.makedirs(conf)
        options = ("--kubeconfig", self.kubeconfig, "--state-dir", self.state_dir,
                   "--ingress-listener", f"http://127.0.0.1:{self.port}", "--publish-address", "192.0.2.9")
        published: defer.Deferred[None] = defer.Deferred()

        def on_event(event: Any) -> None:
            status = event.obj.get("status") or {}
            if event.key[1] == "ingresses" and status.get("loadBalancer") and not published.called:
                published.callback(None)

        self.api.store.listeners.append(on_event)
        first = await start_twistd(self, self.short_dir(), conf, *options)
        await first.process.wait_output(b"applied: 1 API(s)")
        self.assertEqual(await self.get(b"/orders"), 200)
        await published
        web = self.api.get("networking.k8s.io/v1", "Ingress", "shop", "web")
        self.assertEqual(web["status"]["loadBalancer"], {"ingress": [{"ip": "192.0.2.9"}]})
        lease = self.api.get("coordination.k8s.io/v1", "Lease", "default", "flexgw-leader")
        self.assertTrue(lease["spec"]["holderIdentity"])
        first.transport.signalProcess("KILL")
        await first.process.ended
        await self.api.stop()
        second = await start_twistd(self, self.short_dir(), conf, *options)
        output = await second.process.wait_output(b"serving the snapshot")
        self.assertIn(self.state_dir.encode(), output)
        self.assertEqual(await self.get(b"/orders"), 200)

    def test_options(self) -> None:
        """--kube-namespace and --kubeconfig imply --kubernetes; with --conf both are combined;
        without --conf no /etc/flexgw default is added."""
        from twisted.python.usage import UsageError

        from flexgw.tap import Options, config_source

        options = Options()
        options.parseOptions(["--kubeconfig", self.kubeconfig, "--kube-namespace", "a",
                              "--kube-namespace", "b", "--state-dir", "off"])
        self.assertEqual((options["kubernetes"], options["conf"], options["kube-namespaces"]),
                         (True, [], ["a", "b"]))
        source, kube = config_source(reactor, options, {})
        self.assertIs(source, kube)
        self.assertIsNone(kube.state_dir)
        self.assertEqual(kube.connection.server, self.api.url)
        conf = os.path.join(self.dir, "conf")
        os.makedirs(conf)
        options = Options()
        options.parseOptions(["--kubernetes", "--kubeconfig", self.kubeconfig, "--conf", conf])
        source, kube = config_source(reactor, options, {})
        self.assertIsInstance(source, CombinedSource)
        self.assertEqual(kube.state_dir, "/var/lib/flexgw")
        for args, message in (
            (["--conf", conf, "--publish-address", "1.2.3.4"], "need --kubernetes"),
            (["--kubeconfig", self.kubeconfig, "--publish-service", "nope"], "NAMESPACE/NAME"),
            (["--kubeconfig", self.kubeconfig, "--publish-service", "a/b", "--publish-address", "x"], "not both"),
        ):
            with self.assertRaises(UsageError) as raised:
                Options().parseOptions(args)
            self.assertIn(message, str(raised.exception))
