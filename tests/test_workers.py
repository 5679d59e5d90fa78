"""`twistd flexgw --workers 2` for real: a supervisor and two worker processes on loopback,
watched through a fake systemd notify socket and the supervisor's admin listener."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, protocol, reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SkipTest, TestCase

from flexgw.service.workers import (
    BACKOFF_MAX,
    HEALTHY_SECONDS,
    SupervisorService,
    WorkerSlot,
    worker_count,
)
from flexgw.tap import Options, worker_command
from flexgw.testing import client
from flexgw.testing.certs import CertificateAuthority, client_options
from flexgw.testing.client import IncompleteResponse, ResponseParseError
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import PROCESS_TEST_TIMEOUT, api_document, free_port
from tests.redisserver import RedisServer
from tests.test_ingress_upstream import Held
from tests.test_sigterm import ROOT, Process
from tests.test_socket_activation import ActivateProcess

HEADER = "apiVersion: gateway.mulesoft.com/v1alpha1\n"


def read_lines(path: str) -> list[str]:
    """The lines of a (small, local) file."""
    with open(path, encoding="utf-8") as handle:
        return handle.read().splitlines()


def get(path: str) -> bytes:
    """A GET for `path` on a connection of its own (closed after the response)."""
    return f"GET {path} HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n".encode()


def rate_limit(api: str, maximum: int) -> str:
    """A rate-limiting-flex binding: `maximum` requests per hour on ApiInstance `api`."""
    return (
        f"---\n{HEADER}kind: PolicyBinding\nmetadata: {{name: quota}}\n"
        f"spec:\n  targetRef: {{kind: ApiInstance, name: {api}}}\n"
        "  policyRef: {name: rate-limiting-flex}\n"
        f"  config: {{rateLimits: [{{maximumRequests: {maximum}, timePeriodInMilliseconds: 3600000}}]}}\n"
    )


class PidExit:
    """`done` fires when process `pid` (not necessarily our child) exits: its pidfd becomes
    readable (Linux 5.3+)."""

    def __init__(self, pid: int) -> None:
        self.done: defer.Deferred[None] = defer.Deferred()
        self.fd = os.pidfd_open(pid)
        reactor.addReader(self)

    def fileno(self) -> int:
        """The pidfd."""
        return self.fd

    def doRead(self) -> None:
        """The process has exited."""
        reactor.removeReader(self)
        os.close(self.fd)
        self.done.callback(None)

    def connectionLost(self, reason: Any) -> None:
        """Unused (the reader is removed once it fires)."""

    def logPrefix(self) -> str:
        """For Twisted's log."""
        return "PidExit"


class WaitOutput:
    """`done` fires once `process.output` holds `needle` `count` times (checked as it grows)."""

    def __init__(self, process: Process, needle: bytes, count: int) -> None:
        self.done: defer.Deferred[None] = defer.Deferred()
        received = process.outReceived

        def watch(data: bytes) -> None:
            received(data)
            if not self.done.called and process.output.count(needle) >= count:
                self.done.callback(None)

        process.outReceived = watch  # type: ignore[method-assign]
        process.errReceived = watch  # type: ignore[method-assign]


class Notifications(protocol.DatagramProtocol):
    """The sd_notify datagrams, in order; `wait(line, after)` for one that has `line`."""

    def __init__(self) -> None:
        self.messages: list[list[str]] = []
        self._waiters: list[tuple[Any, int, defer.Deferred[int]]] = []

    def datagramReceived(self, data: bytes, addr: Any = None) -> None:
        """One message."""
        self.messages.append(data.decode().splitlines())
        index = len(self.messages) - 1
        for entry in list(self._waiters):
            if entry[1] <= index and entry[0](self.messages[index]):
                self._waiters.remove(entry)
                entry[2].callback(index)

    def wait(self, line: str, after: int = 0, prefix: bool = False) -> defer.Deferred[int]:
        """The index of the first message at or after `after` holding `line` (or a line
        starting with it, with `prefix`)."""

        def matches(lines: list[str]) -> bool:
            return any(x.startswith(line) if prefix else x == line for x in lines)

        for index in range(after, len(self.messages)):
            if matches(self.messages[index]):
                return defer.succeed(index)
        d: defer.Deferred[int] = defer.Deferred()
        self._waiters.append((matches, after, d))
        return d


