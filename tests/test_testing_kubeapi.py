"""Tests of the in-test Kubernetes API server (flexgw.testing.kubeapi) over real loopback HTTP:
list pagination, watch streams, 410 Gone, auth, optimistic concurrency, Leases, and kubectl."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import treq
import yaml
from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone

from flexgw.config.load import load_text
from flexgw.config.validate import check_document
from flexgw.testing.certs import CertificateAuthority
from flexgw.testing.kubeapi import KubeAPI

INGRESSES = "/apis/networking.k8s.io/v1/namespaces/shop/ingresses"
LEASES = "/apis/coordination.k8s.io/v1/namespaces/flexgw/leases"


def ingress(name: str, host: str = "shop.example", namespace: str = "shop") -> dict[str, Any]:
    """A minimal Ingress of class flexgw."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "ingressClassName": "flexgw",
            "rules": [{"host": host, "http": {"paths": [{
                "path": "/", "pathType": "Prefix",
                "backend": {"service": {"name": "shop", "port": {"number": 80}}},
            }]}}],
        },
    }


class WatchStream:
    """The events of one watch response, as they arrive; `wait(n)` fires once n have."""

    def __init__(self, response: Any) -> None:
        self.events: list[dict[str, Any]] = []
        self._buffer = b""
        self._waiting: list[tuple[int, defer.Deferred[None]]] = []
        self.done = treq.collect(response, self._data)

    def _data(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        self.events.extend(json.loads(line) for line in lines if line)
        for n, waiter in list(self._waiting):
            if len(self.events) >= n:
                self._waiting.remove((n, waiter))
                waiter.callback(None)

    def wait(self, n: int) -> defer.Deferred[None]:
        """Fire once `n` events arrived."""
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((n, waiter))
        self._data(b"")
        return waiter

    def types(self) -> list[str]:
        """The event types so far."""
        return [event["type"] for event in self.events]


class KubeAPITestCase(TestCase):
    """A KubeAPI on loopback with an admin token, a reader token, and a treq client."""

    def setUp(self) -> None:
        self.api = KubeAPI(reactor, tokens={"admin": None, "reader": ["get", "list", "watch"]})
        self.api.listen()
        self.addCleanup(self.api.stop)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    def request(self, method: str, path: str, body: Any = None, token: str | None = "admin",
                content_type: str = "application/json") -> Any:
        """Send one request; returns the response Deferred."""
        headers = {"Content-Type": [content_type]}
        if token is not None:
            headers["Authorization"] = [f"Bearer {token}"]
        data = json.dumps(body).encode() if body is not None else None
        return self.http.request(method, self.api.url + path, data=data, headers=headers)

    async def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
        """(status code, JSON body) of one request."""
        response = await self.request(method, path, body, **kwargs)
        return response.code, json.loads(await response.content())

    async def watch(self, query: str, token: str = "admin") -> WatchStream:
        """Open a watch on the shop Ingresses."""
        response = await self.request("GET", f"{INGRESSES}?watch=1&{query}", token=token)
        self.assertEqual(response.code, 200)
        self.assertIsNone(response.headers.getRawHeaders("content-length"))  # a chunked stream
        stream = WatchStream(response)
        self.addCleanup(self._close, stream)
        return stream

    async def _close(self, stream: WatchStream) -> None:
        """Cut a watch still open at the end of a test and wait until its client saw it end."""
        self.api.cut_watches()
        try:
            await stream.done
        except Exception:  # noqa: BLE001,S110 - a cut stream fails, which is the point
            pass


class ListTests(KubeAPITestCase):
    """list: resourceVersion, limit/continue pagination from one snapshot, 410 once compacted."""

    async def test_pages_come_from_the_first_page_snapshot(self) -> None:
        """Pages of `limit` items continue from one snapshot; a later change is not in page two."""
        for name in "abcde":
            self.api.put(ingress(name))
        code, page = await self.call("GET", f"{INGRESSES}?limit=2")
        self.assertEqual(code, 200)
        self.assertEqual((page["kind"], page["apiVersion"]), ("IngressList", "networking.k8s.io/v1"))
        self.assertEqual([i["metadata"]["name"] for i in page["items"]], ["a", "b"])
        self.assertNotIn("kind", page["items"][0])  # built-in list items omit kind/apiVersion
        snapshot = page["metadata"]["resourceVersion"]
        self.api.remove("networking.k8s.io/v1", "Ingress", "shop", "c")
        self.api.put(ingress("bb"))
        names = []
        token = page["metadata"]["continue"]
        while token:
            code, page = await self.call("GET", f"{INGRESSES}?limit=2&continue={token}")
            self.assertEqual(page["metadata"]["resourceVersion"], snapshot)
            names += [i["metadata"]["name"] for i in page["items"]]
            token = page["metadata"].get("continue")
        self.assertEqual(names, ["c", "d", "e"])
        code, fresh = await self.call("GET", INGRESSES)
        self.assertEqual([i["metadata"]["name"] for i in fresh["items"]], ["a", "b", "bb", "d", "e"])
        self.assertGreater(int(fresh["metadata"]["resourceVersion"]), int(snapshot))

    async def test_continue_after_compaction_is_gone(self) -> None:
        """A continue token whose snapshot was compacted away is a 410 Status, reason Expired."""
        for name in "abc":
            self.api.put(ingress(name))
        _, page = await self.call("GET", f"{INGRESSES}?limit=1")
        self.api.put(ingress("d"))
        self.api.compact()
        code, body = await self.call("GET", f"{INGRESSES}?limit=1&continue={page['metadata']['continue']}")
        self.assertEqual(code, 410)
        self.assertEqual((body["kind"], body["reason"], body["code"]), ("Status", "Expired", 410))

    async def test_all_namespaces_and_custom_resources(self) -> None:
        """The cluster-wide collection lists every namespace; CRD list items keep their kind."""
        self.api.put(ingress("a", namespace="one"))
        self.api.put(ingress("b", namespace="two"))
        self.api.put({"apiVersion": "gateway.mulesoft.com/v1alpha1", "kind": "ApiInstance",
                      "metadata": {"name": "x", "namespace": "one"}, "spec": {"address": "http://0.0.0.0:8080"}})
        _, body = await self.call("GET", "/apis/networking.k8s.io/v1/ingresses")
        self.assertEqual([i["metadata"]["namespace"] for i in body["items"]], ["one", "two"])
        _, body = await self.call("GET", "/apis/gateway.mulesoft.com/v1alpha1/namespaces/one/apiinstances")
        self.assertEqual(body["items"][0]["kind"], "ApiInstance")


class WatchTests(KubeAPITestCase):
    """watch: chunked JSON events, bookmarks, timeouts, a cut stream, 410 as an ERROR event."""

    async def test_events_from_a_list_version(self) -> None:
        """Watching from a list's resourceVersion sends later ADDED/MODIFIED/DELETED, in order."""
        self.api.put(ingress("a"))
        _, listed = await self.call("GET", INGRESSES)
        self.api.put(ingress("b"))  # between the list and the watch: still delivered
        stream = await self.watch(f"resourceVersion={listed['metadata']['resourceVersion']}")
        await stream.wait(1)
        self.api.put(ingress("a", host="new.example"))
        self.api.remove("networking.k8s.io/v1", "Ingress", "shop", "b")
        self.api.put(ingress("other", namespace="elsewhere"))  # another namespace: not sent
        await stream.wait(3)
        self.assertEqual(stream.types(), ["ADDED", "MODIFIED", "DELETED"])
        modified = stream.events[1]["object"]
        self.assertEqual(modified["kind"], "Ingress")
        self.assertEqual(modified["spec"]["rules"][0]["host"], "new.example")
        self.assertEqual(modified["metadata"]["generation"], 2)
        versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in stream.events]
        self.assertEqual(versions, sorted(versions))

    async def test_without_version_starts_with_the_current_state(self) -> None:
        """A watch without resourceVersion starts with one synthetic ADDED per object."""
        self.api.put(ingress("a"))
        self.api.put(ingress("b"))
        stream = await self.watch("")
        await stream.wait(2)
        self.assertEqual([e["object"]["metadata"]["name"] for e in stream.events], ["a", "b"])

    async def test_bookmarks_and_timeout(self) -> None:
        """allowWatchBookmarks gets BOOKMARK events at the current version; timeoutSeconds ends the
        stream cleanly (a final chunk, not a reset)."""
        self.api.put(ingress("a"))
        stream = await self.watch("resourceVersion=0&allowWatchBookmarks=true&timeoutSeconds=0.2")
        await stream.wait(1)
        self.api.send_bookmarks()
        await stream.wait(2)
        bookmark = stream.events[1]
        self.assertEqual(bookmark["type"], "BOOKMARK")
        self.assertEqual(bookmark["object"]["metadata"], {"resourceVersion": str(self.api.store.rv)})
        await stream.done  # ends by itself: the timeout
        self.assertEqual(self.api.watches, [])

    async def test_no_bookmarks_unless_asked(self) -> None:
        """Without allowWatchBookmarks no BOOKMARK is sent."""
        stream = await self.watch("resourceVersion=0&timeoutSeconds=0.1")
        self.api.send_bookmarks()
        await stream.done
        self.assertEqual(stream.events, [])

    async def test_cut_mid_stream(self) -> None:
        """cut_watches() drops the connection: the client sees the body fail, not end."""
        stream = await self.watch("resourceVersion=0")
        self.api.put(ingress("a"))
        await stream.wait(1)
        self.api.cut_watches()
        failure = await self.assertFailure(stream.done, Exception)
        self.assertNotIsInstance(failure, ResponseDone)
        self.assertEqual(self.api.watches, [])

    async def test_compacted_version_is_an_error_event(self) -> None:
        """Watching from a compacted version: 200, one ERROR event with a 410 Status, then the end."""
        self.api.put(ingress("a"))
        old = self.api.store.rv
        self.api.put(ingress("b"))
        self.api.compact()
        stream = await self.watch(f"resourceVersion={old}")
        await stream.done
        [event] = stream.events
        self.assertEqual(event["type"], "ERROR")
        self.assertEqual((event["object"]["code"], event["object"]["reason"]), (410, "Expired"))


