"""The etcd config source: key layout and bad values in memory; gateways following a real etcd
(watch, transactions, compaction, outages, snapshot restart, auth and TLS, a three-member cluster)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from flexgw.config.pipeline import load_config
from flexgw.config.sources import CombinedSource
from flexgw.config.sources.etcd import (
    EtcdSource,
    EtcdWatcher,
    make_client,
    resource_key,
    value_unit,
)
from flexgw.config.sources.etcd_client import EtcdClient, EtcdUnavailable, Put
from flexgw.config.sources.files import FileSource
from flexgw.service.admin import status_json
from flexgw.service.gateway import GatewayService
from flexgw.service.metrics import make_registry, render
from flexgw.tap import Options, config_source
from flexgw.testing import client
from flexgw.testing.certs import CertificateAuthority
from flexgw.testing.upstream import RecordingUpstream
from tests.etcdserver import start_etcd
from tests.harness import api_document, free_port

PREFIX = "/fleet"
RES = "/fleet/resources/"
FLEX = "gateway.mulesoft.com"


def real_reactor() -> Any:
    """The reactor trial runs."""
    from twisted.internet import reactor

    return reactor


def api_key(name: str, namespace: str = "default") -> str:
    """The key of ApiInstance `name`."""
    return f"{RES}{FLEX}/ApiInstance/{namespace}/{name}"


def source_of(values: dict[str, str]) -> EtcdSource:
    """An EtcdSource holding `values` at revision 7, as if ranged (no etcd involved)."""
    source = EtcdSource(EtcdClient(None, ["http://127.0.0.1:1"], agent=object()), PREFIX)
    source.replace({k: v.encode() for k, v in values.items()}, 7)
    return source


class KeyLayoutTests(TestCase):
    """Keys and values: each problem located, with the key as the file."""

    def test_resource_key(self) -> None:
        """A document's key: group of its apiVersion, kind, namespace (default), name."""
        value = {"apiVersion": f"{FLEX}/v1alpha1", "kind": "apiinstance", "metadata": {"name": "a"}}
        self.assertEqual(resource_key("fleet/", value), api_key("a"))
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "n"}}
        self.assertEqual(resource_key("/fleet", secret), f"{RES}core/Secret/n/s")

    def test_bad_keys_and_values(self) -> None:
        """Outside the layout, an unknown kind, not YAML, not UTF-8, two documents, too large,
        a name that is not the key's: each a failed unit with a problem naming the key."""
        good = api_document(8080, 9000, "a")
        cases = {
            f"{RES}{FLEX}/ApiInstance/a": (good.encode(), "outside the layout"),
            f"{RES}{FLEX}/Widget/default/a": (good.encode(), "unknown kind"),
            api_key("a"): (b"kind: [unclosed\n", "YAML syntax error"),
            api_key("b"): (b"\xff\xfe", "not UTF-8"),
            api_key("c"): (b"a: 1\n---\nb: 2\n", "exactly one resource"),
            api_key("d"): (b"x" * 2048, "larger than 1024 bytes"),
        }
        for key, (value, message) in cases.items():
            unit = value_unit(RES, key, value, max_bytes=1024)
            self.assertTrue(unit.failed, key)
            self.assertEqual(unit.problems[0].file, key)
            self.assertIn(message, unit.problems[0].message)
        unit = value_unit(RES, api_key("other"), good.encode())
        self.assertTrue(unit.failed)
        self.assertEqual(
            str(unit.problems[0]).split(": ", 1)[0], f"{api_key('other')}:3:18"
        )  # metadata: {name: a} -> the name's value, in the value's own lines

    def test_json_value_and_namespace_from_key(self) -> None:
        """A JSON value is read as YAML is; a value without a namespace takes the key's."""
        value = {"apiVersion": f"{FLEX}/v1alpha1", "kind": "Service", "metadata": {"name": "s"},
                 "spec": {"address": "http://127.0.0.1:9000"}}
        unit = value_unit(RES, f"{RES}{FLEX}/Service/team/s", json.dumps(value).encode())
        self.assertFalse(unit.failed)
        self.assertEqual(unit.documents[0].value["metadata"]["namespace"], "team")

    def test_validation_error_located_in_value(self) -> None:
        """A schema error inside a value reads key:line:column, and the other keys still serve;
        the key that breaks later keeps its last good version."""
        port = free_port()
        source = source_of({
            api_key("good"): api_document(port, 9000, "good"),
            api_key("bad"): api_document(port, 9000, "bad").replace(
                f"address: http://127.0.0.1:{port}", "address: 42"
            ),
        })
        state = load_config(source, {})
        errors = [str(p) for p in state.errors]
        self.assertTrue(any(e.startswith(f"{api_key('bad')}:5:12: ") for e in errors), errors)
        self.assertEqual([a.key for lst in state.plan.listeners for a in lst.apis], ["default/good"])
        self.assertEqual(state.plan.problems[0].file, api_key("bad"))
        source.values[api_key("good")] = b"kind: [\n"
        later = load_config(source, {}, previous=state)
        self.assertEqual([a.key for lst in later.plan.listeners for a in lst.apis], ["default/good"])
        self.assertIn(api_key("good"), {p.file for p in later.errors})

    def test_combined_with_files(self) -> None:
        """--etcd with --conf: both sources' resources are served."""
        root = self.mktemp()
        os.makedirs(root)
        with open(os.path.join(root, "a.yaml"), "w") as handle:
            handle.write(api_document(free_port(), 9001, "a") + "---\n" + api_document(free_port(), 9002, "f"))
        source = CombinedSource([("files", FileSource([root])),
                                 ("etcd", source_of({api_key("a"): api_document(free_port(), 9000, "a")}))])
        state = load_config(source, {})
        served = sorted(a.key for lst in state.plan.listeners for a in lst.apis)
        self.assertEqual(served, ["default/a", "default/f"])
        self.assertEqual([p.file for p in state.problems], [api_key("a")])  # defined twice


