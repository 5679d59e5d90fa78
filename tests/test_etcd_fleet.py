"""`flexgw apply|diff|get|delete|fleet --etcd` against a real etcd, and the fleet keys gateways
keep under a lease."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue

import flexgw
from flexgw.cli import _parser, etcd_command
from flexgw.config.sources.etcd_client import EtcdClient
from flexgw.service.fleet import FleetReporter
from tests.conftools import api, route, service, update_conf, write_conf
from tests.etcdserver import start_etcd
from tests.harness import PROCESS_TEST_TIMEOUT, free_port
from tests.test_etcd_source import PREFIX, RES, EtcdGateway, EtcdTestCase, api_key, real_reactor
from tests.test_sigterm import start_twistd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SVC = f"{RES}gateway.mulesoft.com/Service/default/s"
ROUTE = f"{RES}gateway.mulesoft.com/PolicyBinding/default/r"


async def etcd_cli(etcd_url: str, *argv: str) -> tuple[int, str]:
    """Run one `flexgw` etcd command against `etcd_url` under PREFIX; (status, output)."""
    args = _parser().parse_args([argv[0], "--etcd", etcd_url, "--etcd-prefix", PREFIX, *argv[1:]])
    out = io.StringIO()
    status = await etcd_command(real_reactor(), args, out, {})
    return status, out.getvalue()


class CommandTests(EtcdTestCase):
    """The etcd commands, one etcd."""

    async def test_apply_diff_get_delete(self) -> None:
        """diff lists what apply writes; apply writes it in one transaction; a bad file writes
        nothing and says file:line:column; --prune deletes what the files lack; get and delete."""
        etcd = await start_etcd(self, real_reactor())
        url = etcd.url
        reader = EtcdClient(real_reactor(), etcd.urls)
        port = free_port()
        root = write_conf(self, {
            "a.yaml": api("a", f"http://127.0.0.1:{port}") + "---\n" + service("s", "http://127.0.0.1:9000")
            + "---\n" + route("r", "a", "s"),
        })
        status, out = await etcd_cli(url, "diff", root)
        self.assertEqual(status, 1)
        self.assertIn(f"+++ {api_key('a')} ({root})", out)
        self.assertIn("3 change(s); 0 error(s)", out)
        status, out = await etcd_cli(url, "apply", root)
        self.assertEqual(status, 0, out)
        stored = await reader.range_prefix(RES.encode())
        self.assertEqual(sorted(kv.key.decode() for kv in stored.kvs), sorted([api_key("a"), SVC, ROUTE]))
        self.assertEqual({kv.mod_revision for kv in stored.kvs}, {stored.revision})  # one txn
        self.assertIn(f"applied 3 change(s) in one transaction at revision {stored.revision}", out)
        self.assertEqual(await etcd_cli(url, "apply", root), (0, "no changes\n"))
        update_conf(root, {"a.yaml": None, "b.yaml": service("s", "http://127.0.0.1:99999")})
        status, out = await etcd_cli(url, "apply", "--prune", root)
        self.assertEqual(status, 1)
        self.assertIn(f"{root}/b.yaml:6:12: error: Service default/s: spec.address: port 99999", out)
        self.assertIn("nothing written to etcd", out)
        self.assertEqual((await reader.range_prefix(RES.encode())).revision, stored.revision)
        update_conf(root, {"b.yaml": service("s", "http://127.0.0.1:9001")
                           + "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: Widget\nmetadata: {name: w}\n"})
        status, out = await etcd_cli(url, "apply", root)
        self.assertEqual(status, 1)
        self.assertIn(f"{root}/b.yaml:9:7: error: cannot be stored in etcd: unknown kind", out)
        update_conf(root, {"b.yaml": service("s", "http://127.0.0.1:9001")})
        status, out = await etcd_cli(url, "diff", "--prune", root)
        self.assertEqual(status, 1)
        self.assertIn("-  address: http://127.0.0.1:9000\n+  address: http://127.0.0.1:9001\n", out)
        status, out = await etcd_cli(url, "apply", "--prune", root)
        self.assertEqual(status, 0, out)
        self.assertIn(f"delete {api_key('a')}", out)
        self.assertIn(f"update {SVC}", out)
        status, out = await etcd_cli(url, "get")
        self.assertEqual(status, 0)
        self.assertIn(f"# {SVC} (revision ", out)
        self.assertIn("address: http://127.0.0.1:9001", out)
        status, out = await etcd_cli(url, "delete", root)
        self.assertEqual((status, out.splitlines()[0]), (0, f"delete {SVC}"))
        self.assertEqual((await reader.range_prefix(RES.encode())).kvs, ())

    async def test_command_line(self) -> None:
        """The installed `flexgw apply` runs on its own reactor and exits with its status."""
        etcd = await start_etcd(self, real_reactor())
        root = write_conf(self, {"a.yaml": service("s", "http://127.0.0.1:9000")})
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "flexgw.cli", "apply", "--etcd", etcd.url, "--etcd-prefix", PREFIX, root],
            env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": ROOT},
            reactor=real_reactor(),
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"create " + SVC.encode(), out)


class FleetTests(EtcdTestCase):
    """Gateways reporting under `<prefix>/gateways/`, and `flexgw fleet`."""

    def reporter(self, gateway: EtcdGateway, name: str) -> FleetReporter:
        """A started FleetReporter for `gateway`."""
        reporter = FleetReporter(real_reactor(), gateway.source.client, PREFIX, name, gateway.service,
                                 gateway.source, ttl=5, check_interval=0.05)
        reporter.startService()
        self.addCleanup(reporter.stopService)
        return reporter

    def written(self, reporter: FleetReporter, check: Callable[[dict[str, Any]], bool]) -> defer.Deferred[None]:
        """Fires once the reporter has written a status for which `check` holds."""
        if reporter.written is not None and check(reporter.written):
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()

        def observe(status: dict[str, Any]) -> None:
            if check(status) and not d.called:
                reporter.observers.remove(observe)
                d.callback(None)

        reporter.observers.append(observe)
        return d.addTimeout(15, real_reactor())

    async def fleet(self, url: str) -> str:
        """The `flexgw fleet` table."""
        status, out = await etcd_cli(url, "fleet")
        self.assertEqual(status, 0)
        return out

    async def test_fleet_table(self) -> None:
        """Two gateways: both up to date; one stops following and shows behind; a bad value
        shows as an error; a stopped gateway's key goes with its lease."""
        etcd = await start_etcd(self, real_reactor())
        writer = EtcdClient(real_reactor(), etcd.urls)
        first, second = self.gateway(etcd.urls), self.gateway(etcd.urls)
        done = await writer.put(api_key("a").encode(), self.api(free_port(), "a"))
        one, two = self.reporter(first, "gw-one"), self.reporter(second, "gw-two")
        for reporter in (one, two):
            await self.written(reporter, lambda s: s["revision"] == done.revision)
        table = await self.fleet(etcd.url)
        lines = table.splitlines()
        self.assertEqual(lines[0].split(), ["GATEWAY", "VERSION", "REVISION", "GENERATION", "READY",
                                            "ETCD", "ERRORS", "STATE"])
        self.assertEqual(lines[1].split()[:3], ["gw-one", flexgw.__version__, str(done.revision)])
        self.assertTrue(lines[2].startswith("gw-two") and lines[2].endswith("up to date"), table)
        # both serve the same address in one process: the second could not bind it
        self.assertIn(": not ready: 1 listener(s) could not be bound", table)
        root = write_conf(self, {"s.yaml": service("s", "http://127.0.0.1:9000")})
        status, out = await etcd_cli(etcd.url, "apply", "--wait", "60", root)
        self.assertEqual(status, 0, out)
        self.assertIn("every gateway (2) applied it in ", out)
        second.watcher.stop()
        update_conf(root, {"s.yaml": service("s", "http://127.0.0.1:9001")})
        status, out = await etcd_cli(etcd.url, "apply", "--wait", "0.5", root)
        self.assertEqual(status, 1, out)
        self.assertRegex(out, r"after 0.5s, behind: gw-two \(revision \d+\)")
        bad = await writer.put(api_key("b").encode(), self.api(free_port(), "b").replace(b"http://127", b"ftp://127", 1))
        await self.written(one, lambda s: s["revision"] == bad.revision and s["errors"] == 1)
        table = await self.fleet(etcd.url)
        behind = next(line for line in table.splitlines() if line.startswith("gw-two"))
        self.assertIn(f"behind (latest {bad.revision})", behind)
        self.assertIn(f"  gw-one: {api_key('b')}:5:12: error:", table)
        await two.stopService()
        table = await self.fleet(etcd.url)
        self.assertNotIn("gw-two", table)
        stored = json.loads((await writer.range(f"{PREFIX}/gateways/gw-one".encode())).kvs[0].value)
        self.assertEqual((stored["generation"], stored["connected"]), (first.service.plan.generation, True))


