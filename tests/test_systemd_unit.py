"""systemd/flexgw.service: a notify service whose stop timeout covers the drain time."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from twisted.trial.unittest import SkipTest, TestCase

from flexgw.service.gateway import DRAIN_SECONDS

UNIT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "systemd", "flexgw.service")


def settings() -> dict[str, str]:
    """The unit's `Key=value` lines (last one wins, as systemd reads them)."""
    found: dict[str, str] = {}
    with open(UNIT, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line and not line.startswith(("#", ";", "[")) and "=" in line:
                key, value = line.split("=", 1)
                found[key.strip()] = value.strip()
    return found


class UnitTests(TestCase):
    """The unit file asks for what the gateway provides."""

    def test_notify_watchdog_and_hardening(self) -> None:
        """Type=notify with NotifyAccess=main, a watchdog, reload by SIGHUP, hardening kept."""
        unit = settings()
        self.assertEqual(unit["Type"], "notify")
        self.assertEqual(unit["NotifyAccess"], "main")
        self.assertEqual(unit["WatchdogSec"], "30")
        self.assertEqual(unit["ExecReload"], "/bin/kill -HUP $MAINPID")
        for key, value in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ]:
            self.assertEqual(unit[key], value)

    def test_stop_timeout_above_drain_time(self) -> None:
        """TimeoutStopSec leaves the drain time (--drain-seconds, or the default) room to end."""
        unit = settings()
        words = unit["ExecStart"].split()
        drain = DRAIN_SECONDS
        if "--drain-seconds" in words:
            drain = float(words[words.index("--drain-seconds") + 1])
        self.assertGreater(float(unit["TimeoutStopSec"]), drain + 5)

    def test_workers_supervisor_alone_gets_sigterm(self) -> None:
        """--workers auto under KillMode=mixed (SIGTERM to the supervisor only, which drains its
        workers), and TimeoutStopSec above the supervisor's own kill deadline."""
        from flexgw.service.workers import KILL_GRACE

        unit = settings()
        words = unit["ExecStart"].split()
        self.assertEqual(words[words.index("--workers") + 1], "auto")
        self.assertEqual(unit["KillMode"], "mixed")
        drain = float(words[words.index("--drain-seconds") + 1])
        self.assertGreater(float(unit["TimeoutStopSec"]), drain + KILL_GRACE)

    def test_flexgw_reactor(self) -> None:
        """The unit runs twistd on flexgw's reactor plug-in (named before the subcommand)."""
        words = settings()["ExecStart"].split()
        self.assertEqual(words[words.index("--reactor") + 1], "flexgw")
        self.assertLess(words.index("--reactor"), words.index("flexgw", words.index("--reactor") + 2))

    def test_systemd_analyze_verify(self) -> None:
        """`systemd-analyze verify` finds nothing wrong (twistd stubbed: it is not installed here)."""
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed")
        directory = tempfile.mkdtemp(prefix="flexgw-unit-")
        self.addCleanup(shutil.rmtree, directory, True)
        with open(UNIT, encoding="utf-8") as handle:
            text = handle.read().replace("/opt/flexgw/bin/twistd", shutil.which("true") or "/bin/true")
        path = os.path.join(directory, "flexgw.service")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        result = subprocess.run(
            [analyze, "verify", path], capture_output=True, text=True, timeout=60, check=False
        )
        self.assertEqual((result.returncode, result.stderr.strip()), (0, ""))
