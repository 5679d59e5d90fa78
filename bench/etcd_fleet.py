"""A fleet following etcd: 1,000 ApiInstances applied in one transaction, the time from the commit to
every gateway serving them, and the gateways' memory, against one gateway reading the same
resources from a file in the same run.

Usage: python bench/etcd_fleet.py [--apis 1000] [--gateways 3] [--json out.json]

Starts a real etcd (`--max-txn-ops` raised: etcd allows 128 operations per transaction by
default), a recording upstream (in this process), `--gateways` `twistd flexgw --etcd` processes
(`FLEX_SYNC_DEBOUNCE_TIME=0s`) and, as the reference, one `twistd flexgw --conf DIR` process.
Once each etcd gateway reports under `<prefix>/gateways/`, one `/v3/kv/txn` puts `--apis`
ApiInstances (one listener, a base path each); the time to each gateway's "Configuration
generation N applied: <apis> API(s)" log line is taken from the moment the transaction was sent.
The same resources are then written as one file (renamed into the reference's directory) and timed
the same way. A request to the last API through the fleet and through the reference checks
they serve. VmRSS of every gateway is read after a quiet second.

All etcd gateways run on one host with `--reuse-port`, so they share the ApiInstances' address
(the kernel spreads connections over them). Figures are noisy on a shared machine: compare the
ratios, which are measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.protocol import ProcessProtocol

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # this tree's flexgw

from idle_rss import rss_kib  # (bench/idle_rss.py: VmRSS and VmHWM from /proc)
from run import HOST, free_port  # (bench/run.py)

from flexgw.config.sources.etcd_client import EtcdClient, Put
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream, fixed

REPO = Path(__file__).resolve().parent.parent
PREFIX = "/bench"
APPLIED = re.compile(rb"Configuration generation (\d+) applied: (\d+) API")


class Gateway(ProcessProtocol):
    """One `twistd flexgw` process: its log lines watched for "applied: N API(s)"."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.buffer = b""
        self.waiting: list[tuple[int, defer.Deferred[float]]] = []
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.tail = b""

    def outReceived(self, data: bytes) -> None:
        """Split lines; fire who waits for an API count when a reload reports it."""
        now = time.monotonic()
        self.tail = (self.tail + data)[-4000:]
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            found = APPLIED.search(line)
            if found is None:
                continue
            apis = int(found.group(2))
            for entry in list(self.waiting):
                if entry[0] == apis:
                    self.waiting.remove(entry)
                    entry[1].callback(now)

    errReceived = outReceived

    def applied(self, apis: int) -> defer.Deferred[float]:
        """Fires with the monotonic time of the next reload serving `apis` APIs."""
        d: defer.Deferred[float] = defer.Deferred()
        self.waiting.append((apis, d))
        return d

    def processEnded(self, reason: Any) -> None:
        """The process is gone."""
        for _, d in self.waiting:
            d.errback(RuntimeError(f"{self.name} exited: {self.tail[-1500:]!r}"))
        self.waiting = []
        self.ended.callback(None)


def spawn_gateway(reactor: Any, name: str, *options: str) -> tuple[Gateway, Any]:
    """`twistd flexgw OPTIONS` from this tree, immediate reloads, no access log or admin."""
    protocol = Gateway(name)
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
            "--pidfile=", "--logfile=-", "flexgw", "--access-log", "/dev/null", "--admin", "off",
            *options]
    env = dict(os.environ, PYTHONPATH=str(REPO), FLEX_SYNC_DEBOUNCE_TIME="0s")
    return protocol, reactor.spawnProcess(protocol, sys.executable, argv, env=env, path=str(REPO))


def api_documents(apis: int, port: int, upstream_port: int) -> list[tuple[str, bytes]]:
    """`apis` ApiInstances on one listener, base path /api-N, inline service: (key, YAML)."""
    return [
        (
            f"{PREFIX}/resources/gateway.mulesoft.com/ApiInstance/default/api-{n}",
            (
                "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: ApiInstance\n"
                f"metadata:\n  name: api-{n}\nspec:\n  address: http://{HOST}:{port}/api-{n}\n"
                f"  services:\n    up:\n      address: http://{HOST}:{upstream_port}\n"
            ).encode(),
        )
        for n in range(apis)
    ]


