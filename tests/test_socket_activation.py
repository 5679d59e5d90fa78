"""systemd socket activation: listeners adopt passed sockets (by name, by address) instead of binding."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import SkipTest, TestCase

from flexgw.service.activation import InheritedSockets
from flexgw.service.gateway import GatewayService
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import PROCESS_TEST_TIMEOUT, api_document, free_port
from tests.test_sigterm import Process, write_conf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GET = b"GET /items HTTP/1.1\r\nHost: example.test\r\n\r\n"


class BindRecorder:
    """The reactor, with every listenTCP call recorded (socket activation must make none)."""

    def __init__(self) -> None:
        self.binds: list[tuple[str, int]] = []

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        """Record, then bind for real."""
        self.binds.append((interface, port))
        return reactor.listenTCP(port, factory, backlog=backlog, interface=interface)

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


def listening_socket() -> socket.socket:
    """A TCP socket listening on a free loopback port (as systemd would hold it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def pass_fds(case: TestCase, sockets: list[Any]) -> int:
    """Duplicate `sockets` (or raw descriptors) to consecutive free descriptors (as systemd lays them out); the first."""

    def free(fd: int) -> bool:
        try:
            os.fstat(fd)
        except OSError:
            return True
        return False

    start = 200
    while not all(free(start + i) for i in range(len(sockets))):
        start += 1
    for offset, sock in enumerate(sockets):
        os.dup2(sock if isinstance(sock, int) else sock.fileno(), start + offset)
        case.addCleanup(os.close, start + offset)
    return start


def environ(count: int, names: list[str] | None = None, pid: int | None = None) -> dict[str, str]:
    """LISTEN_* as systemd sets them for this process (or for `pid`)."""
    env = {"LISTEN_PID": str(os.getpid() if pid is None else pid), "LISTEN_FDS": str(count)}
    if names is not None:
        env["LISTEN_FDNAMES"] = ":".join(names)
    return env


class ActivateProcess(Process):
    """systemd-socket-activate then twistd; `listening` fires once the socket is bound."""

    def __init__(self) -> None:
        super().__init__()
        self.listening: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        """Watch for systemd-socket-activate's `Listening on ...` line."""
        super().outReceived(data)
        if not self.listening.called and b"Listening on" in self.output:
            self.listening.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        """Gone (before listening, too: the test then fails instead of waiting)."""
        if not self.listening.called:
            self.listening.errback(RuntimeError(self.output.decode(errors="replace")))
        super().processEnded(reason)


class AdoptionTests(TestCase):
    """A GatewayService serves on the sockets it is given."""

    timeout = 20

    def setUp(self) -> None:
        """An upstream answering 200."""
        self.upstream = RecordingUpstream(reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)

    def gateway(self, sockets: list[socket.socket], document: str, env_of: Any) -> tuple[GatewayService, BindRecorder]:
        """A started gateway on `document`, `sockets` passed with the environ `env_of(count)`."""
        for sock in sockets:
            self.addCleanup(sock.close)
        start = pass_fds(self, sockets)
        self.conf = tempfile.mkdtemp(prefix="flexgw-act-")
        self.addCleanup(shutil.rmtree, self.conf, True)
        self.write(document)
        recorder = BindRecorder()
        service = GatewayService(recorder, [self.conf], env_of(len(sockets)), listen_fds_start=start)
        service.startService()
        self.addCleanup(service.stopService)
        return service, recorder

    def write(self, document: str) -> None:
        """Replace the configuration."""
        with open(os.path.join(self.conf, "api.yaml"), "w", encoding="utf-8") as handle:
            handle.write(document)

    async def get(self, port: int) -> int:
        """GET through 127.0.0.1:port; the status."""
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(GET)
        response = await conn.read_final_response()
        return int(response.status)

    async def test_adopts_by_address(self) -> None:
        """An unnamed socket bound to the listener's address is adopted; nothing else is bound."""
        other, mine = listening_socket(), listening_socket()
        port = mine.getsockname()[1]
        service, recorder = self.gateway(
            [other, mine], api_document(port, self.upstream.address[1]), lambda n: environ(n)
        )
        self.assertEqual((service.last_reload_ok, recorder.binds), (True, []))
        self.assertEqual(await self.get(port), 200)
        self.assertEqual(len(self.upstream.received), 1)
        assert service.inherited is not None
        self.assertEqual([s.port for s in service.inherited.unused()], [other.getsockname()[1]])

    async def test_adopts_by_name(self) -> None:
        """A socket named `api-PORT` goes to the listener on PORT whatever its own address."""
        sock = listening_socket()
        actual = sock.getsockname()[1]
        configured = free_port()
        service, recorder = self.gateway(
            [sock],
            api_document(configured, self.upstream.address[1]),
            lambda n: environ(n, [f"api-{configured}"]),
        )
        self.assertEqual((service.last_reload_ok, recorder.binds), (True, []))
        self.assertEqual(service.bound_port("127.0.0.1", configured), actual)
        self.assertEqual(await self.get(actual), 200)

    async def test_port_name_takes_precedence(self) -> None:
        """A socket named with a port is not taken by address for another listener."""
        named, plain = listening_socket(), listening_socket()
        port = plain.getsockname()[1]
        service, recorder = self.gateway(
            [named, plain],
            api_document(port, self.upstream.address[1]),
            lambda n: environ(n, [str(port), "flexgw.socket"]),
        )
        # `named` carries the listener's port as its name: it wins over `plain`'s address.
        self.assertEqual((service.last_reload_ok, recorder.binds), (True, []))
        self.assertEqual(service.bound_port("127.0.0.1", port), named.getsockname()[1])
        self.assertEqual(await self.get(named.getsockname()[1]), 200)

    async def test_wrong_pid_ignored(self) -> None:
        """LISTEN_PID of another process: the sockets are not ours, the gateway binds itself."""
        sock = listening_socket()
        port = sock.getsockname()[1]
        service, recorder = self.gateway(
            [sock], api_document(port, self.upstream.address[1]), lambda n: environ(n, pid=os.getpid() + 1)
        )
        assert service.inherited is not None
        self.assertEqual(len(service.inherited), 0)
        self.assertEqual(recorder.binds, [("127.0.0.1", port)])  # and it fails: the port is taken
        self.assertEqual(service.unbound, {("127.0.0.1", port)})

    async def test_kept_across_reloads(self) -> None:
        """A reload that drops the address keeps the inherited socket; the next one adopts it again."""
        sock = listening_socket()
        port = sock.getsockname()[1]
        service, recorder = self.gateway([sock], api_document(port, self.upstream.address[1]), lambda n: environ(n))
        other = free_port()
        self.write(api_document(other, self.upstream.address[1]))
        self.assertTrue(service.reload())
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN), 1)
        self.write(api_document(port, self.upstream.address[1]))
        self.assertTrue(service.reload())
        self.assertEqual(recorder.binds, [("127.0.0.1", other)])
        self.assertEqual(await self.get(port), 200)


