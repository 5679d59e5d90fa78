"""tests.harness.free_port(): a port handed out to one test process is not handed out to
another (suites of several checkouts run at once on one machine)."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from tests.harness import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FreePortTests(SynchronousTestCase):
    """free_port() across processes."""

    def test_another_process_skips_a_port_handed_out_here(self) -> None:
        """Another process probing from exactly the port this one was just given (free, not
        bound yet: its gateway is still compiling) takes the next one instead."""
        port = free_port()
        code = (
            "from tests import harness\n"
            f"harness._port_slice = ({port}, {port + 50})\n"
            f"harness._next_port = {port}\n"
            "print(harness.free_port())\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code],
            check=False,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        other = int(done.stdout)
        self.assertNotEqual(other, port)
        self.assertTrue(port < other < port + 50, other)