class OptionsTests(TestCase):
    """`twistd flexgw --etcd ...`: checked options, and the source they make."""

    def test_options(self) -> None:
        """URLs split, the password read from its file, --conf optional and combinable; bad
        combinations are usage errors."""
        from twisted.python.usage import UsageError

        secret = self.mktemp()
        with open(secret, "w") as handle:
            handle.write("pw\n")
        options = Options()
        options.parseOptions(["--etcd", "http://127.0.0.1:1, http://127.0.0.1:2", "--etcd-user", "u",
                              "--etcd-password-file", secret, "--etcd-prefix", "p/"])
        self.assertEqual(options["etcd"], ["http://127.0.0.1:1", "http://127.0.0.1:2"])
        self.assertEqual(options["conf"], [])
        source, etcd = config_source(None, options)
        self.assertIs(source, etcd)
        self.assertIsInstance(source, EtcdSource)
        self.assertEqual((source.prefix, source.client.password), ("/p", "pw"))
        root = self.mktemp()
        os.makedirs(root)
        options = Options()
        options.parseOptions(["--etcd", "http://127.0.0.1:1", "--conf", root])
        self.assertIsInstance(config_source(None, options)[0], CombinedSource)
        for bad in (["--etcd", "127.0.0.1:2379"], ["--etcd-user", "u"],
                    ["--etcd", "http://h:1", "--etcd-cert", secret]):
            with self.assertRaises(UsageError):
                Options().parseOptions(bad)