class PoolTests(TestCase):
    """InheritedSockets reads LISTEN_* as sd_listen_fds does."""

    def test_unset_means_none(self) -> None:
        """No LISTEN_PID: no sockets, whatever LISTEN_FDS says."""
        self.assertEqual(len(InheritedSockets({"LISTEN_FDS": "2"}, start=3)), 0)

    def test_names_that_do_not_add_up_are_ignored(self) -> None:
        """LISTEN_FDNAMES with the wrong count: the sockets are kept, without names."""
        sock = listening_socket()
        self.addCleanup(sock.close)
        start = pass_fds(self, [sock])
        pool = InheritedSockets(environ(1, ["a", "b"]), start=start)
        self.assertEqual([(s.name, s.port) for s in pool.sockets], [(None, sock.getsockname()[1])])

    def test_non_listening_descriptors_skipped(self) -> None:
        """A pipe or an unbound socket among the descriptors is skipped (and left open)."""
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        idle = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(idle.close)
        sock = listening_socket()
        self.addCleanup(sock.close)
        start = pass_fds(self, [read, idle, sock])
        pool = InheritedSockets(environ(3), start=start)
        self.assertEqual([s.fd for s in pool.sockets], [start + 2])
        os.fstat(start)  # still open

    def test_name_ports(self) -> None:
        """`8081` and `api-8081` name port 8081; `flexgw.socket` and `api-x` name none."""
        sock = listening_socket()
        self.addCleanup(sock.close)
        start = pass_fds(self, [sock, sock, sock, sock])
        pool = InheritedSockets(environ(4, ["8081", "api-8081", "flexgw.socket", "api-x"]), start=start)
        self.assertEqual([s.name_port() for s in pool.sockets], [8081, 8081, None, None])