class AuthTests(KubeAPITestCase):
    """Bearer tokens: 401 without a known one, 403 for a verb the role lacks."""

    async def test_no_token_or_unknown_token(self) -> None:
        """No token, or an unknown or revoked one, is 401 Unauthorized."""
        self.assertEqual((await self.call("GET", INGRESSES, token=None))[0], 401)
        self.assertEqual((await self.call("GET", INGRESSES, token="nope"))[0], 401)
        self.api.revoke("reader")
        code, body = await self.call("GET", INGRESSES, token="reader")
        self.assertEqual((code, body["reason"]), (401, "Unauthorized"))
        self.api.set_token("rotated", ["list"])
        self.assertEqual((await self.call("GET", INGRESSES, token="rotated"))[0], 200)

    async def test_verb_the_role_lacks(self) -> None:
        """A reader may list and watch but not create or update status: 403 Forbidden."""
        self.assertEqual((await self.call("GET", INGRESSES, token="reader"))[0], 200)
        code, body = await self.call("POST", INGRESSES, ingress("a"), token="reader")
        self.assertEqual((code, body["reason"]), (403, "Forbidden"))
        self.assertEqual(self.api.store.objects, {})


class WriteTests(KubeAPITestCase):
    """create/update/patch/delete, the status subresource, optimistic concurrency, Leases."""

    async def test_status_subresource_with_optimistic_concurrency(self) -> None:
        """PUT .../status changes only status; a stale resourceVersion is 409 Conflict."""
        code, created = await self.call("POST", INGRESSES, ingress("a"))
        self.assertEqual(code, 201)
        self.assertEqual(created["status"], {})
        update = json.loads(json.dumps(created))
        update["status"] = {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}
        update["spec"]["ingressClassName"] = "sneaky"  # ignored by the status subresource
        code, updated = await self.call("PUT", f"{INGRESSES}/a/status", update)
        self.assertEqual(code, 200)
        self.assertEqual(updated["status"]["loadBalancer"]["ingress"], [{"ip": "192.0.2.1"}])
        self.assertEqual(updated["spec"]["ingressClassName"], "flexgw")
        self.assertEqual(updated["metadata"]["generation"], 1)
        code, body = await self.call("PUT", f"{INGRESSES}/a/status", update)  # stale version
        self.assertEqual((code, body["reason"]), (409, "Conflict"))
        spec_change = dict(updated, spec=dict(updated["spec"], ingressClassName="other"), status={})
        code, replaced = await self.call("PUT", f"{INGRESSES}/a", spec_change)
        self.assertEqual(code, 200)
        self.assertEqual(replaced["status"], updated["status"])  # the main resource keeps status
        self.assertEqual(replaced["metadata"]["generation"], 2)

    async def test_create_conflict_patch_delete_not_found(self) -> None:
        """Creating twice is 409 AlreadyExists; merge patch; delete; then 404."""
        await self.call("POST", INGRESSES, ingress("a"))
        code, body = await self.call("POST", INGRESSES, ingress("a"))
        self.assertEqual((code, body["reason"]), (409, "AlreadyExists"))
        code, patched = await self.call(
            "PATCH", f"{INGRESSES}/a", {"metadata": {"labels": {"team": "shop"}}},
            content_type="application/merge-patch+json",
        )
        self.assertEqual((code, patched["metadata"]["labels"]), (200, {"team": "shop"}))
        self.assertEqual((await self.call("DELETE", f"{INGRESSES}/a"))[0], 200)
        code, body = await self.call("GET", f"{INGRESSES}/a")
        self.assertEqual((code, body["reason"]), (404, "NotFound"))

    async def test_lease_taken_by_one_of_two_writers(self) -> None:
        """Two replicas updating one Lease from the same version: one wins, the other gets 409."""
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": "flexgw-leader"}, "spec": {"leaseDurationSeconds": 15}}
        code, created = await self.call("POST", LEASES, lease)
        self.assertEqual((code, created["metadata"]["namespace"]), (201, "flexgw"))
        claims = []
        for holder in ("replica-1", "replica-2"):
            claim = json.loads(json.dumps(created))
            claim["spec"]["holderIdentity"] = holder
            claims.append(await self.call("PUT", f"{LEASES}/flexgw-leader", claim))
        self.assertEqual([code for code, _ in claims], [200, 409])
        _, now = await self.call("GET", f"{LEASES}/flexgw-leader")
        self.assertEqual(now["spec"]["holderIdentity"], "replica-1")


