"""`twistd flexgw` under a fake systemd: READY=1 on start, SIGTERM drains, a second SIGTERM cuts."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from typing import Any

import attrs
from twisted.internet import defer, protocol, reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.python.usage import UsageError
from twisted.trial.unittest import TestCase

from flexgw.tap import Options, _stop_reactor
from flexgw.testing import client
from flexgw.testing.client import IncompleteResponse
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import PROCESS_TEST_TIMEOUT, api_document, free_port
from tests.test_ingress_upstream import Held

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GET = b"GET /items HTTP/1.1\r\nHost: example.test\r\n\r\n"


def write_conf(directory: str, document: str) -> str:
    """A conf dir under `directory` holding `document`; its path."""
    conf = os.path.join(directory, "conf")
    os.makedirs(conf)
    with open(os.path.join(conf, "api.yaml"), "w", encoding="utf-8") as handle:
        handle.write(document)
    return conf


class NotifyReceiver(protocol.DatagramProtocol):
    """Collects sd_notify datagrams; `wait_for(key)` fires when a message carries `key`."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self._waiters: list[tuple[str, defer.Deferred[str]]] = []

    def datagramReceived(self, data: bytes, addr: Any = None) -> None:
        """One sd_notify message."""
        message = data.decode()
        self.messages.append(message)
        for entry in list(self._waiters):
            if entry[0] in message.splitlines():
                self._waiters.remove(entry)
                entry[1].callback(message)

    def wait_for(self, line: str) -> defer.Deferred[str]:
        """Fires with the first message (received from now on or before) that has `line`."""
        for message in self.messages:
            if line in message.splitlines():
                return defer.succeed(message)
        d: defer.Deferred[str] = defer.Deferred()
        self._waiters.append((line, d))
        return d


class Process(protocol.ProcessProtocol):
    """The twistd process; `ended` fires with the exit reason."""

    def __init__(self) -> None:
        self.ended: defer.Deferred[Any] = defer.Deferred()
        self.output = b""
        self._output_waiters: list[tuple[bytes, defer.Deferred[bytes]]] = []

    def outReceived(self, data: bytes) -> None:
        """Keep stdout (the runtime log) for failure messages."""
        self.output += data
        for entry in list(self._output_waiters):
            if entry[0] in self.output:
                self._output_waiters.remove(entry)
                entry[1].callback(self.output)

    def wait_output(self, text: bytes) -> defer.Deferred[bytes]:
        """Fires with the output so far once it contains `text`."""
        if text in self.output:
            return defer.succeed(self.output)
        waiter: defer.Deferred[bytes] = defer.Deferred()
        self._output_waiters.append((text, waiter))
        return waiter

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        """The process is gone."""
        self.ended.callback(reason.value)


@attrs.frozen
class Twistd:
    """A started `twistd flexgw`: its output, its sd_notify messages, its process transport."""

    process: Process
    receiver: NotifyReceiver
    transport: Any


async def start_twistd(case: TestCase, directory: str, conf: str, *options: str) -> Twistd:
    """`twistd flexgw --conf conf --access-log off --admin off OPTIONS...` (a later option wins)
    under a fake systemd (its notify socket in `directory`); returns once it sent READY=1 (fails
    the test if it ends first). The process is killed, if still running, when the test ends."""
    receiver = NotifyReceiver()
    notify = os.path.join(directory, "notify")
    listening = reactor.listenUNIXDatagram(notify, receiver)
    case.addCleanup(listening.stopListening)
    env = dict(os.environ, PYTHONPATH=ROOT, NOTIFY_SOCKET=notify)
    env.pop("WATCHDOG_USEC", None)
    process = Process()
    args = [
        sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
        "--nodaemon", "--pidfile=", "--logfile=-", "flexgw", "--conf", conf,
        "--access-log", "off", "--admin", "off", *options,
    ]
    transport = reactor.spawnProcess(process, sys.executable, args, env=env, path=directory)

    def cleanup() -> defer.Deferred[Any]:
        if not process.ended.called:
            transport.signalProcess("KILL")
        return process.ended

    case.addCleanup(cleanup)
    first = await defer.DeferredList(
        [receiver.wait_for("READY=1"), process.ended], fireOnOneCallback=True, consumeErrors=True
    )
    if first[1] == 1:
        case.fail("twistd ended before READY=1:\n" + process.output.decode(errors="replace"))
    return Twistd(process, receiver, transport)