class WorkersTests(TestCase):
    """The supervisor and its workers, as separate processes."""

    # A hang guard, not a bound on the behaviour (the tests wait for events: sd_notify
    # messages, /metrics): a test starts three Python processes (supervisor and two workers)
    # or more (a restarted worker), each about 1.3 s of CPU to start; at a load average of
    # 15-20 on two cores one start took over 5 s of wall time, and 45 s was overrun.
    timeout = PROCESS_TEST_TIMEOUT

    async def start(
        self,
        documents: str = "",
        responder: Any = None,
        drain_seconds: float = 20,
        workers: int = 2,
        activate: str | None = None,
        access_log: str = "off",
        debounce: str = "3600s",
        extra: tuple[str, ...] = (),
        api: Any = api_document,
    ) -> None:
        """An upstream, and `twistd flexgw --workers N` in front of it; waits for READY=1."""
        self.upstream = RecordingUpstream(responder, reactor=reactor) if responder else RecordingUpstream(reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.directory = tempfile.mkdtemp(prefix="flexgw-wk-")  # short: AF_UNIX path limit
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.port = free_port()
        self.admin = free_port()
        self.conf = os.path.join(self.directory, "conf")
        os.makedirs(self.conf)
        self.write_conf(api(self.port, self.upstream.address[1]) + documents)
        self.notes = Notifications()
        notify = os.path.join(self.directory, "notify")
        listening = reactor.listenUNIXDatagram(notify, self.notes)
        self.addCleanup(listening.stopListening)
        env = dict(os.environ)
        env.update(PYTHONPATH=ROOT, NOTIFY_SOCKET=notify, FLEX_SYNC_DEBOUNCE_TIME=debounce)
        for name in ("WATCHDOG_USEC", "LISTEN_FDS", "LISTEN_PID", "FLEXGW_WORKER"):
            env.pop(name, None)
        self.worker_fds: dict[int, int] = {}  # pid -> pidfd of every worker seen
        self.process = Process() if activate is None else ActivateProcess()
        args = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", "--logfile=-", "flexgw", "--conf", self.conf,
            "--access-log", access_log, "--drain-seconds", str(drain_seconds),
            "--workers", str(workers), "--admin", f"tcp:{self.admin}:interface=127.0.0.1", *extra,
        ]
        executable = sys.executable
        if activate is not None:  # systemd-socket-activate binds the port and passes it on
            passed = ("PYTHONPATH", "NOTIFY_SOCKET", "FLEX_SYNC_DEBOUNCE_TIME")
            args = [
                activate, "-l", f"127.0.0.1:{self.port}", f"--fdname={self.port}",
                *(f"-E{name}={env[name]}" for name in passed), *args,
            ]
            executable = activate
        transport = reactor.spawnProcess(self.process, executable, args, env=env, path=self.directory)
        self.pid = transport.pid

        def cleanup() -> defer.Deferred[Any]:
            if not self.process.ended.called:
                transport.signalProcess("KILL")
            # workers this test started, in case a test failed before they exited; by pidfd, so
            # that a pid reused since cannot be hit
            for fd in self.worker_fds.values():
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                os.close(fd)
            self.worker_fds.clear()
            return self.process.ended

        self.addCleanup(cleanup)
        self.first: defer.Deferred[Any] | None = None
        if activate is not None:  # it starts twistd on the first connection
            await self.process.listening
            self.first = client.request(reactor, "127.0.0.1", self.port, get("/first"))
        ready = self.notes.wait("READY=1")
        first = await defer.DeferredList([ready, self.process.ended], fireOnOneCallback=True, consumeErrors=True)
        if first[1] == 1:
            self.fail("twistd ended before READY=1:\n" + self.process.output.decode(errors="replace"))
        self.ready_index = first[0]
        self.worker_pids = await self.pids()

    def write_conf(self, text: str) -> None:
        """Replace the configuration file."""
        with open(os.path.join(self.conf, "api.yaml"), "w", encoding="utf-8") as handle:
            handle.write(text)

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The admin listener's /metrics: (sample name, sorted labels) -> value."""
        page = await client.request(reactor, "127.0.0.1", self.admin, get("/metrics"))
        self.assertEqual(page.status, 200)
        out = {}
        for family in text_string_to_metric_families(page.body.decode()):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    async def pids(self) -> dict[int, int]:
        """Worker index -> pid, from flexgw_worker_info."""
        found = {}
        for name, labels in await self.metrics():
            if name == "flexgw_worker_info":
                found[int(dict(labels)["index"])] = int(dict(labels)["pid"])
        for pid in found.values():
            if pid not in self.worker_fds and hasattr(os, "pidfd_open"):
                with contextlib.suppress(OSError):
                    self.worker_fds[pid] = os.pidfd_open(pid)
        return found

    async def per_worker(self, sample: str, **labels: str) -> dict[str, float]:
        """worker label -> summed value of `sample` over the samples matching `labels`."""
        totals: dict[str, float] = {}
        for (name, have), value in (await self.metrics()).items():
            have_map = dict(have)
            if name == sample and all(have_map.get(k) == v for k, v in labels.items()):
                totals[have_map["worker"]] = totals.get(have_map["worker"], 0) + value
        return totals

    async def statuses(self, path: str, count: int, tls: Any = None) -> list[int]:
        """Status codes of `count` GETs, each on a new connection (spread over the workers)."""
        results = []
        for _ in range(count):
            response = await client.request(reactor, "127.0.0.1", self.port, get(path), tls=tls)
            results.append(response.status)
        return results

    async def test_two_workers_serve_one_admin(self) -> None:
        """READY=1 comes once both workers serve; both answer requests (distinct pids, neither
        the supervisor's); the one admin listener has metrics from both."""
        await self.start()
        ready = self.notes.messages[self.ready_index]
        self.assertIn("STATUS=2/2 workers ready", " ".join(ready))
        earlier = [m for m in self.notes.messages[: self.ready_index] if "READY=1" in m]
        self.assertEqual(earlier, [])
        self.assertEqual(sorted(self.worker_pids), [0, 1])
        self.assertEqual(len(set(self.worker_pids.values())), 2)
        self.assertNotIn(self.pid, self.worker_pids.values())
        self.assertEqual(await self.statuses("/items", 40), [200] * 40)
        self.assertEqual(len(self.upstream.received), 40)
        served = await self.per_worker("flexgw_requests_total", status_class="2xx")
        self.assertEqual(set(served), {"0", "1"})  # each worker served some
        self.assertTrue(all(v > 0 for v in served.values()), served)
        self.assertEqual(sum(served.values()), 40)
        process_rss = await self.per_worker("process_resident_memory_bytes")
        self.assertEqual(set(process_rss), {"0", "1", "supervisor"})
        page = await client.request(reactor, "127.0.0.1", self.admin, get("/status"))
        status = json.loads(page.body)
        self.assertTrue(status["ready"])
        self.assertEqual(
            {w["index"]: w["pid"] for w in status["workers"]}, self.worker_pids
        )
        self.assertEqual(status["listeners"][0]["address"], f"http://127.0.0.1:{self.port}")

    async def test_rate_limit_exact_across_workers(self) -> None:
        """A quota of 20 across two workers admits exactly 20 of 30 requests spread over both."""
        await self.start(rate_limit("test-api", 20))
        statuses = await self.statuses("/items", 30)
        self.assertEqual(statuses.count(200), 20, statuses)
        self.assertEqual(statuses.count(429), 10, statuses)
        self.assertEqual(statuses[:20], [200] * 20)
        answered = await self.per_worker("flexgw_requests_total")
        self.assertEqual(set(answered), {"0", "1"})
        self.assertEqual(len(self.upstream.received), 20)

    async def test_killed_worker_restarted(self) -> None:
        """A worker killed with SIGKILL is started again; both serve afterwards."""
        await self.start()
        before = len(self.notes.messages)
        os.kill(self.worker_pids[0], signal.SIGKILL)
        await self.notes.wait("STATUS=1/2 workers ready", before, prefix=True)
        back = await self.notes.wait("STATUS=2/2 workers ready", before, prefix=True)
        self.assertGreater(back, before)
        pids = await self.pids()
        self.assertNotEqual(pids[0], self.worker_pids[0])
        self.assertEqual(pids[1], self.worker_pids[1])
        self.worker_pids = pids
        restarts = await self.metrics()
        self.assertEqual(restarts[("flexgw_worker_restarts_total", (("index", "0"), ("worker", "supervisor")))], 1)
        self.assertEqual(await self.statuses("/items", 20), [200] * 20)
        served = await self.per_worker("flexgw_requests_total", status_class="2xx")
        self.assertEqual(set(served), {"0", "1"})

    async def test_hung_worker_killed_and_restarted(self) -> None:
        """A worker that stops answering (SIGSTOP) is killed after --worker-timeout and started
        again."""
        await self.start(extra=("--worker-timeout", "2"))
        before = len(self.notes.messages)
        os.kill(self.worker_pids[0], signal.SIGSTOP)
        self.addCleanup(self._cont, self.worker_pids[0])
        await self.notes.wait("STATUS=1/2 workers ready", before, prefix=True)
        await self.notes.wait("STATUS=2/2 workers ready", before, prefix=True)
        pids = await self.pids()
        self.assertNotEqual(pids[0], self.worker_pids[0])
        with self.assertRaises(ProcessLookupError):
            os.kill(self.worker_pids[0], 0)  # killed and reaped
        self.assertIn(b"did not answer for 2s", self.process.output)
        self.worker_pids = pids
        self.assertEqual(await self.statuses("/items", 10), [200] * 10)

    @staticmethod
    def _cont(pid: int) -> None:
        """Let a stopped process run again (so that it can die), if it still exists."""
        try:
            os.kill(pid, signal.SIGCONT)
        except OSError:
            pass

    async def test_sighup_reload_reaches_every_worker(self) -> None:
        """SIGHUP: RELOADING=1, then READY=1 once every worker reloaded; every worker serves the
        new configuration (the base path moved to /v2)."""
        await self.start()
        self.write_conf(
            f"{HEADER}kind: ApiInstance\nmetadata: {{name: test-api}}\n"
            f"spec:\n  address: http://127.0.0.1:{self.port}/v2\n"
            f"  services:\n    b:\n      address: http://127.0.0.1:{self.upstream.address[1]}\n"
        )
        before = len(self.notes.messages)
        os.kill(self.pid, signal.SIGHUP)
        reloading = await self.notes.wait("RELOADING=1", before)
        await self.notes.wait("READY=1", reloading + 1)
        reloads = await self.per_worker("flexgw_config_reloads_total", result="ok")
        self.assertEqual(reloads, {"0": 2.0, "1": 2.0})
        self.assertEqual(await self.statuses("/v2/items", 20), [200] * 20)
        self.assertEqual(await self.statuses("/items", 10), [404] * 10)
        served = await self.per_worker("flexgw_requests_total", status_class="2xx")
        self.assertEqual(set(served), {"0", "1"})

    async def test_tls_listener_served_by_workers(self) -> None:
        """An https ApiInstance (a `tls` binding) is served by both workers: the TLS wrapper
        goes on each worker's SO_REUSEPORT socket."""
        ca = CertificateAuthority()
        directory = tempfile.mkdtemp(prefix="flexgw-wt-")
        self.addCleanup(shutil.rmtree, directory, True)
        crt, key = ca.issue("127.0.0.1", ips=["127.0.0.1"]).write(directory, "server")

        def https_api(port: int, upstream_port: int) -> str:
            return (
                f"{HEADER}kind: ApiInstance\nmetadata: {{name: test-api}}\n"
                f"spec:\n  address: https://127.0.0.1:{port}\n"
                f"  services:\n    b:\n      address: http://127.0.0.1:{upstream_port}\n"
                f"---\n{HEADER}kind: PolicyBinding\nmetadata: {{name: tls}}\n"
                "spec:\n  targetRef: {kind: ApiInstance, name: test-api}\n"
                "  policyRef: {name: tls}\n"
                f'  config: {{certificate: {{crt: "file://{crt}", key: "file://{key}"}}}}\n'
            )

        await self.start(api=https_api)
        options = client_options("127.0.0.1", ca)
        self.assertEqual(await self.statuses("/items", 30, tls=options), [200] * 30)
        served = await self.per_worker("flexgw_requests_total", status_class="2xx")
        self.assertEqual(set(served), {"0", "1"})
        # plain HTTP on the TLS port gets no HTTP response (closed, or a TLS alert)
        with self.assertRaises((IncompleteResponse, ResponseParseError)):
            await client.request(reactor, "127.0.0.1", self.port, get("/items"))

    async def test_sigusr1_reopens_every_worker_log(self) -> None:
        """SIGUSR1 to the supervisor: every worker reopens its access log, so after logrotate
        moved the file, no worker writes to the moved one."""
        log = os.path.join(tempfile.mkdtemp(prefix="flexgw-wl-"), "access.log")
        self.addCleanup(shutil.rmtree, os.path.dirname(log), True)
        await self.start(access_log=log)
        self.assertEqual(await self.statuses("/before", 10), [200] * 10)
        os.rename(log, log + ".1")
        reopened = self.process.output.count(b"Log files reopened")
        waiting = WaitOutput(self.process, b"Log files reopened", reopened + 2)
        os.kill(self.pid, signal.SIGUSR1)
        await waiting.done
        self.assertEqual(await self.statuses("/after", 20), [200] * 20)
        served = await self.per_worker("flexgw_requests_total", status_class="2xx")
        self.assertEqual(set(served), {"0", "1"})
        os.kill(self.pid, signal.SIGTERM)  # stopping flushes every log
        await self.process.ended
        before = [json.loads(line)["path"] for line in read_lines(log + ".1")]
        after = [json.loads(line)["path"] for line in read_lines(log)]
        self.assertEqual((before, after), (["/before"] * 10, ["/after"] * 20))

    async def test_socket_activation_shared_by_workers(self) -> None:
        """Under systemd-socket-activate, both workers serve the one passed socket (none binds
        its own), and both answer requests on it."""
        activate = shutil.which("systemd-socket-activate")
        if activate is None:
            raise SkipTest("systemd-socket-activate is not installed")
        await self.start(activate=activate)
        assert self.first is not None
        self.assertEqual((await self.first).status, 200)  # waited in the backlog meanwhile
        self.assertEqual(self.process.output.count(b"inherited from systemd"), 2, self.process.output)
        self.assertEqual(await self.statuses("/items", 40), [200] * 40)
        served = await self.per_worker("flexgw_requests_total", status_class="2xx")
        self.assertEqual(set(served), {"0", "1"})
        self.assertEqual(sum(served.values()), 41)

    async def test_file_change_reloads_every_worker(self) -> None:
        """The supervisor watches the conf dir: a changed file reloads every worker
        (RELOADING=1, READY=1), with no signal sent."""
        await self.start(debounce="100ms")
        before = len(self.notes.messages)
        self.write_conf(
            f"{HEADER}kind: ApiInstance\nmetadata: {{name: test-api}}\n"
            f"spec:\n  address: http://127.0.0.1:{self.port}/moved\n"
            f"  services:\n    b:\n      address: http://127.0.0.1:{self.upstream.address[1]}\n"
        )
        reloading = await self.notes.wait("RELOADING=1", before)
        await self.notes.wait("READY=1", reloading + 1)
        self.assertEqual(await self.statuses("/moved/x", 20), [200] * 20)
        reloads = await self.per_worker("flexgw_config_reloads_total", result="ok")
        self.assertEqual(set(reloads), {"0", "1"})
        self.assertTrue(all(count >= 2 for count in reloads.values()), reloads)

    async def test_sigterm_drains_in_flight_request(self) -> None:
        """SIGTERM: STOPPING=1, readiness 503 on the admin listener while the workers drain, the
        request in flight completes, new connections are refused, everything exits."""
        held = Held()
        probe = free_port()
        await self.start(
            f"---\n{HEADER}kind: Configuration\nmetadata: {{name: probes}}\n"
            f"spec:\n  probe: {{enabled: true, port: {probe}, host: 127.0.0.1}}\n",
            responder=held.responder,
        )
        for _ in range(6):  # every worker answers on the probe port (SO_REUSEPORT)
            ready = await client.request(reactor, "127.0.0.1", probe, get("/probes/readiness"))
            self.assertEqual(ready.status, 200)
        conn = await client.connect(reactor, "127.0.0.1", self.port)
        self.addCleanup(conn.abort)
        conn.send(b"GET /slow HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        await held.wait(1)
        os.kill(self.pid, signal.SIGTERM)
        await self.notes.wait("STOPPING=1")
        admin_probe = await client.request(reactor, "127.0.0.1", self.admin, get("/probes/readiness"))
        self.assertEqual(admin_probe.status, 503)
        self.assertIn(b"draining", admin_probe.body)
        # The worker with nothing in flight exits at once: a connection the kernel had already
        # queued on its probe socket is reset, so try a few; every answer is a 503.
        answers = []
        for _ in range(10):
            try:
                answers.append(
                    await client.request(reactor, "127.0.0.1", probe, get("/probes/readiness"))
                )
            except (IncompleteResponse, ConnectionRefusedError):
                continue
            if len(answers) >= 2:
                break
        self.assertTrue(answers)
        for worker_probe in answers:
            self.assertEqual(worker_probe.status, 503)
            self.assertIn(b"the gateway is draining", worker_probe.body)
        self.assertFalse(self.process.ended.called)
        held.answer_all(b"slow")
        response = await conn.read_final_response()
        self.assertEqual((response.status, response.body), (200, b"slow"))
        self.assertEqual(response.header("connection"), [b"close"])
        reason = await self.process.ended
        self.assertEqual(getattr(reason, "signal", None), signal.SIGTERM, self.process.output)
        for pid in self.worker_pids.values():
            with self.assertRaises(ProcessLookupError):
                os.kill(pid, 0)
        with self.assertRaises(ConnectionRefusedError):
            await client.connect(reactor, "127.0.0.1", self.port, timeout=5)


    async def test_redis_down_fails_fast_in_every_worker(self) -> None:
        """With sharedStorage.redis each worker has its own Redis client and breaker: Redis
        killed, every request is answered at once with 429 quota_unavailable (counted as such
        over the workers), and the outage is logged once per worker, with no traceback."""
        server = RedisServer()
        self.addCleanup(server.stop)
        server.start()
        storage = (
            f"---\n{HEADER}kind: Configuration\nmetadata: {{name: storage}}\n"
            "spec:\n  sharedStorage:\n    redis:\n"
            f"      address: 127.0.0.1:{server.port}\n      commandTimeoutSeconds: 10\n"
        )
        await self.start(rate_limit("test-api", 100) + storage)
        self.assertEqual(await self.statuses("/items", 4), [200] * 4)
        logged = WaitOutput(self.process, b" is down: ", 1)
        server.stop()  # SIGKILL
        started = reactor.seconds()
        answers = []
        for _ in range(20):
            response = await client.request(reactor, "127.0.0.1", self.port, get("/items"))
            answers.append((response.status, dict(response.headers).get(b"x-flexgw-error")))
        self.assertEqual(answers, [(429, b"quota_unavailable")] * 20)
        self.assertLess(reactor.seconds() - started, 10)  # none of the 20 waited the timeout
        refused = await self.per_worker("flexgw_rate_limit_unknown_quota_total", outcome="refused")
        self.assertEqual(sum(refused.values()), 20)
        await logged.done
        self.assertIn(self.process.output.count(b" is down: "), (1, 2))
        self.assertNotIn(b"Traceback", self.process.output)

    async def test_workers_exit_when_supervisor_dies(self) -> None:
        """The supervisor killed (SIGKILL: no drain of its own): every worker sees its AMP
        connection close, drains and exits; nothing listens any more."""
        if not hasattr(os, "pidfd_open"):
            raise SkipTest("os.pidfd_open is not available")
        await self.start()
        exits = [PidExit(pid) for pid in self.worker_pids.values()]
        os.kill(self.pid, signal.SIGKILL)
        await self.process.ended
        await defer.gatherResults([e.done for e in exits])
        with self.assertRaises(ConnectionRefusedError):
            await client.connect(reactor, "127.0.0.1", self.port, timeout=5)

    async def test_second_sigterm_cuts_the_drain(self) -> None:
        """A second SIGTERM to the supervisor cuts the workers' drains at once."""
        held = Held()
        await self.start(responder=held.responder, drain_seconds=600)
        conn = await client.connect(reactor, "127.0.0.1", self.port)
        self.addCleanup(conn.abort)
        conn.send(b"GET /slow HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        await held.wait(1)
        os.kill(self.pid, signal.SIGTERM)
        await self.notes.wait("STOPPING=1")
        os.kill(self.pid, signal.SIGTERM)
        with self.assertRaises(IncompleteResponse):
            await conn.read_final_response()
        await self.process.ended
        for pid in self.worker_pids.values():
            with self.assertRaises(ProcessLookupError):
                os.kill(pid, 0)


class WorkersOptionTests(TestCase):
    """`--workers` parsing, the worker command line, and the restart backoff."""

    def test_values(self) -> None:
        """Default 1; a number; `auto` is the CPU count; 0, negatives and words are refused."""
        conf = self.mktemp()
        os.makedirs(conf)
        options = Options()
        options.parseOptions(["--conf", conf])
        self.assertEqual(options["workers"], 1)
        options = Options()
        options.parseOptions(["--conf", conf, "--workers", "3"])
        self.assertEqual(options["workers"], 3)
        self.assertEqual(worker_count("auto", lambda: 6), 6)
        self.assertEqual(worker_count("AUTO", lambda: None), 1)
        for value in ("0", "-2", "many", "2000"):
            with self.assertRaises(UsageError, msg=value):
                Options().parseOptions(["--conf", conf, "--workers", value])

    def test_worker_command(self) -> None:
        """A worker runs twistd flexgw with every option the supervisor got (later ones too,
        e.g. the ingress options), then --workers 1 and --admin off, which win."""
        conf = self.mktemp()
        os.makedirs(conf)
        given = [
            "--conf", conf, "--workers", "2", "--strict", "--log-level", "warn",
            "--drain-seconds", "7", "--access-log", "/tmp/a.log", "--admin", "tcp:9911",
            "--worker-timeout", "9", "--ingress-class", "edge",
        ]
        options = Options()
        options.parseOptions(given)
        argv = worker_command(options)
        self.assertEqual(argv[0], sys.executable)
        self.assertIn("--nodaemon", argv)
        tail = argv[argv.index("flexgw") + 1 :]
        self.assertEqual(tail, [*given, "--workers", "1", "--admin", "off"])
        parsed = Options()
        parsed.parseOptions(tail)  # the worker's options parse
        self.assertEqual(
            (parsed["workers"], parsed["admin"], parsed["drain-seconds"], parsed["strict"]),
            (1, "off", 7.0, True),
        )
        self.assertEqual((parsed["conf"], parsed["ingress-class"]), ([conf], "edge"))

    def test_worker_timeout_option(self) -> None:
        """--worker-timeout: 30 s by default, 0 turns the heartbeat off, negatives are refused."""
        conf = self.mktemp()
        os.makedirs(conf)
        options = Options()
        options.parseOptions(["--conf", conf])
        self.assertEqual(options["worker-timeout"], 30.0)
        options = Options()
        options.parseOptions(["--conf", conf, "--worker-timeout", "0"])
        self.assertEqual(options["worker-timeout"], 0.0)
        for value in ("-1", "nan", "soon"):
            with self.assertRaises(UsageError, msg=value):
                Options().parseOptions(["--conf", conf, "--worker-timeout", value])

    def test_reload_before_ready_is_not_announced(self) -> None:
        """A SIGHUP before the first READY=1 sends no RELOADING=1/READY=1 (systemd still waits
        for the start); after it, a reload is announced and closed by READY=1."""
        sent: list[str] = []

        class Recorder:
            def reloading(self, status: str | None = None) -> None:
                sent.append("RELOADING=1")

            def ready(self, status: str | None = None) -> None:
                sent.append("READY=1")

        service = SupervisorService(reactor, 2, lambda i: [], {}, notifier=Recorder())  # type: ignore[arg-type]
        self.successResultOf(service.reload())
        self.assertEqual(sent, [])
        service.announced = True
        self.successResultOf(service.reload())
        self.assertEqual(sent, ["RELOADING=1", "READY=1"])

    def test_spawn_failure_backs_off(self) -> None:
        """A worker that cannot even be started (spawnProcess raises) is tried again with the
        same growing delays, not in a tight loop; stopping cancels the pending try."""

        class NoSpawn(MemoryReactorClock):
            attempts = 0

            def spawnProcess(self, *args: Any, **kwargs: Any) -> Any:
                NoSpawn.attempts += 1
                raise OSError(24, "Too many open files")

        clock = NoSpawn()
        service = SupervisorService(clock, 1, lambda i: ["worker"], {}, worker_timeout=0)
        service.startService()
        delays = []
        for _ in range(3):
            (call,) = clock.getDelayedCalls()
            delays.append(call.getTime() - clock.seconds())
            clock.advance(call.getTime() - clock.seconds())
        self.assertEqual(delays, [0.25, 0.5, 1.0])
        self.assertEqual(NoSpawn.attempts, 4)
        self.flushLoggedErrors(OSError)
        self.successResultOf(service.stopService())
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_backoff(self) -> None:
        """No delay after a healthy run; doubling from 0.25 s while workers die young; capped."""
        service = SupervisorService(reactor, 1, lambda i: [], {})
        slot = WorkerSlot(0)
        delays = []
        for failures in range(12):
            slot.failures = failures
            delays.append(service.restart_delay(slot))
        self.assertEqual(delays[:4], [0.0, 0.25, 0.5, 1.0])
        self.assertEqual(max(delays), BACKOFF_MAX)
        self.assertGreater(HEALTHY_SECONDS, 0)


class SupervisorAdminTests(TestCase):
    """The supervisor's admin resources answering from a Deferred."""

    def test_client_left_before_the_answer(self) -> None:
        """A client gone before the workers answered: nothing is written, nothing raises."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure
        from twisted.web.http import Request
        from twisted.web.test.requesthelper import DummyChannel

        from flexgw.service.workers import _DeferredResource

        answer: defer.Deferred[bytes] = defer.Deferred()

        class Late(_DeferredResource):
            def answer(self, request: Any) -> defer.Deferred[bytes]:
                return answer

        channel = DummyChannel()
        request = Request(channel)
        request.method = b"GET"
        Late(None).render_GET(request)  # type: ignore[arg-type]
        request.connectionLost(Failure(ConnectionDone()))
        answer.callback(b"{}")
        self.assertIsNone(self.successResultOf(answer))  # no RuntimeError from finish()
        self.assertEqual(channel.transport.written.getvalue(), b"")
        self.assertFalse(request.finished)