async def fleet_until(
    client: EtcdClient, check: Callable[[dict[str, dict[str, Any]]], bool]
) -> dict[str, dict[str, Any]]:
    """The fleet keys (name -> status) once `check` holds for them, followed with a watch."""
    prefix = f"{PREFIX}/gateways/".encode()
    found = await client.range_prefix(prefix)
    fleet = {kv.key.decode().rsplit("/", 1)[-1]: json.loads(kv.value) for kv in found.kvs}
    if check(fleet):
        return fleet
    done: defer.Deferred[dict[str, dict[str, Any]]] = defer.Deferred()

    def events(batch: list[Any], revision: int) -> None:
        for event in batch:
            name = event.kv.key.decode().rsplit("/", 1)[-1]
            if event.type == "DELETE":
                fleet.pop(name, None)
            else:
                fleet[name] = json.loads(event.kv.value)
        if check(fleet) and not done.called:
            done.callback(fleet)

    watch = await client.watch_prefix(prefix, events, start_revision=found.revision + 1)
    try:
        return await done.addTimeout(30, real_reactor())
    finally:
        watch.cancel()


class WorkersTests(EtcdTestCase):
    """`twistd flexgw --workers 2 --etcd`: every worker follows etcd and reports itself."""

    timeout = PROCESS_TEST_TIMEOUT  # (a hang guard: tests.harness)

    async def test_workers_follow_etcd(self) -> None:
        """Two workers report <id>-w0 and <id>-w1; a put is applied by both and served."""
        etcd = await start_etcd(self, real_reactor())
        client = EtcdClient(real_reactor(), etcd.urls)
        directory = tempfile.mkdtemp(prefix="flexgw-etcdw-")  # short: AF_UNIX path limit
        self.addCleanup(shutil.rmtree, directory, True)
        conf = os.path.join(directory, "conf")
        os.makedirs(conf)
        started = await start_twistd(self, directory, conf, "--workers", "2", "--etcd", etcd.url,
                                     "--etcd-prefix", PREFIX, "--gateway-id", "g")


        def stop() -> defer.Deferred[Any]:
            """SIGTERM: the supervisor stops its workers (their leases revoked)."""
            if not started.process.ended.called:
                started.transport.signalProcess("TERM")
            return started.process.ended

        self.addCleanup(stop)
        await fleet_until(client, lambda fleet: {"g-w0", "g-w1"} <= set(fleet))
        port = free_port()
        written = await client.put(api_key("a").encode(), self.api(port, "a"))
        fleet = await fleet_until(client, lambda fleet: all(
            fleet.get(name, {}).get("revision", 0) >= written.revision for name in ("g-w0", "g-w1")))
        self.assertTrue(all(fleet[name]["ready"] for name in ("g-w0", "g-w1")), fleet)
        self.assertEqual(await self.get(port), 200)