class SigtermTests(TestCase):
    """The real twistd process, signals included."""

    timeout = PROCESS_TEST_TIMEOUT  # (a hang guard: tests.harness)

    async def start(self, drain_seconds: float) -> tuple[Process, NotifyReceiver, Held, int]:
        """Start an upstream and `twistd flexgw` in front of it; wait for READY=1."""
        held = Held()
        upstream = RecordingUpstream(held.responder, reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        directory = tempfile.mkdtemp(prefix="flexgw-sig-")  # short: AF_UNIX path limit
        self.addCleanup(shutil.rmtree, directory, True)
        port = free_port()
        conf = write_conf(directory, api_document(port, upstream.address[1]))
        started = await start_twistd(
            self, directory, conf, "--drain-seconds", str(drain_seconds)
        )
        self.process_pid = started.transport.pid
        return started.process, started.receiver, held, port

    async def test_sigterm_drains_then_exits(self) -> None:
        """SIGTERM: STOPPING=1, the request in flight completes with Connection: close, new
        connections are refused, and twistd exits (by re-raising the SIGTERM, as twistd does)."""
        process, receiver, held, port = await self.start(drain_seconds=20)
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(GET)
        await held.wait(1)
        os.kill(self.process_pid, signal.SIGTERM)
        await receiver.wait_for("STOPPING=1")
        self.assertFalse(process.ended.called)
        held.answer_all(b"slow")
        response = await conn.read_final_response()
        self.assertEqual((response.status, response.body), (200, b"slow"))
        self.assertEqual(response.header("connection"), [b"close"])
        reason = await process.ended
        self.assertEqual(getattr(reason, "signal", None), signal.SIGTERM, process.output)
        with self.assertRaises(ConnectionRefusedError):
            await client.connect(reactor, "127.0.0.1", port, timeout=5)

    async def test_second_sigterm_cuts_at_once(self) -> None:
        """A second SIGTERM aborts the request still in flight instead of waiting the drain time."""
        process, receiver, held, port = await self.start(drain_seconds=600)
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(GET)
        await held.wait(1)
        os.kill(self.process_pid, signal.SIGTERM)
        await receiver.wait_for("STOPPING=1")
        os.kill(self.process_pid, signal.SIGTERM)
        with self.assertRaises(IncompleteResponse):
            await conn.read_final_response()
        await process.ended


class DrainOptionTests(TestCase):
    """`--drain-seconds` is parsed and checked."""

    def test_default_and_value(self) -> None:
        """Default 25 (as Flex); a given value becomes a float."""
        conf = self.mktemp()
        os.makedirs(conf)
        options = Options()
        options.parseOptions(["--conf", conf])
        self.assertEqual(options["drain-seconds"], 25.0)
        options = Options()
        options.parseOptions(["--conf", conf, "--drain-seconds", "2.5"])
        self.assertEqual(options["drain-seconds"], 2.5)

    def test_invalid_values_refused(self) -> None:
        """A negative, infinite or non-numeric drain time is a usage error."""
        conf = self.mktemp()
        os.makedirs(conf)
        for value in ("-1", "inf", "nan", "soon"):
            with self.assertRaises(UsageError, msg=value):
                Options().parseOptions(["--conf", conf, "--drain-seconds", value])


class StopReactorTests(TestCase):
    """The worker's reactor stop (on a lost supervisor or a stop message)."""

    def test_stop_twice(self) -> None:
        """Asked twice (or once Twisted is already stopping): one stop, no ReactorNotRunning."""
        from twisted.internet.error import ReactorNotRunning

        class Reactor:
            running = True  # stays True until the shutdown has run, as Twisted's does
            stops = 0

            def stop(self) -> None:
                self.stops += 1
                if self.stops > 1:
                    raise ReactorNotRunning("Can't stop reactor that isn't running.")

        fake = Reactor()
        stop = _stop_reactor(fake)
        stop()
        stop()
        self.assertEqual(fake.stops, 2)
        fake.running = False
        stop()
        self.assertEqual(fake.stops, 2)
