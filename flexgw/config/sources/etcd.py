"""The etcd source: resources kept as keys under a prefix, ranged once, then watched.

Layout: `<prefix>/resources/<group>/<kind>/<namespace>/<name>`, where `<group>` is the
apiVersion's group (`gateway.mulesoft.com`; `networking.k8s.io`; `core` for `v1`), and the value
is the resource as YAML or JSON. Each key is one `Unit` whose origin is the key, so a problem in
a value reads "<key>:<line>:<column>: ...". A key outside the layout, an unknown kind, a value
that is not UTF-8 YAML/JSON, holds more than one document, names another resource than its key,
or is larger than `max_value_bytes` is a failed unit: the problem is reported and the last good
resources of that key keep serving; nothing else changes and the watch goes on.

`EtcdWatcher` (what `EtcdSource.watcher()` returns) ranges the prefix (paged), then watches from
the range's `header.revision + 1`; every batch of events (etcd never splits one revision, so one
transaction arrives whole) updates the keys in memory and (re)starts the debounce; `read()`
hands the pipeline the keys at one revision, so an apply is seen whole or not at all. A watch
that breaks (its member died) is resumed from the last revision seen on the next endpoint; a
compacted revision re-ranges; when no endpoint answers the source is marked disconnected (the
last applied configuration keeps serving) and retried with a doubling delay.

With `state_dir`, every `read()` after a change writes the documents and their revision
atomically (`flexgw.config.sources.state`); a gateway started while etcd is unreachable serves
that snapshot and resumes the watch from its revision when etcd answers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from flexgw.config.kubernetes import KUBERNETES_API_VERSIONS
from flexgw.config.load import load_text, problem_at
from flexgw.config.sources import Snapshot, Unit
from flexgw.config.sources.etcd_client import EtcdClient, Event, Watch
from flexgw.config.sources.state import Debouncer, SourceStatus, read_snapshot, write_snapshot
from flexgw.config.validate import DEFAULT_NAMESPACE, KINDS, identify

log = Logger()

DEFAULT_PREFIX = "/flexgw"
#: etcd's default request bound (--max-request-bytes): no put of a larger value succeeds.
MAX_VALUE_BYTES = 1536 * 1024
FLEX_GROUP = "gateway.mulesoft.com"
CORE_GROUP = "core"
SNAPSHOT_NAME = "etcd"
RETRY_INITIAL = 0.2
RETRY_MAX = 5.0


def group_of(api_version: str) -> str:
    """The group part of an apiVersion ("gateway.mulesoft.com/v1alpha1" -> "gateway.mulesoft.com";
    "v1" -> "core")."""
    return api_version.split("/", 1)[0] if "/" in api_version else CORE_GROUP


#: (group, kind) of every kind a key may name.
KNOWN_KINDS: frozenset[tuple[str, str]] = frozenset(
    {(FLEX_GROUP, kind) for kind in KINDS.values()}
    | {(group_of(version), kind) for kind, version in KUBERNETES_API_VERSIONS.items()}
)


def normalise_prefix(prefix: str) -> str:
    """`prefix` with one leading slash and no trailing one ("flexgw/" -> "/flexgw")."""
    return "/" + prefix.strip("/") if prefix.strip("/") else ""


def resources_prefix(prefix: str) -> str:
    """Where resources live under `prefix` ("/flexgw" -> "/flexgw/resources/")."""
    return normalise_prefix(prefix) + "/resources/"


def gateways_prefix(prefix: str) -> str:
    """Where gateways report their status under `prefix`."""
    return normalise_prefix(prefix) + "/gateways/"


@attrs.frozen
class KeyName:
    """What a resource key names."""

    group: str
    kind: str
    namespace: str
    name: str


def resource_key(prefix: str, value: Any) -> str | None:
    """The key a resource document belongs at (None: it lacks apiVersion, kind or name)."""
    if not isinstance(value, dict) or not isinstance(value.get("apiVersion"), str):
        return None
    kind, name, namespace = identify(value)
    if kind is None or name is None:
        return None
    return f"{resources_prefix(prefix)}{group_of(value['apiVersion'])}/{kind}/{namespace}/{name}"


def parse_key(resources: str, key: str) -> KeyName | str:
    """The resource `key` names under `resources` (a resources prefix), or why it cannot."""
    rest = key[len(resources):] if key.startswith(resources) else None
    parts = rest.split("/") if rest is not None else []
    if len(parts) != 4 or not all(parts):
        return f"key outside the layout {resources}<group>/<kind>/<namespace>/<name>"
    group, kind, namespace, name = parts
    if (group, kind) not in KNOWN_KINDS:
        known = ", ".join(sorted(f"{g}/{k}" for g, k in KNOWN_KINDS))
        return f"unknown kind {group}/{kind} in the key (known: {known})"
    return KeyName(group, kind, namespace, name)


def value_unit(resources: str, key: str, value: bytes, max_bytes: int = MAX_VALUE_BYTES) -> Unit:
    """Parse one key's value into a Unit whose origin is the key (a value without a namespace
    takes the key's); never raises."""
    named = parse_key(resources, key)
    if isinstance(named, str):
        return _failed(key, named)
    if len(value) > max_bytes:
        return _failed(key, f"value of {len(value)} bytes is larger than {max_bytes} bytes")
    try:
        text = value.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return _failed(key, f"value is not UTF-8 text (byte {exc.start})")
    unit = load_text(text, key)
    if unit.failed:
        return unit
    if len(unit.documents) != 1:
        found = len(unit.documents)
        return _failed(key, f"a key holds exactly one resource as YAML or JSON; found {found}")
    document = unit.documents[0]
    if not isinstance(document.value, dict):
        return unit  # the pipeline's checks say what is wrong with it
    kind, name, namespace = identify(document.value)
    api_version = document.value.get("apiVersion")
    metadata = document.value.get("metadata")
    written = metadata.get("namespace") if isinstance(metadata, dict) else None
    for field, found_value, expected in (
        (("kind",), kind, named.kind),
        (("metadata", "name"), name, named.name),
        (("metadata", "namespace"), namespace if written else None, named.namespace),
        (("apiVersion",), group_of(api_version) if isinstance(api_version, str) else None, named.group),
    ):
        if found_value is not None and found_value != expected:
            what = ".".join(str(p) for p in field)
            problem = document.problem(
                "error", f"{what} {found_value!r} does not match the key's {expected!r}", field
            )
            return Unit(key, (), (*unit.problems, problem), True)
    if not written and named.namespace != DEFAULT_NAMESPACE and isinstance(metadata, dict):
        value = {**document.value, "metadata": {**metadata, "namespace": named.namespace}}
        return attrs.evolve(unit, documents=(attrs.evolve(document, value=value),))
    return unit


