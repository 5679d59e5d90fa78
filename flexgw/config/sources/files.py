"""The file source: YAML resource files below configuration directories, read and watched.

`FileSource(conf_dirs)` is one `ConfigSource`: `read()` finds every *.yaml / *.yml file below
each directory (sorted, symlink loops and duplicates skipped) and parses each into a `Unit`
whose origin is the file's path, so problems read "file:line:column: ...". `watcher()` watches
the directories (inotify, else polling) and calls back, debounced, when YAML changes."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from flexgw.config.load import load_text, problem_at
from flexgw.config.sources import Snapshot, Unit
from flexgw.config.sources.state import Debouncer
from flexgw.plan import Problem

log = Logger()

YAML_SUFFIXES = (".yaml", ".yml")
MAX_FILE_BYTES = 16 * 1024 * 1024

DEFAULT_DEBOUNCE = 5.0
DEFAULT_POLL_INTERVAL = 2.0
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}

Fingerprint = frozenset[tuple[str, int, int]]


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string ("5s", "500ms", "1m30s", "0"); raises ValueError."""
    text = text.strip()
    if text in ("0", "+0"):
        return 0.0
    body = text.removeprefix("+")
    if not body:
        raise ValueError("empty duration")
    total = 0.0
    position = 0
    for match in _DURATION_PART.finditer(body):
        if match.start() != position:
            raise ValueError(f"invalid duration {text!r}")
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position != len(body):
        raise ValueError(f"invalid duration {text!r}")
    return total


def debounce_from_env(environ: Mapping[str, str]) -> float:
    """`FLEX_SYNC_DEBOUNCE_TIME` in seconds (default 5s; invalid values warn and use the default)."""
    text = environ.get("FLEX_SYNC_DEBOUNCE_TIME")
    if text is None or not text.strip():
        return DEFAULT_DEBOUNCE
    try:
        return parse_go_duration(text)
    except ValueError:
        log.warn(  # noqa: G010 - twisted.logger.Logger has warn, not warning
            "FLEX_SYNC_DEBOUNCE_TIME={value!r} is not a Go duration (e.g. 5s, 500ms); using 5s",
            value=text,
        )
        return DEFAULT_DEBOUNCE


def fingerprint(conf_dirs: Iterable[str]) -> Fingerprint:
    """(path, mtime_ns, size) of every YAML file below the directories."""
    paths: list[str] = []
    for conf_dir in conf_dirs:
        if os.path.isfile(conf_dir):
            paths.append(conf_dir)
        else:
            paths.extend(
                os.path.join(dirpath, name)
                for dirpath, _, names in os.walk(conf_dir, followlinks=True)
                for name in names
                if name.endswith(YAML_SUFFIXES)
            )
    return files_fingerprint(paths)


def files_fingerprint(paths: Iterable[str]) -> Fingerprint:
    """(path, mtime_ns, size) of each file that exists (a missing file is simply absent)."""
    entries: set[tuple[str, int, int]] = set()
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        entries.add((path, st.st_mtime_ns, st.st_size))
    return frozenset(entries)


