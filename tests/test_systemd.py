"""sd_notify: messages a test datagram socket receives from the Notifier and the GatewayService."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from flexgw.service.systemd import Notifier, notify_address
from flexgw.testing.upstream import RecordingUpstream, fixed
from tests.harness import Gateway, api_document, free_port


class NotifySocket:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, case: TestCase, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        case.addCleanup(self.sock.close)
        if abstract:
            name = f"flexgw-test-{os.getpid()}-{id(self)}"
            self.sock.bind("\0" + name)
            self.value = "@" + name
        else:
            # A short path of its own: AF_UNIX paths are limited to about 100 bytes.
            directory = tempfile.mkdtemp(prefix="flexgw-notify-")
            case.addCleanup(shutil.rmtree, directory, True)
            self.value = os.path.join(directory, "notify")
            self.sock.bind(self.value)
        self.sock.setblocking(False)

    def messages(self) -> list[str]:
        """Every message received so far (sd_notify sends synchronously: no waiting needed)."""
        received = []
        while True:
            try:
                received.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                return received


class NotifierTests(TestCase):
    """The Notifier speaks the sd_notify protocol."""

    def test_unset_is_a_no_op(self) -> None:
        """Without NOTIFY_SOCKET nothing is sent and no watchdog runs."""
        clock = Clock()
        notifier = Notifier(clock, {"WATCHDOG_USEC": "1000000"})
        self.assertFalse(notifier.enabled)
        self.assertFalse(notifier.ready("up"))
        notifier.start_watchdog()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_address_forms(self) -> None:
        """A path is used as is, `@` means the abstract namespace, other forms are ignored."""
        self.assertEqual(notify_address("/run/systemd/notify"), "/run/systemd/notify")
        self.assertEqual(notify_address("@abc"), b"\0abc")
        self.assertIsNone(notify_address("vsock:2:1234"))
        self.assertIsNone(notify_address(""))

    def test_path_socket_messages(self) -> None:
        """READY, RELOADING with MONOTONIC_USEC, STOPPING and STATUS arrive as KEY=value lines."""
        sink = NotifySocket(self)
        notifier = Notifier(Clock(), {"NOTIFY_SOCKET": sink.value}, monotonic_usec=lambda: 1234)
        self.assertTrue(notifier.ready("serving"))
        notifier.reloading()
        notifier.stopping("two\nlines")
        notifier.status("just status")
        self.assertEqual(
            sink.messages(),
            [
                "READY=1\nSTATUS=serving",
                "RELOADING=1\nMONOTONIC_USEC=1234",
                "STOPPING=1\nSTATUS=two lines",
                "STATUS=just status",
            ],
        )

    def test_default_monotonic_usec_is_clock_monotonic(self) -> None:
        """MONOTONIC_USEC defaults to CLOCK_MONOTONIC in microseconds."""
        sink = NotifySocket(self)
        notifier = Notifier(Clock(), {"NOTIFY_SOCKET": sink.value})
        import time

        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        (message,) = sink.messages()
        value = int(message.split("MONOTONIC_USEC=")[1])
        self.assertTrue(before <= value <= after)

    def test_abstract_socket(self) -> None:
        """An `@name` NOTIFY_SOCKET reaches a socket in the abstract namespace."""
        sink = NotifySocket(self, abstract=True)
        Notifier(Clock(), {"NOTIFY_SOCKET": sink.value}).ready()
        self.assertEqual(sink.messages(), ["READY=1"])

    def test_gone_socket_does_not_raise(self) -> None:
        """A socket that went away makes notify() return False, not raise."""
        sink = NotifySocket(self)
        notifier = Notifier(Clock(), {"NOTIFY_SOCKET": sink.value + "-missing"})
        self.assertFalse(notifier.ready())
        self.assertFalse(notifier.ping())

    def test_watchdog_pings_every_half_period(self) -> None:
        """WATCHDOG=1 goes out at start and every half of WATCHDOG_USEC until stopped."""
        sink = NotifySocket(self)
        clock = Clock()
        environ = {"NOTIFY_SOCKET": sink.value, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "77"}
        notifier = Notifier(clock, environ, pid=77)
        self.assertEqual(notifier.watchdog_interval, 2.0)
        notifier.start_watchdog()
        self.assertEqual(sink.messages(), ["WATCHDOG=1"])
        clock.advance(1.9)
        self.assertEqual(sink.messages(), [])
        clock.advance(0.1)
        clock.advance(2.0)
        self.assertEqual(sink.messages(), ["WATCHDOG=1", "WATCHDOG=1"])
        notifier.stop_watchdog()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_watchdog_for_another_process_is_ignored(self) -> None:
        """WATCHDOG_PID naming another process means no pings from this one."""
        sink = NotifySocket(self)
        environ = {"NOTIFY_SOCKET": sink.value, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "77"}
        notifier = Notifier(Clock(), environ, pid=78)
        self.assertIsNone(notifier.watchdog_interval)


class GatewayNotifyTests(TestCase):
    """The GatewayService tells systemd when it is ready, reloading and stopping."""

    timeout = 20

    async def test_start_reload_stop_sequence(self) -> None:
        """READY after the listener is bound, RELOADING/READY around reloads, STOPPING on stop."""
        sink = NotifySocket(self)
        upstream = RecordingUpstream(fixed(), reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()
        environ = {"NOTIFY_SOCKET": sink.value, "WATCHDOG_USEC": "3600000000"}
        gateway = Gateway(self, {"api.yaml": api_document(port, upstream.address[1])}, environ)
        gateway.service.notifier.monotonic_usec = lambda: 42
        gateway.start()
        self.assertIsNotNone(gateway.service.bound_port("127.0.0.1", port))
        self.assertEqual(
            sink.messages(),
            [
                "READY=1\nSTATUS=Serving 1 API(s) on 1 listener(s); configuration generation 1: ok",
                "WATCHDOG=1",
            ],
        )
        self.assertTrue(gateway.service.reload())
        gateway.write({"api.yaml": "kind: [unclosed\n"})
        self.assertFalse(gateway.service.reload())
        messages = sink.messages()
        self.assertEqual(len(messages), 4)
        self.assertEqual(messages[0], "RELOADING=1\nMONOTONIC_USEC=42\nSTATUS=Reloading configuration")
        self.assertTrue(messages[1].startswith("READY=1\nSTATUS=Serving 1 API(s)"))
        self.assertTrue(messages[1].endswith(": ok"), messages[1])
        self.assertEqual(messages[2], messages[0])
        self.assertTrue(messages[3].startswith("READY=1\nSTATUS=Serving 1 API(s)"))
        self.assertIn("failed (1 error(s))", messages[3])
        await gateway.service.stopService()
        # The watchdog stopped with the service (else trial reports a dirty reactor).
        self.assertEqual(sink.messages(), ["STOPPING=1\nSTATUS=Draining (up to 25s)"])