def _failed(key: str, message: str) -> Unit:
    return Unit(key, (), (problem_at(message, key, None),), True)


class EtcdSource:
    """The resources under `prefix` in the etcd `client` talks to, as a ConfigSource.

    `read()` is synchronous: it renders the keys held in memory (filled by the watcher, or by
    the state-dir snapshot before etcd first answers) at one revision. `applied_revision` is the
    revision the last `read()` handed out; `status` says whether etcd answers and since when."""

    snapshot_name = SNAPSHOT_NAME

    def __init__(
        self,
        client: EtcdClient,
        prefix: str = DEFAULT_PREFIX,
        state_dir: str | None = None,
        max_value_bytes: int = MAX_VALUE_BYTES,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.prefix = normalise_prefix(prefix)
        self.resources = resources_prefix(prefix)
        self.state_dir = state_dir
        self.max_value_bytes = max_value_bytes
        self.values: dict[str, bytes] = {}
        self.revision = 0  # the store revision `values` reflect (0: nothing read yet)
        self.synced = False  # ranged from etcd at least once
        self.applied_revision = 0
        self.status = SourceStatus("etcd " + ",".join(client.endpoints), wall)
        self._units: dict[str, tuple[bytes, Unit]] = {}  # parse cache by key
        self._restore_tried = False
        self._written = 0  # revision of the last snapshot written

    # -- what the watcher feeds in -----------------------------------------------------------

    def replace(self, values: dict[str, bytes], revision: int) -> None:
        """A whole range at `revision`."""
        self.values = values
        self.revision = revision
        self.synced = True

    def apply_events(self, events: Iterable[Event], revision: int) -> None:
        """One watch batch (whole revisions) in order."""
        for event in events:
            key = event.kv.key.decode("utf-8", "replace")
            if event.type == "DELETE":
                self.values.pop(key, None)
            else:
                self.values[key] = event.kv.value
        self.revision = max(self.revision, revision)

    # -- ConfigSource --------------------------------------------------------------------------

    def read(self) -> Snapshot:
        """Every key under the prefix as a unit, in key order, at one revision; never raises."""
        if not self.synced and not self._restore_tried:
            self._restore()
        units = []
        cache: dict[str, tuple[bytes, Unit]] = {}
        for key in sorted(self.values):
            value = self.values[key]
            cached = self._units.get(key)
            unit = cached[1] if cached is not None and cached[0] == value else None
            if unit is None:
                unit = value_unit(self.resources, key, value, self.max_value_bytes)
            cache[key] = (value, unit)
            units.append(unit)
        self._units = cache
        self.applied_revision = self.revision
        if self.state_dir is not None and self.synced and self.revision != self._written:
            documents = [d for unit in units for d in unit.documents]
            if write_snapshot(self.state_dir, self.snapshot_name, documents,
                              position=str(self.revision)) is not None:
                self._written = self.revision
        return Snapshot(tuple(units), position=str(self.revision) if self.revision else None)

    def _restore(self) -> None:
        """Before etcd first answers: the keys and revision of the state-dir snapshot."""
        self._restore_tried = True
        if self.state_dir is None:
            return
        stored = read_snapshot(self.state_dir, self.snapshot_name)
        if stored is None:
            return
        snapshot, written = stored
        if not snapshot.position:
            return
        self.values = {
            unit.origin: json.dumps(document.value).encode("utf-8")
            for unit in snapshot.units
            for document in unit.documents
        }
        self.revision = int(snapshot.position)
        self._written = self.revision
        self.status.from_snapshot = f"{self.state_dir} (revision {self.revision}, written {written})"
        log.info(
            "etcd source: serving the snapshot of revision {revision} ({count} key(s), written"
            " {written}) until etcd answers",
            revision=self.revision,
            count=len(self.values),
            written=written,
        )

    def statuses(self) -> tuple[SourceStatus, ...]:
        """The connection status of this source."""
        return (self.status,)

    def watcher(
        self,
        reactor: Any,
        on_change: Callable[[], Any],
        debounce_seconds: float,
        extra_files: Callable[[], Iterable[str]] | None = None,
        **options: Any,
    ) -> EtcdWatcher:
        """An EtcdWatcher (`options`: retry_initial, retry_max)."""
        return EtcdWatcher(reactor, self, on_change, debounce_seconds, **options)


class EtcdWatcher:
    """Keeps an EtcdSource in step with etcd: range, watch, resume, re-range, retry.

    The first range after start (or after etcd came back) calls `on_change` at once; changes
    seen by the watch call it once they settle (`debounce_seconds`)."""

    def __init__(
        self,
        reactor: IReactorTime,
        source: EtcdSource,
        on_change: Callable[[], Any],
        debounce_seconds: float,
        retry_initial: float = RETRY_INITIAL,
        retry_max: float = RETRY_MAX,
    ) -> None:
        self.reactor = reactor
        self.source = source
        self.on_change = on_change
        self.debounce = Debouncer(reactor, debounce_seconds, on_change)
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.running = False
        self.watch: Watch | None = None
        self._loop: defer.Deferred[None] | None = None
        self._sleep: IDelayedCall | None = None
        self._waiting: defer.Deferred[None] | None = None
        self.ranges = 0  # how many times the prefix was ranged (compaction, first start)
        self.endpoint: str | None = None  # where the last watch was created

    def start(self) -> None:
        """Begin following etcd."""
        self.running = True
        self._loop = defer.Deferred.fromCoroutine(self._run())
        self._loop.addErrback(self._stopped)

    def _stopped(self, failure: Any) -> None:
        if not failure.check(defer.CancelledError):
            log.failure("etcd watcher stopped", failure)

    def stop(self) -> None:
        """Stop following etcd; no callback after this."""
        self.running = False
        self.debounce.cancel()
        if self.watch is not None:
            self.watch.cancel()
            self.watch = None
        if self._sleep is not None and self._sleep.active():
            self._sleep.cancel()
        self._sleep = None
        waiting, self._waiting = self._waiting, None
        if waiting is not None and not waiting.called:
            waiting.callback(None)
        loop, self._loop = self._loop, None
        if loop is not None and not loop.called:
            loop.cancel()

    async def _run(self) -> None:
        source = self.source
        client = source.client
        delay = self.retry_initial
        must_range = source.revision == 0
        while self.running:
            try:
                if must_range:
                    await self._range()
                    must_range = False
                watch = await client.watch_prefix(
                    source.resources.encode("utf-8"),
                    self._events,
                    start_revision=source.revision + 1,
                )
            except defer.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - unavailable, refused, a bad answer: retry
                if not self.running:
                    return
                source.status.count("errors")
                source.status.down(str(error))
                await self._pause(delay)
                delay = min(delay * 2, self.retry_max)
                continue
            if not self.running:
                watch.cancel()
                return
            self.watch = watch
            self.endpoint = watch.endpoint
            source.synced = True  # following etcd from a known revision
            source.status.up()
            delay = self.retry_initial
            try:
                end = await watch.done
            except Exception as error:  # noqa: BLE001 - the stream broke: resume on the next endpoint
                self.watch = None
                if not self.running:
                    return
                log.info("etcd watch on {endpoint} ended ({error}); resuming from revision {rev}",
                         endpoint=watch.endpoint, error=str(error), rev=source.revision + 1)
                continue
            self.watch = None
            if end.reason == "compacted":
                source.status.count("compactions")
                log.info("etcd revision {rev} was compacted (now {compacted}); ranging again",
                         rev=source.revision + 1, compacted=end.compact_revision)
                must_range = True
            elif end.reason == "cancelled":
                return

    async def _range(self) -> None:
        """Read every key under the prefix at one revision, page by page, and apply it."""
        source = self.source
        result = await source.client.range_all(source.resources.encode("utf-8"))
        first = not source.synced and source.revision == 0
        values = {kv.key.decode("utf-8", "replace"): kv.value for kv in result.kvs}
        changed = values != source.values or first
        source.replace(values, result.revision)
        self.ranges += 1
        source.status.up()
        if changed:
            self.debounce.cancel()
            self._notify()

    def _notify(self) -> None:
        try:
            self.on_change()
        except Exception:  # noqa: BLE001 - a failing reload must not stop the watcher
            log.failure("configuration reload callback failed")

    def _events(self, events: list[Event], revision: int) -> None:
        if not self.running:
            return
        self.source.apply_events(events, revision)
        self.debounce.changed()

    def _pause(self, seconds: float) -> defer.Deferred[None]:
        waiting: defer.Deferred[None] = defer.Deferred()
        self._waiting = waiting

        def wake() -> None:
            self._sleep = None
            if not waiting.called:
                waiting.callback(None)

        self._sleep = self.reactor.callLater(seconds, wake)
        return waiting


def make_client(
    reactor: Any,
    endpoints: Iterable[str],
    *,
    cacert: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    user: str | None = None,
    password: str | None = None,
    timeout: float = 5.0,
) -> EtcdClient:
    """An EtcdClient for `endpoints` with the files `--etcd-cacert/--etcd-cert/--etcd-key` name
    (read now; OSError when one cannot be read) and password authentication."""
    from flexgw.tls.contexts import SideCallTLSPolicy
    from flexgw.tls.settings import CertificateKey, TLSSettings

    def read(path: str) -> bytes:
        with open(path, "rb") as handle:
            return handle.read()

    policy = None
    if cacert is not None or cert is not None:
        certificate = None
        if cert is not None:
            certificate = CertificateKey((read(cert),), read(key if key is not None else cert))
        policy = SideCallTLSPolicy(
            TLSSettings(
                certificate=certificate,
                trusted_ca=(read(cacert),) if cacert is not None else None,
                alpn=("http/1.1",),
            )
        )
    return EtcdClient(
        reactor,
        [url.strip() for url in endpoints if url.strip()],
        timeout=timeout,
        user=user,
        password=password,
        tls_policy=policy,
    )
