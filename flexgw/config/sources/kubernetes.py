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
has none). Not wired into the gateway yet (see issue 13)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import treq
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from flexgw.config.sources import Document

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

    async def _get_json(self, query: dict[str, Any]) -> Obj:
        url = self.url + "?" + urlencode(query)
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
        url = self.url + "?" + urlencode(query)
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