async def spawn_etcd(reactor: Any, tmp: Path, max_ops: int) -> tuple[str, Any, Gateway]:
    """A one-member etcd; (client URL, process, its output), once it serves clients."""
    client_url = f"http://{HOST}:{free_port()}"
    peer_url = f"http://{HOST}:{free_port()}"
    etcd = shutil.which("etcd")
    if etcd is None:
        raise SystemExit("etcd is not installed (apt-get install etcd-server)")
    output = Gateway("etcd")
    argv = [etcd, "--name", "b", "--data-dir", str(tmp / "etcd"), "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url, "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url, "--initial-cluster", f"b={peer_url}",
            "--max-txn-ops", str(max_ops), "--max-request-bytes", str(16 * 1024 * 1024),
            "--log-level", "warn"]
    process = reactor.spawnProcess(output, etcd, argv, env={"PATH": os.environ.get("PATH", "")})
    probe = EtcdClient(reactor, [client_url], timeout=1.0)
    for _ in range(100):
        try:
            await probe.range(b"/")
            return client_url, process, output
        except Exception:  # noqa: BLE001 - not up yet (a bounded wait)
            await task.deferLater(reactor, 0.1)
    raise SystemExit(f"etcd did not start: {output.tail[-1500:]!r}")


async def get_status(reactor: Any, port: int, path: str) -> int:
    """The status of one GET."""
    response = await client.request(
        reactor, HOST, port, f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    )
    return int(response.status)


async def main(reactor: Any, apis: int, gateways: int, out: str | None) -> None:
    """Run the whole measurement and print it."""
    tmp = Path(tempfile.mkdtemp(prefix="flexgw-etcd-bench-"))
    processes: list[Any] = []
    upstream = RecordingUpstream(fixed(200, body=b"ok\n"), reactor=reactor, retain_bodies=False)
    upstream.listen(reactor)
    try:
        url, etcd_process, _ = await spawn_etcd(reactor, tmp, apis + 10)
        processes.append(etcd_process)
        etcd = EtcdClient(reactor, [url], timeout=30.0)
        fleet: list[tuple[Gateway, Any]] = []
        for n in range(gateways):
            fleet.append(spawn_gateway(reactor, f"gw-{n}", "--etcd", url, "--etcd-prefix", PREFIX,
                                       "--gateway-id", f"gw-{n}", "--reuse-port"))
            processes.append(fleet[-1][1])
        conf = tmp / "conf"
        conf.mkdir()
        reference = spawn_gateway(reactor, "files", "--conf", str(conf))
        processes.append(reference[1])
        for _ in range(300):  # until every etcd gateway reports (bounded: 30 s)
            reported = await etcd.range_prefix(f"{PREFIX}/gateways/".encode())
            if len(reported.kvs) == gateways:
                break
            await task.deferLater(reactor, 0.1)
        else:
            raise SystemExit("the gateways did not report: " + fleet[0][0].tail[-1500:].decode())
        await task.deferLater(reactor, 1.0)  # the reference's watcher is up too
        rss_idle = [rss_kib(process.pid)["VmRSS"] for _, process in fleet]
        port, reference_port = free_port(), free_port()
        documents = api_documents(apis, port, upstream.address[1])
        waits = [gateway.applied(apis) for gateway, _ in fleet]
        sent = time.monotonic()
        result = await etcd.txn(success=[Put(key.encode(), value) for key, value in documents])
        committed = time.monotonic()
        times = [when - sent for when in await defer.gatherResults(waits)]
        etcd_status = await get_status(reactor, port, f"/api-{apis - 1}/x")
        text = "---\n".join(value.decode() for _, value in documents).replace(
            f":{port}/", f":{reference_port}/"
        )
        staged = tmp / "staged.yaml"
        staged.write_text(text)
        wait = reference[0].applied(apis)
        written = time.monotonic()
        os.replace(staged, conf / "apis.yaml")
        file_time = await wait - written
        file_status = await get_status(reactor, reference_port, f"/api-{apis - 1}/x")
        await task.deferLater(reactor, 1.0)  # settle (a benchmark, not a test)
        rss = [rss_kib(process.pid)["VmRSS"] for _, process in fleet]
        rss_reference = rss_kib(reference[1].pid)["VmRSS"]
        slowest = max(times)
        figures = {
            "apis": apis,
            "gateways": gateways,
            "txn_revision": result.revision,
            "txn_seconds": round(committed - sent, 4),
            "commit_to_each_gateway_seconds": [round(t, 4) for t in times],
            "commit_to_every_gateway_seconds": round(slowest, 4),
            "file_write_to_reference_seconds": round(file_time, 4),
            "every_gateway_over_file_ratio": round(slowest / file_time, 2),
            "status_through_etcd_gateway": etcd_status,
            "status_through_file_gateway": file_status,
            "gateway_rss_idle_kib": rss_idle,
            "gateway_rss_kib": rss,
            "reference_rss_kib": rss_reference,
            "gateway_over_reference_rss_ratio": round(max(rss) / rss_reference, 3),
        }
        print(json.dumps(figures, indent=1))
        if out:
            Path(out).write_text(json.dumps(figures, indent=1) + "\n")
    finally:
        for process in processes:
            try:
                process.signalProcess("KILL")
            except Exception:  # noqa: BLE001, S110 - already gone
                pass
        await upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--apis", type=int, default=1000)
    parser.add_argument("--gateways", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    options = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(
        main(reactor, options.apis, options.gateways, options.json)))
