"""Source-neutral helpers every remote config source shares (Kubernetes API, etcd): a change
debouncer, a connection status, and the state-directory snapshot of the last applied resources.

- `Debouncer`: `changed()` (re)starts a timer on the injected reactor; the callback runs once
  things settle (`FLEX_SYNC_DEBOUNCE_TIME`). The file watcher uses it too.
- `SourceStatus`: whether a remote source is connected, since when (wall-clock seconds), the last
  error and counters; `/status` shows `as_json()`, `/metrics` exports it. Losing the source does
  not change readiness: the last applied configuration keeps serving.
- `write_snapshot` / `read_snapshot`: the documents a source last handed to the pipeline, written
  atomically (temporary file, fsync, rename, fsync of the directory) to
  `<state-dir>/<name>.json`, so that a restart while the source is unreachable starts from them.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from flexgw.config.sources import Document, Snapshot, Unit

log = Logger()

DEFAULT_STATE_DIR = "/var/lib/flexgw"
SNAPSHOT_FORMAT = 1


class Debouncer:
    """Runs `callback()` `delay` seconds after the last `changed()` (each call restarts the wait)."""

    def __init__(self, reactor: IReactorTime, delay: float, callback: Callable[[], Any]) -> None:
        self.reactor = reactor
        self.delay = delay
        self.callback = callback
        self._pending: IDelayedCall | None = None

    @property
    def pending(self) -> bool:
        """Whether a callback is waiting to run."""
        return self._pending is not None and self._pending.active()

    def changed(self) -> None:
        """Note a change: (re)start the timer."""
        if self._pending is not None and self._pending.active():
            self._pending.reset(self.delay)
            return
        self._pending = self.reactor.callLater(self.delay, self._fire)

    def cancel(self) -> None:
        """Drop the pending callback, if any."""
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None

    def _fire(self) -> None:
        self._pending = None
        try:
            self.callback()
        except Exception:  # noqa: BLE001 - a failing reload must not stop the watcher
            log.failure("configuration reload callback failed")


@attrs.define
class SourceStatus:
    """The connection state of one remote source (e.g. "kubernetes https://10.0.0.1:443")."""

    name: str
    wall: Callable[[], float] = time.time
    connected: bool = False
    since: float | None = None  # wall-clock seconds of the last change of `connected`
    last_error: str | None = None
    from_snapshot: str | None = None  # the snapshot file served from, until the source answers
    counts: dict[str, int] = attrs.field(factory=dict)

    def up(self) -> None:
        """The source answered: connected (since now, when it was not)."""
        if not self.connected or self.since is None:
            if self.since is not None:
                log.info("Config source {name} connected again", name=self.name)
            self.connected = True
            self.since = self.wall()
        self.from_snapshot = None

    def down(self, error: str) -> None:
        """The source failed: disconnected (since now, when it was connected)."""
        self.last_error = error
        if self.connected or self.since is None:
            if self.connected:
                log.warn(  # noqa: G010 - twisted.logger.Logger has warn
                    "Config source {name} disconnected ({error}); the last applied configuration"
                    " keeps serving",
                    name=self.name,
                    error=error,
                )
            self.connected = False
            self.since = self.wall()

    def count(self, what: str, n: int = 1) -> None:
        """Add `n` to counter `what`."""
        self.counts[what] = self.counts.get(what, 0) + n

    def as_json(self) -> dict[str, Any]:
        """What /status shows."""
        out: dict[str, Any] = {
            "source": self.name,
            "connected": self.connected,
            "since": _iso(self.since) if self.since is not None else None,
            "sinceSeconds": self.since,
        }
        if self.last_error is not None:
            out["lastError"] = self.last_error
        if self.from_snapshot is not None:
            out["fromSnapshot"] = self.from_snapshot
        if self.counts:
            out["counts"] = dict(self.counts)
        return out


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def snapshot_path(state_dir: str, name: str) -> str:
    """The snapshot file of source `name` (a file-name-safe word: "kubernetes", "etcd")."""
    return os.path.join(state_dir, f"{name}.json")


def write_snapshot(
    state_dir: str,
    name: str,
    documents: Iterable[Document],
    wall: float | None = None,
    position: str | None = None,
    quiet: bool = False,
) -> str | None:
    """Write the documents (origin and value) and the source's `position` (an etcd revision, a
    resourceVersion) atomically; the path, or None after logging why not (`quiet`: not logged,
    e.g. after the first failure)."""
    path = snapshot_path(state_dir, name)
    body = {
        "position": position,
        "format": SNAPSHOT_FORMAT,
        "source": name,
        "written": _iso(time.time() if wall is None else wall),
        "documents": [{"origin": d.origin, "value": d.value} for d in documents],
    }
    data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=state_dir)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(state_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        if quiet:
            return None
        log.warn(  # noqa: G010
            "Cannot write the {name} snapshot to {path}: {error}", name=name, path=path, error=exc
        )
        return None
    return path


def read_snapshot(state_dir: str, name: str) -> tuple[Snapshot, str] | None:
    """The snapshot of source `name` as units (one per document) and when it was written, or None
    (no snapshot, or one that cannot be read: logged)."""
    path = snapshot_path(state_dir, name)
    try:
        with open(path, "rb") as handle:
            body = json.loads(handle.read())
        documents = body["documents"]
        if body.get("format") != SNAPSHOT_FORMAT or not isinstance(documents, list):
            raise ValueError("unknown snapshot format")
        units = tuple(
            Unit(str(d["origin"]), (Document(str(d["origin"]), 0, d["value"]),), (), False)
            for d in documents
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warn("Cannot read the {name} snapshot {path}: {error}", name=name, path=path, error=exc)  # noqa: G010
        return None
    position = body.get("position")
    return Snapshot(units, position=str(position) if position is not None else None), str(
        body.get("written")
    )