class ConfigWatcher:
    """Calls `on_change()` once things settle after YAML files below `conf_dirs` change.

    Uses twisted.internet.inotify (recursive, new directories added) when `use_inotify` is not
    False and it is available, and polls a fingerprint of the files otherwise. Every change
    (re)starts a `debounce_seconds` timer on the injected reactor; `on_change` runs when it fires.

    `extra_files` (a callable, asked at every poll) names further files to watch wherever they
    are, e.g. the TLS certificates and keys the running plan read: they are polled every
    `poll_interval`, whatever the mode.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        conf_dirs: Iterable[str],
        on_change: Callable[[], Any],
        debounce_seconds: float = DEFAULT_DEBOUNCE,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        use_inotify: bool | None = None,
        extra_files: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        self.reactor = reactor
        self.conf_dirs = [os.fspath(d) for d in conf_dirs]
        self.on_change = on_change
        self.debounce_seconds = debounce_seconds
        self.poll_interval = poll_interval
        self.use_inotify = use_inotify
        self.mode: str | None = None  # "inotify" or "poll" once started
        self._debounce = Debouncer(reactor, debounce_seconds, on_change)
        self._poller: LoopingCall | None = None
        self._notifier: Any = None
        self._last: Fingerprint = frozenset()
        self.extra_files = extra_files
        self._extra_poller: LoopingCall | None = None
        self._extra_last: Fingerprint = frozenset()

    def start(self) -> None:
        """Begin watching (inotify when possible, else polling)."""
        self._last = fingerprint(self.conf_dirs)
        if self.extra_files is not None:
            self._extra_last = files_fingerprint(self.extra_files())
            self._extra_poller = LoopingCall(self._poll_extra)
            self._extra_poller.clock = self.reactor
            self._extra_poller.start(self.poll_interval, now=False)
        if self.use_inotify is not False and self._start_inotify():
            self.mode = "inotify"
            return
        self.mode = "poll"
        self._poller = LoopingCall(self._poll)
        self._poller.clock = self.reactor
        self._poller.start(self.poll_interval, now=False)

    def stop(self) -> None:
        """Stop watching and drop any pending callback."""
        self._debounce.cancel()
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        self._poller = None
        if self._extra_poller is not None and self._extra_poller.running:
            self._extra_poller.stop()
        self._extra_poller = None
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None

    def _start_inotify(self) -> bool:
        try:
            from twisted.internet import inotify
        except ImportError:
            return False
        notifier = None
        try:
            notifier = inotify.INotify(reactor=self.reactor)
            notifier.startReading()
            mask = (
                inotify.IN_CREATE
                | inotify.IN_MODIFY
                | inotify.IN_CLOSE_WRITE
                | inotify.IN_DELETE
                | inotify.IN_MOVED_FROM
                | inotify.IN_MOVED_TO
                | inotify.IN_DELETE_SELF
                | inotify.IN_MOVE_SELF
                | inotify.IN_ATTRIB
            )
            for conf_dir in self.conf_dirs:
                notifier.watch(
                    FilePath(conf_dir),
                    mask=mask,
                    autoAdd=True,
                    callbacks=[self._inotify_event],
                    recursive=True,
                )
        except Exception:  # noqa: BLE001 - no inotify here, a missing dir, out of watches
            log.info("inotify unavailable for {dirs}; polling instead", dirs=self.conf_dirs)
            if notifier is not None:
                notifier.loseConnection()
            return False
        self._notifier = notifier
        return True

    def _inotify_event(self, _watch: object, path: FilePath[str], _mask: int) -> None:
        name = path.basename()
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        if name.endswith(YAML_SUFFIXES) or path.isdir() or not path.exists():
            self.changed()

    def _poll(self) -> None:
        current = fingerprint(self.conf_dirs)
        if current != self._last:
            self._last = current
            self.changed()

    def _poll_extra(self) -> None:
        assert self.extra_files is not None
        current = files_fingerprint(self.extra_files())
        if current != self._extra_last:
            self._extra_last = current
            self.changed()

    def changed(self) -> None:
        """Note a change: (re)start the debounce timer."""
        self._debounce.changed()


def load_file(path: str | os.PathLike[str]) -> Unit:
    """Read and parse one file; never raises."""
    name = str(path)
    try:
        with open(path, "rb") as handle:
            # Check the size first: read(n) would allocate n bytes up front for every file.
            if os.fstat(handle.fileno()).st_size > MAX_FILE_BYTES:
                return Unit(
                    name,
                    (),
                    (problem_at(f"file larger than {MAX_FILE_BYTES} bytes", name, None),),
                    True,
                )
            data = handle.read()
    except OSError as exc:
        return Unit(
            name, (), (problem_at(f"cannot read file: {exc.strerror}", name, None),), True
        )
    if len(data) > MAX_FILE_BYTES:
        return Unit(
            name, (), (problem_at(f"file larger than {MAX_FILE_BYTES} bytes", name, None),), True
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        message = f"not UTF-8 text (byte {exc.start})"
        return Unit(name, (), (problem_at(message, name, None),), True)
    return load_text(text, name)


def discover_files(conf_dirs: Iterable[str | os.PathLike[str]]) -> tuple[list[str], list[Problem]]:
    """Every *.yaml / *.yml file below each directory, recursively, sorted per directory."""
    files: list[str] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    for conf_dir in conf_dirs:
        root = Path(conf_dir)
        if root.is_file():
            candidates = [root]
        elif root.is_dir():
            candidates = []
            visited: set[str] = set()
            for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
                real_dir = os.path.realpath(dirpath)
                if real_dir in visited:  # a symlink loop
                    dirnames[:] = []
                    continue
                visited.add(real_dir)
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for filename in filenames:
                    if filename.endswith(YAML_SUFFIXES) and not filename.startswith("."):
                        candidates.append(Path(dirpath) / filename)
            candidates.sort(key=lambda p: p.relative_to(root).parts)
        else:
            problems.append(problem_at("configuration directory not found", str(root), None))
            continue
        for candidate in candidates:
            real = os.path.realpath(candidate)
            if real in seen:
                continue
            seen.add(real)
            files.append(str(candidate))
    return files, problems


@attrs.frozen
class FileSource:
    """The configuration directories (or single files) given with --conf, as a ConfigSource."""

    conf_dirs: Sequence[str] = attrs.field(converter=lambda dirs: tuple(os.fspath(d) for d in dirs))

    def read(self) -> Snapshot:
        """Every YAML file below the directories, parsed, in order; never raises."""
        files, problems = discover_files(self.conf_dirs)
        return Snapshot(tuple(load_file(path) for path in files), tuple(problems))

    def watcher(
        self,
        reactor: IReactorTime,
        on_change: Callable[[], Any],
        debounce_seconds: float = DEFAULT_DEBOUNCE,
        extra_files: Callable[[], Iterable[str]] | None = None,
        **options: Any,
    ) -> ConfigWatcher:
        """A ConfigWatcher on the directories (`options`: poll_interval, use_inotify)."""
        return ConfigWatcher(
            reactor, self.conf_dirs, on_change, debounce_seconds, extra_files=extra_files, **options
        )