class EtcdGateway:
    """A GatewayService serving an EtcdSource, its watcher on, each reload recorded."""

    def __init__(self, case: TestCase, source: EtcdSource, debounce: float = 0.0) -> None:
        self.case = case
        self.source = source
        self.service = GatewayService(real_reactor(), source, {}, access_log=None)
        self.seen: list[frozenset[str]] = []  # the keys each reload read
        self.waiters: list[tuple[Callable[[], bool], defer.Deferred[None]]] = []
        self.watcher: EtcdWatcher = source.watcher(
            real_reactor(), self.reload, debounce, retry_initial=0.05, retry_max=0.2
        )

    def reload(self) -> None:
        """Reload, then wake whoever waits for what it shows."""
        self.seen.append(frozenset(self.source.values))
        self.service.reload()
        for entry in list(self.waiters):
            if entry[0]():
                self.waiters.remove(entry)
                entry[1].callback(None)

    def start(self) -> EtcdGateway:
        """Serve (what the snapshot holds, if any) and follow etcd; stopped at the test's end."""
        self.service.startService()
        self.watcher.start()
        self.case.addCleanup(self.stop)
        return self

    def stop(self) -> defer.Deferred[Any]:
        """Stop following etcd and serving."""
        self.watcher.stop()
        return defer.maybeDeferred(self.service.stopService)

    def until(self, check: Callable[[], bool]) -> defer.Deferred[None]:
        """Fires once `check()` holds after a reload (now, if it holds)."""
        if check():
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self.waiters.append((check, d))
        return d.addTimeout(15, real_reactor())

    def transition(self, at: float = 1000.0) -> defer.Deferred[None]:
        """Fires at the source's next connected/disconnected change, which is dated `at`
        (SourceStatus reads its wall clock only on a change)."""
        changed: defer.Deferred[None] = defer.Deferred()

        def wall() -> float:
            if not changed.called:
                real_reactor().callLater(0, changed.callback, None)
            return at

        self.source.status.wall = wall
        return changed.addTimeout(15, real_reactor())

    def serves(self, name: str) -> bool:
        """Whether ApiInstance `name` is in the plan."""
        return any(a.key == f"default/{name}" for lst in self.service.plan.listeners for a in lst.apis)

    def status(self) -> dict[str, Any]:
        """The etcd entry of /status."""
        return dict(status_json(self.service)["sources"][0])


