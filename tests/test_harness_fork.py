"""The test process forks children safely while grpcio's threads run (tests/__init__.py turns
grpcio's fork support off: with it on, about one child in seven died of SIGABRT before exec)."""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import TestCase

from tests.extauthz_server import GrpcAuthzServer


class _Child(protocol.ProcessProtocol):
    """Collects a child's output; `ended` fires with (exit code, signal, output)."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred[tuple[Any, Any, bytes]] = defer.Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        """Keep stdout and stderr."""
        self.output += data

    def processEnded(self, reason: Any) -> None:
        """Report how it ended."""
        self.ended.callback((reason.value.exitCode, reason.value.signal, self.output))


class ForkWhileGrpcRunsTests(TestCase):
    """spawnProcess with a working directory (so Twisted forks rather than posix_spawn)."""

    timeout = 120

    async def test_children_start_while_a_grpcio_server_runs(self) -> None:
        """Twenty children forked while a grpcio server serves all run and exit 0."""
        server = GrpcAuthzServer().start()
        self.addCleanup(server.stop)
        directory = tempfile.mkdtemp(prefix="flexgw-fork-")
        self.addCleanup(os.rmdir, directory)
        outcomes = []
        for _ in range(20):
            child = _Child()
            reactor.spawnProcess(  # type: ignore[attr-defined]
                child, sys.executable, [sys.executable, "-c", "print('started')"],
                env=dict(os.environ), path=directory,
            )
            outcomes.append(await child.ended)
        failed = [o for o in outcomes if o[:2] != (0, None) or o[2].strip() != b"started"]
        self.assertEqual(failed, [])
