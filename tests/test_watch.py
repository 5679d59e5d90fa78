"""Tests for flexgw.config.sources.files: Go durations, polling, debouncing (with a fake clock)."""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from flexgw.config.sources.files import ConfigWatcher, debounce_from_env, parse_go_duration
from tests.conftools import update_conf, write_conf


class DurationTests(SynchronousTestCase):
    """FLEX_SYNC_DEBOUNCE_TIME parsing."""

    def test_go_durations(self) -> None:
        """Go duration strings parse to seconds."""
        self.assertEqual(parse_go_duration("5s"), 5.0)
        self.assertEqual(parse_go_duration("500ms"), 0.5)
        self.assertEqual(parse_go_duration("1m30s"), 90.0)
        self.assertEqual(parse_go_duration("1.5h"), 5400.0)
        self.assertEqual(parse_go_duration("0"), 0.0)
        self.assertAlmostEqual(parse_go_duration("250us"), 0.00025)

    def test_invalid(self) -> None:
        """Bare numbers, unknown units and junk are rejected."""
        for text in ("5", "5x", "s", "-1s", "1s junk", ""):
            self.assertRaises(ValueError, parse_go_duration, text)

    def test_from_env(self) -> None:
        """Default 5s; a valid value is used; an invalid one falls back to 5s."""
        self.assertEqual(debounce_from_env({}), 5.0)
        self.assertEqual(debounce_from_env({"FLEX_SYNC_DEBOUNCE_TIME": "500ms"}), 0.5)
        self.assertEqual(debounce_from_env({"FLEX_SYNC_DEBOUNCE_TIME": "soon"}), 5.0)


class PollingWatcherTests(TestCase):
    """The polling path, driven by a fake clock."""

    def setUp(self) -> None:
        self.root = write_conf(self, {"a.yaml": "a: 1\n"})
        self.clock = Clock()
        self.calls: list[int] = []
        self.watcher = ConfigWatcher(
            self.clock,
            [self.root],
            lambda: self.calls.append(1),
            debounce_seconds=5.0,
            poll_interval=1.0,
            use_inotify=False,
        )
        self.watcher.start()
        self.addCleanup(self.watcher.stop)

    def touch(self, name: str, text: str) -> None:
        """Write a file and push its mtime forward so the fingerprint changes."""
        update_conf(self.root, {name: text})
        path = os.path.join(self.root, name)
        stat = os.stat(path)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + len(self.calls) + 10**9))

    def test_mode(self) -> None:
        """use_inotify=False polls."""
        self.assertEqual(self.watcher.mode, "poll")

    def test_no_change_no_call(self) -> None:
        """Nothing changes: no callback."""
        self.clock.advance(60)
        self.assertEqual(self.calls, [])

    def test_change_debounced(self) -> None:
        """A change is noticed at the next poll and reported once the debounce time passed."""
        self.touch("a.yaml", "a: 2\n")
        self.clock.advance(1)  # poll sees the change
        self.clock.advance(4.9)
        self.assertEqual(self.calls, [])
        self.clock.advance(0.2)
        self.assertEqual(self.calls, [1])

    def test_burst_coalesced(self) -> None:
        """Changes during the debounce window restart it and produce one call."""
        self.touch("a.yaml", "a: 2\n")
        self.clock.advance(1)
        self.clock.advance(3)
        self.touch("sub/b.yml", "b: 1\n")
        self.clock.advance(1)  # poll sees the new file: timer restarts
        self.clock.advance(4.5)
        self.assertEqual(self.calls, [])
        self.clock.advance(1)
        self.assertEqual(self.calls, [1])

    def test_non_yaml_ignored(self) -> None:
        """Files that are not YAML do not trigger a reload."""
        update_conf(self.root, {"notes.txt": "x"})
        self.clock.advance(30)
        self.assertEqual(self.calls, [])

    def test_stop_cancels_pending(self) -> None:
        """stop() drops a pending callback."""
        self.touch("a.yaml", "a: 3\n")
        self.clock.advance(1)
        self.watcher.stop()
        self.clock.advance(30)
        self.assertEqual(self.calls, [])
