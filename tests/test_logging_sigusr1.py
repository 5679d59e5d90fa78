"""`twistd flexgw`: log files reopened on SIGUSR1 (logrotate's postrotate), the runtime level."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream, fixed
from tests.harness import PROCESS_TEST_TIMEOUT, api_document, free_port
from tests.test_sigterm import Process, start_twistd, write_conf

LEVEL_ERROR = (
    "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: Configuration\nmetadata: {name: logs}\n"
    "spec:\n  logging:\n    runtimeLogs: {logLevel: error}\n"
)
GET = b"GET /%s HTTP/1.1\r\nHost: example.test\r\n\r\n"


def paths(path: str) -> list[str]:
    """The request paths of the access-log lines in `path`."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)["path"] for line in handle]


class SigusrTests(TestCase):
    """The real twistd process: the SIGUSR1 handler and the log level tap.py install."""

    # A hang guard, not a bound on the behaviour: starting twistd (about 1.3 s of CPU to import
    # and compile) took over 5 s at a load average of 15 on two cores; each test starts one.
    timeout = PROCESS_TEST_TIMEOUT

    async def start(self, extra: str = "", options: tuple[str, ...] = ()) -> tuple[Process, Any, int, str]:
        """Start an upstream and twistd in front of it (config + `extra` documents); wait for
        READY=1. Returns (process, transport, port, access-log path)."""
        upstream = RecordingUpstream(fixed(200), reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        directory = tempfile.mkdtemp(prefix="flexgw-usr1-")  # short: AF_UNIX path limit
        self.addCleanup(shutil.rmtree, directory, True)
        port = free_port()
        conf = write_conf(directory, api_document(port, upstream.address[1]) + extra)
        access = os.path.join(directory, "access.log")
        started = await start_twistd(self, directory, conf, "--access-log", access, *options)
        return started.process, started.transport, port, access

    async def stop(self, transport: Any, process: Process) -> bytes:
        """SIGTERM; wait for the exit; the output."""
        transport.signalProcess("TERM")
        await process.ended
        return process.output

    async def test_config_level_applies(self) -> None:
        """logLevel: error in a Configuration silences the gateway's info lines."""
        process, transport, _, _ = await self.start(LEVEL_ERROR)
        output = await self.stop(transport, process)
        self.assertNotIn(b"[flexgw#info]", output)

    async def test_log_level_option_wins(self) -> None:
        """--log-level info overrides the configured logLevel: error."""
        process, transport, _, _ = await self.start(LEVEL_ERROR, ("--log-level", "info"))
        self.assertIn(b"[flexgw#info] Listening on", await self.stop(transport, process))

    async def test_log_level_option_filters(self) -> None:
        """--log-level error filters the info lines (no Configuration level)."""
        process, transport, _, _ = await self.start("", ("--log-level", "error"))
        self.assertNotIn(b"[flexgw#info]", await self.stop(transport, process))

    async def test_sigusr1_reopens_access_log(self) -> None:
        """Request, move the file, SIGUSR1, request, stop: each file has its own line."""
        process, transport, port, access = await self.start()
        response = await client.request(reactor, "127.0.0.1", port, GET % b"before")
        self.assertEqual(response.status, 200)
        os.rename(access, access + ".1")
        reopened = process.wait_output(b"Log files reopened")
        os.kill(transport.pid, signal.SIGUSR1)
        outcome = await defer.DeferredList(
            [reopened, process.ended], fireOnOneCallback=True, consumeErrors=True
        )
        if outcome[1] == 1:  # e.g. no handler: SIGUSR1's default action ends the process
            self.fail("twistd ended on SIGUSR1:\n" + process.output.decode(errors="replace"))
        response = await client.request(reactor, "127.0.0.1", port, GET % b"after")
        self.assertEqual(response.status, 200)
        await self.stop(transport, process)  # stopping flushes the access log
        self.assertEqual(paths(access + ".1"), ["/before"])
        self.assertEqual(paths(access), ["/after"])