KUBECTL = shutil.which("kubectl")


class KubectlTests(TestCase):
    """The real kubectl (Debian's kubernetes-client) against the server over TLS."""

    if KUBECTL is None:
        skip = "kubectl is not installed"

    def setUp(self) -> None:
        ca = CertificateAuthority()
        self.api = KubeAPI(reactor, tokens={"admin": None})
        self.api.listen(tls=ca.issue("127.0.0.1", ips=["127.0.0.1"]))
        self.addCleanup(self.api.stop)
        home = self.mktemp()
        os.makedirs(home)
        self.kubeconfig = os.path.join(home, "config")
        with open(self.kubeconfig, "w", encoding="utf-8") as handle:
            handle.write(self.api.kubeconfig("admin", ca.pem))
        self.env = {"KUBECONFIG": self.kubeconfig, "HOME": home, "PATH": os.environ.get("PATH", "")}

    def manifest(self, text: str) -> str:
        """Write `text` into a file for `kubectl -f`; returns its path."""
        path = os.path.join(os.path.dirname(self.kubeconfig), "input.yaml")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return path

    async def kubectl(self, *args: str) -> str:
        """Run kubectl; returns its stdout (fails the test on a non-zero exit)."""
        assert KUBECTL is not None
        out, err, code = await getProcessOutputAndValue(KUBECTL, args, env=self.env, reactor=reactor)
        self.assertEqual(code, 0, err.decode(errors="replace"))
        return out.decode()  # type: ignore[no-any-return]

    async def test_apply_then_get_as_a_list_flexgw_reads(self) -> None:
        """kubectl apply creates objects; `kubectl get ingress,svc -o yaml` prints a List that flexgw
        unwraps, and a bad field in it is located at its own line in kubectl's output."""
        service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "shop", "namespace": "shop"},
                   "spec": {"clusterIP": "127.0.0.1", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}
        bad = ingress("bad", host="Bad.Example")
        manifests = yaml.safe_dump_all([ingress("shop"), service, bad])
        out = await self.kubectl("apply", "--validate=false", "-f", self.manifest(manifests))
        self.assertIn("ingress.networking.k8s.io/shop created", out)
        out = await self.kubectl("get", "ingress,svc", "-n", "shop", "-o", "yaml")
        loaded = load_text(out, "cluster.yaml")
        self.assertEqual(loaded.problems, ())
        checked = [check_document(document, {}) for document in loaded.documents]
        self.assertEqual([str(c.id) for c in checked],
                         ["Ingress shop/bad", "Ingress shop/shop", "KubernetesService shop/shop"])
        [problem] = checked[0].problems
        line = out.splitlines()[problem.line - 1]  # type: ignore[operator]
        self.assertEqual(line[problem.column - 1:], "Bad.Example")  # type: ignore[operator]
        self.assertEqual(checked[1].problems, ())