class EtcdTestCase(TestCase):
    """A recording upstream and helpers; every test starts its own etcd."""

    timeout = 60

    def setUp(self) -> None:
        self.upstream = RecordingUpstream(reactor=real_reactor())
        self.upstream.listen(real_reactor())
        self.addCleanup(self.upstream.stop)

    def api(self, port: int, name: str) -> bytes:
        """An ApiInstance on `port` proxying to the recording upstream."""
        return api_document(port, self.upstream.address[1], name).encode()

    def gateway(self, urls: list[str], state_dir: str | None = None, **client: Any) -> EtcdGateway:
        """A started gateway following `urls`."""
        etcd = EtcdClient(real_reactor(), urls, timeout=client.pop("timeout", 2.0), **client)
        return EtcdGateway(self, EtcdSource(etcd, PREFIX, state_dir=state_dir)).start()

    async def get(self, port: int) -> int:
        """The status of one GET through the gateway."""
        response = await client.request(
            real_reactor(), "127.0.0.1", port, b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        return int(response.status)


class FollowTests(EtcdTestCase):
    """One etcd, gateways following it."""

    async def serving_a(
        self, state_dir: str | None = None
    ) -> tuple[Any, EtcdClient, EtcdGateway, int, int]:
        """An etcd holding ApiInstance a, a gateway serving it: (etcd, a client writing to it,
        the gateway, a's port, a free port for a later API)."""
        etcd = await start_etcd(self, real_reactor())
        writer = EtcdClient(real_reactor(), etcd.urls)
        port, later = free_port(), free_port()
        written = await writer.put(api_key("a").encode(), self.api(port, "a"))
        gateway = self.gateway(etcd.urls, state_dir=state_dir)
        await gateway.until(lambda: gateway.serves("a"))
        self.written = written.revision
        return etcd, writer, gateway, port, later

    async def test_apply_watch_delete_and_whole_transactions(self) -> None:
        """A put is served, a delete stops it; a transaction of several keys is seen whole (never
        half) by two gateways; a bad value is reported and changes nothing else."""
        etcd = await start_etcd(self, real_reactor())
        writer = EtcdClient(real_reactor(), etcd.urls)
        port = free_port()
        await writer.put(api_key("one").encode(), self.api(port, "one"))
        first, second = self.gateway(etcd.urls), self.gateway(etcd.urls)
        await first.until(lambda: first.serves("one"))
        self.assertEqual(await self.get(port), 200)
        self.assertTrue(first.status()["connected"])
        ports = [free_port() for _ in range(5)]
        names = [f"t{n}" for n in range(5)]
        await writer.txn(success=[Put(api_key(n).encode(), self.api(p, n)) for n, p in zip(names, ports)])
        for gateway in (first, second):
            await gateway.until(lambda g=gateway: all(g.serves(n) for n in names))
            whole = {api_key(n) for n in names}
            for keys in gateway.seen:
                self.assertIn(len(whole & keys), (0, len(whole)))  # all or nothing
        self.assertEqual(await self.get(ports[3]), 200)
        await writer.put(api_key("broken").encode(), b"spec: [\n")
        await writer.delete(api_key("one").encode())
        await first.until(lambda: not first.serves("one"))
        self.assertTrue(all(first.serves(n) for n in names))
        self.assertIn(api_key("broken"), {p.file for p in first.service.state.errors})

    async def test_compaction_ranges_again(self) -> None:
        """A watch resumed from a compacted revision ranges the prefix again and serves what
        etcd holds, deletes made meanwhile included."""
        _etcd, writer, gateway, _port, later = await self.serving_a()
        gateway.watcher.stop()  # the gateway stops following for a while
        await writer.delete(api_key("a").encode())
        done = await writer.put(api_key("b").encode(), self.api(later, "b"))
        await writer.compact(done.revision)
        gateway.watcher = gateway.source.watcher(real_reactor(), gateway.reload, 0.0)
        gateway.watcher.start()
        await gateway.until(lambda: gateway.serves("b") and not gateway.serves("a"))
        self.assertEqual(gateway.watcher.ranges, 1)
        self.assertEqual(gateway.source.status.counts.get("compactions"), 1)
        self.assertEqual(await self.get(later), 200)

    async def test_outage_then_changes(self) -> None:
        """etcd killed: the gateway keeps serving and says it is disconnected, since when;
        etcd back with changes made on it: the gateway catches up and says it is connected."""
        etcd, writer, gateway, port, later = await self.serving_a()
        disconnected = gateway.transition(at=1000.0)
        await etcd.members[0].kill()
        await disconnected
        self.assertEqual(await self.get(port), 200)
        status = gateway.status()
        self.assertFalse(status["connected"])
        self.assertEqual(status["sinceSeconds"], 1000.0)
        metrics = render(make_registry(gateway.service)).decode()
        self.assertIn(f'flexgw_config_source_connected{{source="etcd {etcd.url}"}} 0.0', metrics)
        self.assertIn(f'flexgw_config_source_state_since_timestamp_seconds{{source="etcd {etcd.url}"}} 1000.0', metrics)
        await etcd.members[0].spawn(real_reactor(), f"m0={etcd.members[0].peer_url}")
        await writer.put(api_key("b").encode(), self.api(later, "b"))
        await writer.delete(api_key("a").encode())
        await gateway.until(lambda: gateway.serves("b") and not gateway.serves("a"))
        self.assertTrue(gateway.status()["connected"])
        self.assertEqual(await self.get(later), 200)

    async def test_restart_from_snapshot_while_etcd_is_down(self) -> None:
        """A gateway with --state-dir writes the applied keys and revision; a new gateway
        started while etcd is down serves them, then resumes the watch from that revision
        (no range) and applies what changed after the snapshot was written."""
        state_dir = self.mktemp()
        etcd, writer, first, port, later = await self.serving_a(state_dir)
        await first.stop()
        await writer.put(api_key("b").encode(), self.api(later, "b"))  # after the snapshot
        await etcd.members[0].kill()
        second = self.gateway(etcd.urls, state_dir=state_dir)
        self.assertTrue(second.serves("a"))  # at start, from the snapshot
        self.assertFalse(second.serves("b"))
        self.assertEqual(second.source.applied_revision, self.written)
        self.assertEqual(await self.get(port), 200)
        status = second.status()
        self.assertFalse(status["connected"])
        self.assertIn(f"revision {self.written}", status["fromSnapshot"])
        await etcd.members[0].spawn(real_reactor(), f"m0={etcd.members[0].peer_url}")
        await second.until(lambda: second.serves("b"))
        self.assertEqual(second.watcher.ranges, 0)  # resumed from the snapshot's revision
        self.assertTrue(second.serves("a"))
        self.assertEqual(await self.get(later), 200)


class SecureEtcdTests(EtcdTestCase):
    """etcd over https with client certificates and password authentication."""

    async def test_tls_and_auth(self) -> None:
        """make_client with --etcd-cacert/--etcd-cert/--etcd-key and a user: the source follows."""
        ca = CertificateAuthority()
        directory = self.mktemp()
        server_crt, server_key = ca.issue(
            "127.0.0.1", ips=["127.0.0.1"], server_and_client=True
        ).write(directory, "server")
        client_crt, client_key = ca.issue("", client=True).write(directory, "client")
        cacert = ca.write(directory)
        etcd = await start_etcd(self, real_reactor(), extra=(
            "--cert-file", server_crt, "--key-file", server_key,
            "--trusted-ca-file", cacert, "--client-cert-auth",
        ))
        files = {"cacert": cacert, "cert": client_crt, "key": client_key}
        admin = make_client(real_reactor(), etcd.urls, **files)
        await admin.call("/v3/auth/role/add", {"name": "root"})
        await admin.call("/v3/auth/user/add", {"name": "root", "password": "s3cret"})
        await admin.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        await admin.call("/v3/auth/enable", {})
        writer = make_client(real_reactor(), etcd.urls, user="root", password="s3cret", **files)
        port = free_port()
        await writer.put(api_key("a").encode(), self.api(port, "a"))
        source = EtcdSource(
            make_client(real_reactor(), etcd.urls, user="root", password="s3cret", **files), PREFIX
        )
        gateway = EtcdGateway(self, source).start()
        await gateway.until(lambda: gateway.serves("a"))
        self.assertEqual(await self.get(port), 200)


class ClusterTests(EtcdTestCase):
    """A three-member cluster with the member the gateway watches killed."""

    async def test_member_killed_no_change_missed(self) -> None:
        """The watch moves to the next member; every change made before, around and after the
        kill is applied."""
        cluster = await start_etcd(self, real_reactor(), size=3)
        writer = EtcdClient(real_reactor(), list(reversed(cluster.urls)), timeout=3.0)
        gateway = self.gateway(cluster.urls, timeout=3.0)
        ports = [free_port() for _ in range(4)]
        await writer.put(api_key("a0").encode(), self.api(ports[0], "a0"))
        await gateway.until(lambda: gateway.serves("a0"))
        await writer.put(api_key("a1").encode(), self.api(ports[1], "a1"))
        await gateway.until(lambda: gateway.serves("a1"))  # seen by the watch
        self.assertEqual(gateway.watcher.endpoint, cluster.urls[0])
        await cluster.kill(0)
        # The test's own writes wait out the election that may follow (on a loaded machine
        # longer than the writer's timeout on both remaining members): what is under test is
        # the gateway's watch, not the writer. Each write is idempotent, so one that timed
        # out after etcd applied it may be repeated.
        for write in (
            lambda: writer.put(api_key("a2").encode(), self.api(ports[2], "a2")),
            lambda: writer.delete(api_key("a0").encode()),
            lambda: writer.put(api_key("a3").encode(), self.api(ports[3], "a3")),
        ):
            for attempt in range(10):
                try:
                    await write()
                    break
                except EtcdUnavailable:
                    if attempt == 9:
                        raise
        await gateway.until(
            lambda: all(gateway.serves(f"a{n}") for n in (1, 2, 3)) and not gateway.serves("a0")
        )
        self.assertNotEqual(gateway.watcher.endpoint, cluster.urls[0])
        self.assertEqual(gateway.watcher.ranges, 1)  # resumed, not ranged again
        self.assertEqual(await self.get(ports[3]), 200)

    async def test_member_down_changes_meanwhile(self) -> None:
        """A gateway that knows one member only: while that member is down it says so and keeps
        serving; changes made meanwhile on the other members are applied once it is back."""
        cluster = await start_etcd(self, real_reactor(), size=3)
        writer = EtcdClient(real_reactor(), cluster.urls[1:], timeout=3.0)
        gateway = self.gateway(cluster.urls[:1], timeout=3.0)
        port, later = free_port(), free_port()
        await writer.put(api_key("a").encode(), self.api(port, "a"))
        await gateway.until(lambda: gateway.serves("a"))
        disconnected = gateway.transition()
        await cluster.kill(0)
        await disconnected
        await writer.put(api_key("b").encode(), self.api(later, "b"))  # while it is away
        await writer.delete(api_key("a").encode())
        self.assertTrue(gateway.serves("a"))
        self.assertEqual(await self.get(port), 200)
        self.assertFalse(gateway.status()["connected"])
        member = cluster.members[0]
        await member.spawn(real_reactor(), ",".join(f"{m.name}={m.peer_url}" for m in cluster.members))
        await gateway.until(lambda: gateway.serves("b") and not gateway.serves("a"))
        self.assertTrue(gateway.status()["connected"])
        self.assertEqual(await self.get(later), 200)
