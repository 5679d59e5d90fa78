"""`twistd flexgw` when a port it wants is taken: one clear log line, no traceback, and the
gateway serves everything else (the README's second gateway next to `make run`)."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import PROCESS_TEST_TIMEOUT, api_document, free_port
from tests.test_admin import get, probe_config
from tests.test_sigterm import start_twistd, write_conf


def occupy(case: TestCase) -> int:
    """A loopback port held by a listening socket of this test (a real "address in use")."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    case.addCleanup(sock.close)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return int(sock.getsockname()[1])


class PortsInUseTests(TestCase):
    """The admin port and one ApiInstance port are held by another process's sockets."""

    timeout = PROCESS_TEST_TIMEOUT  # (a hang guard: tests.harness)

    async def test_admin_and_listener_ports_in_use(self) -> None:
        """The admin port in use is one error line naming `--admin off` and `--admin tcp:PORT`;
        a listener port in use is one line naming its ApiInstance; the other listener serves,
        readiness says 503, and nothing prints a traceback."""
        upstream = RecordingUpstream(reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        directory = tempfile.mkdtemp(prefix="flexgw-use-")  # short: AF_UNIX path limit
        self.addCleanup(shutil.rmtree, directory, True)
        admin, taken = occupy(self), occupy(self)
        free, probe = free_port(), free_port()
        conf = write_conf(
            directory,
            api_document(free, upstream.address[1], "served-api")
            + "---\n" + api_document(taken, upstream.address[1], "blocked-api")
            + "---\n" + probe_config(probe),
        )
        started = await start_twistd(
            self, directory, conf, "--admin", f"tcp:{admin}:interface=127.0.0.1"
        )
        response = await client.request(reactor, "127.0.0.1", free, get("/hello"))
        self.assertEqual(
            response.status, 200, response.body + started.process.output  # who answered, and why
        )
        readiness = await client.request(reactor, "127.0.0.1", probe, get("/probes/readiness"))
        self.assertEqual(readiness.status, 503, readiness.body)
        self.assertIn(f"127.0.0.1:{taken}", json.dumps(json.loads(readiness.body)))
        output = (await started.process.wait_output(b"Cannot listen on")).decode(errors="replace")
        admin_lines = [line for line in output.splitlines() if f"tcp:{admin}:" in line]
        self.assertEqual(len(admin_lines), 1, output)
        self.assertIn("Address already in use. The gateway serves its listeners", admin_lines[0])
        self.assertIn("--admin off", admin_lines[0])
        self.assertIn("--admin tcp:PORT:interface=127.0.0.1", admin_lines[0])
        listener_lines = [line for line in output.splitlines() if "Cannot listen on" in line]
        self.assertEqual(len(listener_lines), 1, output)
        self.assertIn(f"127.0.0.1:{taken} (ApiInstance default/blocked-api)", listener_lines[0])
        self.assertIn("the other listeners keep serving", listener_lines[0])
        self.assertNotIn("Traceback", output)
        self.assertNotIn("Unhandled Error", output)
