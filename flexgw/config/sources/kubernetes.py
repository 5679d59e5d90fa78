"""The Kubernetes API source, first part: list-then-watch of one collection, with treq on the
injected reactor (no threads).

`CollectionWatch` keeps the objects of one collection (e.g. `/apis/networking.k8s.io/v1/
ingresses`) the way client-go's reflector does: list (paginated, `limit`/`continue`), then watch
from the list's `resourceVersion` with `allowWatchBookmarks` and a per-watch `timeoutSeconds`
(and a local deadline a little later, should the server not end it); a watch that ends is
resumed from the last version seen; `410 Gone` (a Status on list, an ERROR event on watch)
re-lists; any other failure (connection refused or lost, a 5xx, 401/403, a garbage line, an
unknown event type) backs off exponentially with jitter and tries again. Its `documents()` are
source-neutral `Document`s whose origin is "Kind namespace/name" (no line marks: an API object
has none).

`KubernetesSource` is the `ConfigSource` over every collection flexgw reads: Ingress,
IngressClass, v1 Service, EndpointSlice, the Flex CRDs (`gateway.mulesoft.com`), each cluster-wide
or in the namespaces given, and only the `kubernetes.io/tls` Secrets the Ingresses reference, each
watched by name (`fieldSelector=metadata.name=...`; no cluster-wide Secret cache). Its watcher
debounces changes and calls back once every collection has listed, so a reload applies one
consistent view; its status says whether the API server answers; with a state directory, what it
hands to the pipeline is snapshotted, and a restart serves that snapshot until the API answers."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlencode

import treq
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from flexgw.config.sources import Document, Snapshot, Unit
from flexgw.config.sources.state import Debouncer, SourceStatus, read_snapshot, write_snapshot
from flexgw.plan import Problem

log = Logger()

Obj = dict[str, Any]

BACKOFF_INITIAL = 0.8  # client-go's reflector: 800ms doubling to 30s, jitter 1.0
BACKOFF_MAX = 30.0
BACKOFF_JITTER = 1.0
WATCH_TIMEOUT = 300.0  # seconds the server is asked to keep one watch open
WATCH_GRACE = 30.0  # the local deadline is this much later than the server's
PAGE_LIMIT = 500
MAX_EVENT_BYTES = 16 * 1024 * 1024


class GoneError(Exception):
    """The version asked for was compacted away (410): the collection must be listed again."""


class WatchProblem(Exception):
    """A watch stream said something a client cannot follow (garbage, an unknown event type)."""


class _EventLines(Protocol):
    """Receives a watch response body and hands each JSON line to `on_event`."""

    def __init__(self, on_event: Callable[[Obj], None], done: Deferred[None]) -> None:
        self.on_event = on_event
        self.done = done
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\n" not in data:
            if len(self.buffer) > MAX_EVENT_BYTES:
                self._fail(WatchProblem(f"an event longer than {MAX_EVENT_BYTES} bytes"))
            return
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError as exc:
                self._fail(WatchProblem(f"not a JSON event: {exc}"))
                return
            try:
                if not isinstance(event, dict):
                    raise WatchProblem("an event that is not a JSON object")
                self.on_event(event)
            except (WatchProblem, GoneError) as exc:
                self._fail(exc)
                return

    def _fail(self, exc: Exception) -> None:
        if not self.done.called:
            self.done.errback(exc)
        if self.transport is not None:
            self.transport.stopProducing()  # drop the connection: nothing more from it

    def connectionLost(self, reason: Failure = ResponseDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(None)
        else:
            self.done.errback(reason)


class CollectionWatch:
    """List-then-watch of one collection; `objects` holds it ("namespace/name" -> object)."""

    def __init__(
        self,
        reactor: Any,
        client: Any,  # a treq HTTPClient (its Agent's TLS trusts the cluster CA)
        server: str,  # https://host:port
        path: str,  # /api/v1/services, /apis/networking.k8s.io/v1/namespaces/NS/ingresses
        token: Callable[[], str | None] = lambda: None,  # asked at each request (rotation)
        on_change: Callable[[], Any] = lambda: None,
        on_state: Callable[[str], Any] = lambda state: None,  # listing/watching/waiting/stopped
        on_answer: Callable[[], Any] = lambda: None,  # the server answered a list or watch (200)
        field_selector: str | None = None,  # e.g. "metadata.name=web-tls": one object by name
        watch_timeout: float = WATCH_TIMEOUT,
        watch_grace: float = WATCH_GRACE,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.reactor = reactor
        self.client = client
        self.url = server.rstrip("/") + path
        self.token = token
        self.on_change = on_change
        self.on_state = on_state
        self.on_answer = on_answer
        self.field_selector = field_selector
        self.watch_timeout = watch_timeout
        self.watch_grace = watch_grace
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.jitter = jitter
        self.objects: dict[str, Obj] = {}
        self.resource_version: str | None = None
        self.state = "stopped"  # listing, watching, waiting, stopped
        self.synced = False  # a list has completed at least once
        self.failures = 0  # consecutive failures (the backoff exponent)
        self.counts = {"lists": 0, "watches": 0, "relists_gone": 0, "errors": 0, "bad_events": 0}
        self.last_error: str | None = None
        self._item_kind: tuple[str, str] | None = None  # (apiVersion, kind) from the list
        self._pending: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None
        self._request: Deferred[Any] | None = None
        self._stream: _EventLines | None = None

    # -- control
    def start(self) -> None:
        """List, then watch, until stopped."""
        if self.state == "stopped":
            self._list()

    def stop(self) -> None:
        """Stop: cancel the pending retry and drop the open request or watch."""
        self._set_state("stopped")
        for call in (self._pending, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._pending = self._deadline = None
        if self._request is not None:
            self._request.cancel()
        if self._stream is not None and self._stream.transport is not None:
            self._stream.transport.stopProducing()

    def documents(self) -> list[Document]:
        """The objects as source-neutral documents, in namespace/name order."""
        return [
            Document(origin=f"{obj.get('kind')} {key}", index=0, value=obj)
            for key, obj in sorted(self.objects.items())
        ]

    # -- requests
    def _headers(self) -> dict[str, list[str]]:
        headers = {"Accept": ["application/json"]}
        token = self.token()
        if token:
            headers["Authorization"] = [f"Bearer {token}"]
        return headers

    def _query(self, query: dict[str, Any]) -> str:
        if self.field_selector:
            query = {**query, "fieldSelector": self.field_selector}
        return self.url + "?" + urlencode(query)

    async def _get_json(self, query: dict[str, Any]) -> Obj:
        url = self._query(query)
        self._request = self.client.get(url, headers=self._headers())
        try:
            response = await self._request
            self._request = treq.content(response)
            body = await self._request
        finally:
            self._request = None
        try:
            value = json.loads(body)
        except ValueError:
            value = None
        if response.code == 410:
            raise GoneError(str(value.get("message") if isinstance(value, dict) else "410 Gone"))
        if response.code != 200 or not isinstance(value, dict):
            message = value.get("message") if isinstance(value, dict) else None
            raise RuntimeError(f"{response.code} from the API server: {message or 'no Status'}")
        self._answered()
        return value

    def _list(self) -> None:
        self._set_state("listing")
        Deferred.fromCoroutine(self._do_list()).addErrback(self._failed, "list")

    async def _do_list(self) -> None:
        objects: dict[str, Obj] = {}
        query: dict[str, Any] = {"limit": PAGE_LIMIT}
        while True:
            page = await self._get_json(query)
            self._item_kind = self._kind_of(page)
            for item in page.get("items") or ():
                if isinstance(item, dict):
                    item = self._with_kind(item)
                    objects[self._key(item)] = item
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                break
            query = {"limit": PAGE_LIMIT, "continue": token}
        if self.state == "stopped":
            return
        self.counts["lists"] += 1
        self.objects = objects
        self.resource_version = str((page.get("metadata") or {}).get("resourceVersion") or "")
        self.synced = True
        self.failures = 0
        self._changed()
        self._watch()

    def _watch(self) -> None:
        if self.state == "stopped":
            return
        self._set_state("watching")
        self.counts["watches"] += 1
        Deferred.fromCoroutine(self._do_watch()).addCallbacks(self._watch_ended, self._failed, errbackArgs=("watch",))

    async def _do_watch(self) -> None:
        query = {
            "watch": "1",
            "resourceVersion": self.resource_version or "",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": _seconds(self.watch_timeout),
        }
        url = self._query(query)
        self._deadline = self.reactor.callLater(self.watch_timeout + self.watch_grace, self._overdue)
        try:
            self._request = self.client.get(url, headers=self._headers(), unbuffered=True)
            response = await self._request
            self._request = None
            if response.code == 410:
                raise GoneError("410 Gone")
            if response.code != 200:
                await treq.content(response)
                raise RuntimeError(f"{response.code} from the API server on watch")
            self._answered()
            done: Deferred[None] = Deferred()
            self._stream = _EventLines(self._event, done)
            response.deliverBody(self._stream)
            await done
        finally:
            self._request = None
            self._stream = None
            if self._deadline is not None and self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _overdue(self) -> None:
        """The server kept the watch open past its timeout: drop it (resumed at once)."""
        self._deadline = None
        log.info("watch on {url} overran its timeout; reconnecting", url=self.url)
        stream = self._stream
        if stream is not None and stream.transport is not None:
            stream.done.callback(None)  # an ended watch: resumed at once, not a failure
            stream.transport.stopProducing()
        elif self._request is not None:
            self._request.cancel()

    def _event(self, event: Obj) -> None:
        type_ = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            raise WatchProblem(f"event {type_!r} without an object")
        if type_ == "ERROR":
            if obj.get("code") == 410:
                raise GoneError(str(obj.get("message") or "410 Gone"))
            raise WatchProblem(f"watch error: {obj.get('message') or obj.get('reason')}")
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if type_ == "BOOKMARK":
            if version:
                self.resource_version = str(version)
            return
        if type_ not in ("ADDED", "MODIFIED", "DELETED"):
            raise WatchProblem(f"unknown watch event type {type_!r}")
        obj = self._with_kind(obj)
        key = self._key(obj)
        if type_ == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        if version:
            self.resource_version = str(version)
        self._changed()

    # -- outcomes
    def _watch_ended(self, _: object) -> None:
        """A watch that ends (its timeout) is resumed from the last version, at once."""
        self.failures = 0
        self._watch()

    def _failed(self, failure: Failure, what: str) -> None:
        if self.state == "stopped":
            return
        if failure.check(GoneError):
            self.counts["relists_gone"] += 1
            log.info("{url}: {what} version gone ({why}); listing again", url=self.url, what=what,
                     why=failure.getErrorMessage())
            self.resource_version = None
            self._list()
            return
        if failure.check(WatchProblem):
            self.counts["bad_events"] += 1
        self.counts["errors"] += 1
        self.last_error = f"{what}: {failure.getErrorMessage() or failure.type.__name__}"
        delay = self._backoff()
        log.warn("{url}: {error}; retrying in {delay:.1f}s", url=self.url, error=self.last_error, delay=delay)  # noqa: G010
        self._set_state("waiting")
        retry = self._watch if (what == "watch" and self.synced) else self._list
        self._pending = self.reactor.callLater(delay, retry)

    def _set_state(self, state: str) -> None:
        self.state = state
        try:
            self.on_state(state)
        except Exception:  # noqa: BLE001 - an observer must not stop the watch
            log.failure("Kubernetes watch state callback failed")

    def _backoff(self) -> float:
        base = min(self.backoff_max, self.backoff_initial * (2 ** self.failures))
        self.failures += 1
        return base * (1 + BACKOFF_JITTER * self.jitter())

    def _answered(self) -> None:
        try:
            self.on_answer()
        except Exception:  # noqa: BLE001 - an observer must not stop the watch
            log.failure("Kubernetes answer callback failed")

    def _changed(self) -> None:
        try:
            self.on_change()
        except Exception:  # noqa: BLE001 - a failing consumer must not stop the watch
            log.failure("Kubernetes change callback failed")

    # -- objects
    @staticmethod
    def _kind_of(page: Obj) -> tuple[str, str] | None:
        kind = page.get("kind")
        if isinstance(kind, str) and kind.endswith("List") and len(kind) > 4:
            return str(page.get("apiVersion") or ""), kind[: -len("List")]
        return None

    def _with_kind(self, obj: Obj) -> Obj:
        """The object with kind and apiVersion (a built-in list's items omit them)."""
        if ("kind" not in obj or "apiVersion" not in obj) and self._item_kind is not None:
            api_version, kind = self._item_kind
            obj = {"apiVersion": api_version, "kind": kind, **obj}
        return obj

    @staticmethod
    def _key(obj: Obj) -> str:
        metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        name = str(metadata.get("name", ""))
        namespace = metadata.get("namespace")
        return f"{namespace}/{name}" if namespace else name


def _seconds(value: float) -> str:
    """timeoutSeconds as the API takes it (an integer, at least 1)."""
    return str(max(1, int(value)))


FLEX_GROUP = "gateway.mulesoft.com"
FLEX_VERSION = "v1alpha1"  # the CRDs serve v1alpha1 and v1beta1 alike; one is watched
FLEX_PLURALS = ("apiinstances", "services", "policybindings", "configurations")
SNAPSHOT_NAME = "kubernetes"


def collection_paths(namespaces: Sequence[str], flex_version: str = FLEX_VERSION) -> list[str]:
    """The collections watched: namespaced kinds per namespace (or cluster-wide), IngressClasses."""
    namespaced = [
        ("/apis/networking.k8s.io/v1", "ingresses"),
        ("/api/v1", "services"),
        ("/apis/discovery.k8s.io/v1", "endpointslices"),
        *((f"/apis/{FLEX_GROUP}/{flex_version}", plural) for plural in FLEX_PLURALS),
    ]
    paths = []
    for prefix, plural in namespaced:
        if namespaces:
            paths.extend(f"{prefix}/namespaces/{ns}/{plural}" for ns in namespaces)
        else:
            paths.append(f"{prefix}/{plural}")
    paths.append("/apis/networking.k8s.io/v1/ingressclasses")
    return paths


def referenced_secrets(objects: Iterable[Obj]) -> set[tuple[str, str]]:
    """(namespace, name) of every Secret an Ingress names in `spec.tls[].secretName`."""
    wanted = set()
    for obj in objects:
        if obj.get("kind") != "Ingress":
            continue
        namespace = str((obj.get("metadata") or {}).get("namespace") or "default")
        spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
        for item in spec.get("tls") or ():
            if isinstance(item, dict) and isinstance(item.get("secretName"), str) and item["secretName"]:
                wanted.add((namespace, item["secretName"]))
    return wanted


class KubernetesSource:
    """The Kubernetes API as a ConfigSource (see the module docstring)."""

    name = SNAPSHOT_NAME

    def __init__(
        self,
        reactor: Any,
        connection: Any,  # flexgw.config.sources.kubeconnect.Connection
        namespaces: Sequence[str] = (),
        state_dir: str | None = None,
        flex_version: str = FLEX_VERSION,
        wall: Callable[[], float] = time.time,
        **watch_options: Any,  # CollectionWatch options: backoff_initial, watch_timeout, jitter, ...
    ) -> None:
        self.reactor = reactor
        self.connection = connection
        self.namespaces = tuple(namespaces)
        self.state_dir = state_dir
        self.watch_options = watch_options
        self.status = SourceStatus(f"kubernetes {connection.server}", wall=wall)
        self.collections = [self._collection(path) for path in collection_paths(self.namespaces, flex_version)]
        self.secrets: dict[tuple[str, str], CollectionWatch] = {}
        self._debounce: Debouncer | None = None
        self._running = False
        self._snapshot: Snapshot | None = None
        self._snapshot_logged = False
        self._snapshot_failed = False
        if state_dir is not None:
            found = read_snapshot(state_dir, SNAPSHOT_NAME)
            if found is not None:
                self._snapshot, written = found
                self.status.from_snapshot = f"{state_dir} (written {written})"

    def _collection(self, path: str, selector: str | None = None) -> CollectionWatch:
        return CollectionWatch(
            self.reactor,
            self.connection.client,
            self.connection.server,
            path,
            token=self.connection.token,
            on_change=self._changed,
            on_state=self._state,
            on_answer=self.status.up,
            field_selector=selector,
            **self.watch_options,
        )

    # -- ConfigSource
    @property
    def synced(self) -> bool:
        """Every collection (and every referenced Secret) has listed at least once."""
        return all(c.synced for c in self.collections) and all(c.synced for c in self.secrets.values())

    def documents(self) -> list[Document]:
        """Every watched object, Secrets included, as documents."""
        documents: list[Document] = []
        for collection in [*self.collections, *self.secrets.values()]:
            documents.extend(collection.documents())
        return documents

    def ingresses(self) -> list[Obj]:
        """The watched Ingress objects (for the Ingress status writer)."""
        return [obj for c in self.collections if c.url.endswith("/ingresses") for obj in c.objects.values()]

    def read(self) -> Snapshot:
        """The objects now; before the first complete sync, the state-dir snapshot (or nothing)."""
        if not self.synced:
            if self._snapshot is not None:
                if not self._snapshot_logged:
                    self._snapshot_logged = True
                    log.warn(  # noqa: G010
                        "The Kubernetes API server has not answered yet: serving the snapshot of"
                        " the last applied resources from {where}",
                        where=self.status.from_snapshot,
                    )
                return self._snapshot
            return Snapshot((), (Problem("info", "waiting for the first list from the API server",
                                         file=self.status.name),))
        documents = self.documents()
        self._snapshot = None
        if self.state_dir is not None:
            written = write_snapshot(self.state_dir, SNAPSHOT_NAME, documents, quiet=self._snapshot_failed)
            self._snapshot_failed = written is None  # warned once until it works again
        return Snapshot(tuple(Unit(d.origin, (d,), (), False) for d in documents))

    def statuses(self) -> list[SourceStatus]:
        """This source's connection status (counters summed over its collections)."""
        totals: dict[str, int] = {}
        for collection in [*self.collections, *self.secrets.values()]:
            for key, value in collection.counts.items():
                totals[key] = totals.get(key, 0) + value
        self.status.counts = totals
        return [self.status]

    def watcher(
        self,
        reactor: Any,
        on_change: Callable[[], Any],
        debounce_seconds: float,
        extra_files: Callable[[], Iterable[str]] | None = None,
    ) -> KubernetesSource:
        """Watch every collection; `on_change` runs debounced once all have listed."""
        self._debounce = Debouncer(reactor, debounce_seconds, on_change)
        return self

    def start(self) -> None:
        """Start listing and watching."""
        self._running = True
        for collection in self.collections:
            collection.start()

    def stop(self) -> None:
        """Stop every watch and drop a pending callback."""
        self._running = False
        if self._debounce is not None:
            self._debounce.cancel()
        for collection in [*self.collections, *self.secrets.values()]:
            collection.stop()

    # -- events
    def _state(self, state: str) -> None:
        if state == "waiting":
            errors = [c.last_error for c in [*self.collections, *self.secrets.values()]
                      if c.state == "waiting" and c.last_error]
            self.status.down(errors[0] if errors else "unreachable")

    def _changed(self) -> None:
        if not self._running:
            return
        self._follow_secrets()
        if self.synced and self._debounce is not None:
            self._debounce.changed()

    def _follow_secrets(self) -> None:
        """Watch each referenced Secret by name; stop watching those no longer referenced."""
        objects = [obj for c in self.collections for obj in c.objects.values()]
        wanted = referenced_secrets(objects)
        for key in [k for k in self.secrets if k not in wanted]:
            self.secrets.pop(key).stop()
        for namespace, name in sorted(wanted - set(self.secrets)):
            watch = self._collection(f"/api/v1/namespaces/{namespace}/secrets", f"metadata.name={name}")
            self.secrets[(namespace, name)] = watch
            watch.start()
