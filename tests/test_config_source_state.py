"""Tests of the source-neutral state helpers (flexgw.config.sources.state): the debouncer, the
connection status, and the atomic state-directory snapshot."""

from __future__ import annotations

import json
import os
import tempfile

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from flexgw.config.sources import Document
from flexgw.config.sources.state import (
    Debouncer,
    SourceStatus,
    read_snapshot,
    snapshot_path,
    write_snapshot,
)


class DebouncerTests(TestCase):
    """Changes close together run the callback once, after the last one settles."""

    def test_restarts_on_each_change(self) -> None:
        """Three changes 0.5s apart with a 1s delay: one callback, 1s after the last."""
        clock = Clock()
        calls: list[float] = []
        debounce = Debouncer(clock, 1.0, lambda: calls.append(clock.seconds()))
        for _ in range(3):
            debounce.changed()
            clock.advance(0.5)
        self.assertEqual(calls, [])
        self.assertTrue(debounce.pending)
        clock.advance(0.5)
        self.assertEqual(calls, [2.0])
        self.assertFalse(debounce.pending)

    def test_cancel_and_failing_callback(self) -> None:
        """cancel() drops the call; a raising callback is logged and the next change still runs."""
        clock = Clock()
        calls: list[int] = []

        def callback() -> None:
            calls.append(1)
            raise RuntimeError("boom")

        debounce = Debouncer(clock, 1.0, callback)
        debounce.changed()
        debounce.cancel()
        clock.advance(5)
        self.assertEqual(calls, [])
        debounce.changed()
        clock.advance(1)
        debounce.changed()
        clock.advance(1)
        self.assertEqual(calls, [1, 1])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)


class SourceStatusTests(TestCase):
    """Connected/disconnected with the time of the last change, as /status shows it."""

    def test_since_changes_only_on_transitions(self) -> None:
        """down() twice keeps the first time; up() records when it came back."""
        now = [1000.0]
        status = SourceStatus("kubernetes https://x", wall=lambda: now[0])
        status.up()
        self.assertEqual((status.connected, status.since), (True, 1000.0))
        now[0] = 1010.0
        status.down("connection refused")
        now[0] = 1020.0
        status.down("connection refused again")
        self.assertEqual((status.connected, status.since), (False, 1010.0))
        self.assertEqual(status.last_error, "connection refused again")
        body = status.as_json()
        self.assertEqual(body["since"], "1970-01-01T00:16:50Z")
        self.assertFalse(body["connected"])
        now[0] = 1030.0
        status.up()
        self.assertEqual((status.connected, status.since), (True, 1030.0))


class SnapshotTests(TestCase):
    """The snapshot round-trips, is replaced atomically, and a bad one is None (logged)."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.state = os.path.join(self.dir, "state")  # created by the first write

    def test_round_trip(self) -> None:
        """Documents written come back as one unit each, with origin and value."""
        docs = [
            Document("Ingress default/web", 0, {"kind": "Ingress", "metadata": {"name": "web"}}),
            Document("Service default/web", 0, {"kind": "Service"}),
        ]
        path = write_snapshot(self.state, "kubernetes", docs, wall=0)
        self.assertEqual(path, snapshot_path(self.state, "kubernetes"))
        self.assertEqual(os.listdir(self.state), ["kubernetes.json"])  # no temporary file left
        got = read_snapshot(self.state, "kubernetes")
        assert got is not None
        snapshot, written = got
        self.assertEqual(written, "1970-01-01T00:00:00Z")
        self.assertEqual(
            [(u.origin, u.documents[0].value) for u in snapshot.units],
            [(d.origin, d.value) for d in docs],
        )

    def test_missing_and_garbage(self) -> None:
        """No file: None quietly; a truncated file: None with a warning."""
        self.assertIsNone(read_snapshot(self.state, "etcd"))
        os.makedirs(self.state)
        with open(snapshot_path(self.state, "etcd"), "w") as handle:
            handle.write('{"format": 1, "documents": [')
        self.assertIsNone(read_snapshot(self.state, "etcd"))
        with open(snapshot_path(self.state, "etcd"), "w") as handle:
            json.dump({"format": 99, "documents": []}, handle)
        self.assertIsNone(read_snapshot(self.state, "etcd"))

    def test_unwritable_dir(self) -> None:
        """A state dir that cannot be created: None, logged, nothing raised."""
        blocker = os.path.join(self.dir, "file")
        with open(blocker, "w"):
            pass
        self.assertIsNone(write_snapshot(os.path.join(blocker, "sub"), "kubernetes", []))