class SocketActivateTests(TestCase):
    """`systemd-socket-activate` in front of `twistd flexgw`."""

    timeout = PROCESS_TEST_TIMEOUT  # (a hang guard: tests.harness)

    async def test_twistd_serves_passed_socket(self) -> None:
        """systemd-socket-activate holds the port; twistd flexgw answers a request on it."""
        activate = shutil.which("systemd-socket-activate")
        if activate is None:
            raise SkipTest("systemd-socket-activate is not installed")
        upstream = RecordingUpstream(reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        directory = tempfile.mkdtemp(prefix="flexgw-sa-")
        self.addCleanup(shutil.rmtree, directory, True)
        port = free_port()
        conf = write_conf(directory, api_document(port, upstream.address[1]))
        process = ActivateProcess()
        args = [
            activate, "-l", f"127.0.0.1:{port}", f"--fdname={port}", "-E", f"PYTHONPATH={ROOT}",
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", "--logfile=-", "flexgw", "--conf", conf,
            "--access-log", "off", "--admin", "off",
        ]
        transport = reactor.spawnProcess(process, activate, args, env=dict(os.environ), path=directory)

        def cleanup() -> defer.Deferred[Any]:
            if not process.ended.called:
                transport.signalProcess("KILL")
            return process.ended

        self.addCleanup(cleanup)
        await process.listening  # bound by systemd-socket-activate, before twistd runs
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(GET)
        response = await conn.read_final_response()
        self.assertEqual(response.status, 200, process.output.decode(errors="replace"))
        self.assertIn(b"inherited from systemd", process.output)
        os.kill(transport.pid, signal.SIGTERM)
        await process.ended


class SocketUnitTests(TestCase):
    """systemd/flexgw.socket: named sockets for flexgw.service."""

    UNIT = os.path.join(ROOT, "systemd", "flexgw.socket")

    def test_streams_named_by_port(self) -> None:
        """Every ListenStream port has a FileDescriptorName that maps to that port."""
        with open(self.UNIT, encoding="utf-8") as handle:
            lines = [line.strip() for line in handle]
        values = [line.split("=", 1) for line in lines if "=" in line and not line.startswith("#")]
        streams = [v for k, v in values if k == "ListenStream"]
        names = [v for k, v in values if k == "FileDescriptorName"]
        self.assertEqual(dict(values)["Service"], "flexgw.service")
        self.assertTrue(streams)
        sock = listening_socket()
        self.addCleanup(sock.close)
        start = pass_fds(self, [sock] * len(names))
        pool = InheritedSockets(environ(len(names), names), start=start)
        self.assertEqual(
            [s.name_port() for s in pool.sockets], [int(stream.rsplit(":", 1)[-1]) for stream in streams]
        )

    def test_systemd_analyze_verify(self) -> None:
        """`systemd-analyze verify` accepts the socket unit (with the service unit beside it)."""
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed")
        import subprocess

        directory = tempfile.mkdtemp(prefix="flexgw-unit-")
        self.addCleanup(shutil.rmtree, directory, True)
        for name in ("flexgw.socket", "flexgw.service"):
            with open(os.path.join(ROOT, "systemd", name), encoding="utf-8") as handle:
                text = handle.read().replace("/opt/flexgw/bin/twistd", shutil.which("true") or "/bin/true")
            with open(os.path.join(directory, name), "w", encoding="utf-8") as handle:
                handle.write(text)
        result = subprocess.run(
            [analyze, "verify", os.path.join(directory, "flexgw.socket")],
            capture_output=True, text=True, timeout=60, check=False,
        )
        self.assertEqual((result.returncode, result.stderr.strip()), (0, ""))
