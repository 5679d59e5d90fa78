"""A faithful in-test Kubernetes API server on Twisted (loopback only), for the Kubernetes source.

It implements what a controller relies on, from the published API conventions
(https://kubernetes.io/docs/reference/using-api/api-concepts/):

- REST paths `/api/v1/...` and `/apis/GROUP/VERSION/...`, namespaced (`namespaces/NS/PLURAL`)
  and all-namespaces (`PLURAL`) collections, objects, and the `status` subresource;
  legacy discovery (`/api`, `/apis`, `/api/v1`, `/apis/G/V`) so that `kubectl` can talk to it.
- get, list, watch, create (POST), update (PUT), merge patch (PATCH), delete; every write bumps
  one cluster-wide `resourceVersion`; `metadata.generation` counts spec changes.
- list with `resourceVersion` and `limit`/`continue` pagination (each page from the snapshot of
  the first; a continue token older than the compaction point is `410 Gone`, reason Expired).
  Items of a built-in list omit their kind and apiVersion, as the API server's JSON does; CRD
  list items carry them.
- watch (`?watch=1&resourceVersion=..&allowWatchBookmarks=true&timeoutSeconds=..`) as a chunked
  stream of JSON events, one per line: ADDED, MODIFIED, DELETED, BOOKMARK; without a
  resourceVersion (or "0") it starts with a synthetic ADDED per object; a version older than the
  compaction point (`compact()`) yields one ERROR event carrying a 410 Status, then the end.
- `fieldSelector=metadata.name=NAME` on list and watch (one object by name, as a controller
  watches a referenced Secret without a cluster-wide cache).
- bearer-token auth: 401 without a known token, 403 for a verb the token's role lacks.
- optimistic concurrency: an update carrying a stale `metadata.resourceVersion` is 409 Conflict;
  the `status` subresource changes only `status`, the main resource never changes it.
- Leases (`coordination.k8s.io/v1`) like any namespaced object, for leader election.

Tests drive it in code (`KubeAPI.store` to add objects behind a watcher's back, `compact()`,
`cut_watches()`, `send_bookmarks()`, `set_token()`), or over HTTP as a client would.
"""

from __future__ import annotations

import base64
import copy
import json
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTCP, IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from flexgw.testing.certs import Issued, server_options

Obj = dict[str, Any]
Key = tuple[str, str, str, str]  # (group, resource plural, namespace or "", name)

VERBS = frozenset({"get", "list", "watch", "create", "update", "patch", "delete"})


@attrs.frozen
class Kind:
    """One resource type the server serves."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status: bool = False  # has a status subresource
    builtin: bool = True  # list items omit kind/apiVersion (CRD items keep them)

    @property
    def api_version(self) -> str:
        """`v1` or `group/version`."""
        return f"{self.group}/{self.version}" if self.group else self.version


KINDS: tuple[Kind, ...] = (
    Kind("", "v1", "namespaces", "Namespace", namespaced=False, status=True),
    Kind("", "v1", "services", "Service", status=True),
    Kind("", "v1", "endpoints", "Endpoints"),
    Kind("", "v1", "secrets", "Secret"),
    Kind("networking.k8s.io", "v1", "ingresses", "Ingress", status=True),
    Kind("networking.k8s.io", "v1", "ingressclasses", "IngressClass", namespaced=False),
    Kind("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice"),
    Kind("coordination.k8s.io", "v1", "leases", "Lease"),
    # what deploy/kubernetes/ installs (stored only, so `kubectl apply --dry-run` maps them)
    Kind("", "v1", "serviceaccounts", "ServiceAccount"),
    Kind("", "v1", "configmaps", "ConfigMap"),
    Kind("apps", "v1", "deployments", "Deployment", status=True),
    Kind("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", namespaced=False),
    Kind("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", namespaced=False),
    Kind("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    Kind("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    Kind("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
         namespaced=False, status=True),
    *(
        Kind("gateway.mulesoft.com", version, plural, kind, builtin=False)
        for version in ("v1alpha1", "v1beta1")
        for plural, kind in (
            ("apiinstances", "ApiInstance"),
            ("services", "Service"),
            ("policybindings", "PolicyBinding"),
            ("configurations", "Configuration"),
        )
    ),
)


def status(code: int, reason: str, message: str) -> Obj:
    """A `Status` object (the body of every failure, and of 410 watch errors)."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class APIError(Exception):
    """A request the API refuses: its HTTP code and Status body."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.body = status(code, reason, message)


@attrs.define
class Event:
    """One change in the store's history."""

    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    key: Key
    obj: Obj  # the object after the change (before, for DELETED: its last state)
    previous: Obj | None  # the object before the change (None for ADDED)


class Store:
    """The objects, one resourceVersion counter, and the event history since the compaction point."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.objects: dict[Key, Obj] = {}
        self.history: list[Event] = []
        self.rv = 1
        self.compacted = 1  # events after this version are kept; older versions are gone
        self.listeners: list[Callable[[Event], None]] = []

    # -- reads
    def state_at(self, rv: int) -> dict[Key, Obj]:
        """Every object as it was at version `rv` (410 when history before it was compacted)."""
        if rv < self.compacted:
            raise APIError(410, "Expired", f"too old resource version: {rv} ({self.compacted})")
        state = dict(self.objects)
        for event in reversed(self.history):
            if event.rv <= rv:
                break
            if event.previous is None:
                state.pop(event.key, None)
            else:
                state[event.key] = event.previous
        return state

    def events_after(self, rv: int) -> list[Event]:
        """The events after version `rv` (410 when some were compacted)."""
        if rv < self.compacted:
            raise APIError(410, "Expired", f"too old resource version: {rv} ({self.compacted})")
        return [event for event in self.history if event.rv > rv]

    # -- writes
    def _record(self, type_: str, key: Key, obj: Obj, previous: Obj | None) -> Obj:
        event = Event(self.rv, type_, key, obj, previous)
        self.history.append(event)
        for listener in list(self.listeners):
            listener(event)
        return obj

    def _now(self) -> str:
        when = datetime.fromtimestamp(self.clock.seconds(), UTC)
        return when.strftime("%Y-%m-%dT%H:%M:%SZ")

    def create(self, kind: Kind, namespace: str, obj: Obj) -> Obj:
        """Add a new object (409 AlreadyExists when it does)."""
        obj = copy.deepcopy(obj)
        metadata = obj.setdefault("metadata", {})
        name = metadata.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(422, "Invalid", f"{kind.kind}: metadata.name: Required value")
        if kind.namespaced:
            metadata["namespace"] = namespace
        else:
            metadata.pop("namespace", None)
        key = (kind.group, kind.plural, namespace if kind.namespaced else "", name)
        if key in self.objects:
            raise APIError(409, "AlreadyExists", f'{kind.plural} "{name}" already exists')
        self.rv += 1
        obj["apiVersion"] = kind.api_version
        obj["kind"] = kind.kind
        metadata.update(
            uid=str(uuid.uuid4()),
            resourceVersion=str(self.rv),
            creationTimestamp=self._now(),
            generation=1,
        )
        if kind.status:
            obj.setdefault("status", {})
        self.objects[key] = obj
        return self._record("ADDED", key, obj, None)

    def update(self, kind: Kind, key: Key, obj: Obj, subresource: str = "") -> Obj:
        """Replace an object (or only its status), checking a given resourceVersion (409 if stale)."""
        current = self.objects.get(key)
        if current is None:
            raise APIError(404, "NotFound", f'{kind.plural} "{key[3]}" not found')
        metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        given = metadata.get("resourceVersion")
        if given not in (None, "") and str(given) != current["metadata"]["resourceVersion"]:
            raise APIError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {kind.plural} "{key[3]}": the object has been'
                " modified; please apply your changes to the latest version and try again",
            )
        new = copy.deepcopy(current)
        if subresource == "status":
            new["status"] = copy.deepcopy(obj.get("status", {}))
        else:
            for field, value in obj.items():
                if field in ("apiVersion", "kind", "metadata") or (kind.status and field == "status"):
                    continue
                new[field] = copy.deepcopy(value)
            for field in [f for f in new if f not in obj and f not in ("apiVersion", "kind", "metadata", "status")]:
                del new[field]
            for field in ("labels", "annotations"):
                if field in metadata:
                    new["metadata"][field] = copy.deepcopy(metadata[field])
                else:
                    new["metadata"].pop(field, None)
            if new.get("spec") != current.get("spec"):
                new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        if new == current:
            return current  # a no-op update writes nothing (no new version, no event)
        self.rv += 1
        new["metadata"]["resourceVersion"] = str(self.rv)
        self.objects[key] = new
        return self._record("MODIFIED", key, new, current)

    def delete(self, kind: Kind, key: Key) -> Obj:
        """Remove an object (404 when absent)."""
        current = self.objects.pop(key, None)
        if current is None:
            raise APIError(404, "NotFound", f'{kind.plural} "{key[3]}" not found')
        self.rv += 1
        gone = copy.deepcopy(current)
        gone["metadata"]["resourceVersion"] = str(self.rv)
        return self._record("DELETED", key, gone, current)

    def compact(self, rv: int | None = None) -> None:
        """Forget history up to `rv` (default: now); older versions then answer 410 Gone."""
        self.compacted = self.rv if rv is None else rv
        self.history = [event for event in self.history if event.rv > self.compacted]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (strategic merge patches are applied the same way here)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for field, value in patch.items():
        if value is None:
            result.pop(field, None)
        else:
            result[field] = merge_patch(result.get(field), value)
    return result


@attrs.frozen
class Route:
    """What a request path names."""

    kind: Kind
    namespace: str  # "" for all namespaces, or a cluster-scoped kind
    name: str | None
    subresource: str
    only_name: str | None = None  # list/watch with fieldSelector=metadata.name=NAME

    @property
    def key(self) -> Key:
        """The store key of the named object."""
        assert self.name is not None
        return (self.kind.group, self.kind.plural, self.namespace, self.name)

    def matches(self, key: Key) -> bool:
        """Whether a stored object belongs to this collection."""
        return (
            key[:2] == (self.kind.group, self.kind.plural)
            and (not self.namespace or key[2] == self.namespace)
            and (self.only_name is None or key[3] == self.only_name)
        )


def _resource_json(kind: Kind) -> Obj:
    verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
    resource = {"name": kind.plural, "singularName": kind.kind.lower(), "namespaced": kind.namespaced,
                "kind": kind.kind, "verbs": verbs}
    if kind.builtin and kind.plural in _SHORT_NAMES:
        resource["shortNames"] = [_SHORT_NAMES[kind.plural]]
    return resource


_SHORT_NAMES = {"services": "svc", "endpoints": "ep", "ingresses": "ing", "namespaces": "ns"}


class KubeAPI(Resource):
    """The API server as a twisted.web resource: `listen()` serves it on 127.0.0.1."""

    isLeaf = True

    def __init__(
        self,
        reactor: Any,
        tokens: Mapping[str, Iterable[str] | None] | None = None,
        bookmark_interval: float | None = None,
    ) -> None:
        """`tokens`: bearer token -> the verbs it may use ("verb" or "verb:plural"; None: all).
        Without `tokens`, any request is allowed (no auth)."""
        super().__init__()
        self.reactor = reactor
        self.store = Store(reactor)
        self.tokens: dict[str, frozenset[str] | None] | None = (
            None if tokens is None else {t: self._role(v) for t, v in tokens.items()}
        )
        self.bookmark_interval = bookmark_interval
        self.watches: list[_Watch] = []
        self.watches_opened = 0  # watch streams started (the ERROR-410 ones included)
        self._watch_waiters: list[tuple[int, Deferred[None]]] = []
        self.requests: list[tuple[str, str]] = []  # (method, path?query) of every request seen
        self.port: IListeningPort | None = None
        self.connections: set[Any] = set()  # open client connections (stop() drops them)
        self.scheme = "http"

    @staticmethod
    def _role(verbs: Iterable[str] | None) -> frozenset[str] | None:
        return None if verbs is None else frozenset(verbs)

    def set_token(self, token: str, verbs: Iterable[str] | None = None) -> None:
        """Accept `token` (with a role); e.g. after a rotation, `revoke` the old one."""
        if self.tokens is None:
            self.tokens = {}
        self.tokens[token] = self._role(verbs)

    def revoke(self, token: str) -> None:
        """Stop accepting `token`."""
        if self.tokens is not None:
            self.tokens.pop(token, None)

    # -- serving
    def listen(self, port: int = 0, tls: Issued | None = None, client_ca_pem: bytes | None = None) -> IListeningPort:
        """Serve on 127.0.0.1 (an ephemeral port by default), over TLS with `tls` (as a real API
        server does: kubectl sends no token over plain HTTP); `url` then names it. With
        `client_ca_pem`, a client certificate signed by that CA is required."""
        site = _TrackingSite(self, self.connections)
        if tls is None:
            reactor: IReactorTCP = self.reactor
            self.port = reactor.listenTCP(port, site, interface="127.0.0.1")
        else:
            extra: dict[str, Any] = {}
            if client_ca_pem is not None:
                from twisted.internet import ssl

                extra = {"verify": True, "requireCertificate": True,
                         "caCerts": [ssl.Certificate.loadPEM(client_ca_pem).original]}
            self.port = self.reactor.listenSSL(port, site, server_options(tls, **extra), interface="127.0.0.1")
        self.scheme = "https" if tls is not None else "http"
        return self.port

    @property
    def url(self) -> str:
        """`http(s)://127.0.0.1:PORT` of the listening server."""
        assert self.port is not None
        return f"{self.scheme}://127.0.0.1:{self.port.getHost().port}"

    def kubeconfig(self, token: str | None, ca_pem: bytes | None = None, namespace: str = "default") -> str:
        """A kubeconfig (JSON, which is YAML) pointing `kubectl` at this server with `token`."""
        cluster: Obj = {"server": self.url}
        if ca_pem is not None:
            cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
        user: Obj = {"token": token} if token is not None else {}
        return json.dumps({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": cluster}],
            "users": [{"name": "test", "user": user}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": namespace}}],
            "current-context": "test",
        })

    def stop(self) -> Any:
        """Stop listening, end every watch and drop every client connection, as a server that
        goes away does (a Deferred firing when the port is closed)."""
        self.cut_watches()
        for protocol in list(self.connections):
            transport = getattr(getattr(protocol, "_channel", protocol), "transport", None)
            if transport is not None:
                transport.abortConnection()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None

    def cut_watches(self) -> None:
        """Drop every open watch connection mid-stream (no final chunk), as a lost server does."""
        for watch in list(self.watches):
            watch.abort()

    def end_watches(self) -> None:
        """End every open watch cleanly (the final chunk), as its timeout would."""
        for watch in list(self.watches):
            watch.end()

    def watch_opened(self, count: int) -> Deferred[None]:
        """Fire once `count` watch streams have been opened in all (events before are sent)."""
        waiter: Deferred[None] = Deferred()
        self._watch_waiters.append((count, waiter))
        self._notify_watchers()
        return waiter

    def _notify_watchers(self) -> None:
        for count, waiter in list(self._watch_waiters):
            if self.watches_opened >= count:
                self._watch_waiters.remove((count, waiter))
                waiter.callback(None)

    def send_raw(self, data: bytes) -> None:
        """Write `data` as is on every open watch (garbage, an unknown event type, ...)."""
        for watch in list(self.watches):
            if not watch.closed:
                watch.request.write(data)

    def send_bookmarks(self) -> None:
        """Send a BOOKMARK at the current version on every watch that allows bookmarks."""
        for watch in list(self.watches):
            watch.bookmark()

    def compact(self, rv: int | None = None) -> None:
        """Compact the history (`Store.compact`)."""
        self.store.compact(rv)

    # -- objects in code
    def kind(self, api_version: str, kind: str) -> Kind:
        """The served Kind of (apiVersion, kind)."""
        for candidate in KINDS:
            if (candidate.api_version, candidate.kind) == (api_version, kind):
                return candidate
        raise KeyError((api_version, kind))

    def put(self, obj: Obj) -> Obj:
        """Create `obj` (or update it when it exists), as a user's `kubectl apply` would."""
        kind = self.kind(obj["apiVersion"], obj["kind"])
        metadata = obj.get("metadata", {})
        namespace = metadata.get("namespace", "default") if kind.namespaced else ""
        key = (kind.group, kind.plural, namespace, metadata["name"])
        if key in self.store.objects:
            return self.store.update(kind, key, obj)
        return self.store.create(kind, namespace, obj)

    def remove(self, api_version: str, kind_name: str, namespace: str, name: str) -> Obj:
        """Delete an object in code."""
        kind = self.kind(api_version, kind_name)
        return self.store.delete(kind, (kind.group, kind.plural, namespace if kind.namespaced else "", name))

    def get(self, api_version: str, kind_name: str, namespace: str, name: str) -> Obj | None:
        """An object as stored, or None."""
        kind = self.kind(api_version, kind_name)
        return self.store.objects.get((kind.group, kind.plural, namespace if kind.namespaced else "", name))

    # -- HTTP
    def render(self, request: Request) -> Any:
        path = request.uri.decode("latin-1")
        method = request.method.decode("latin-1")
        self.requests.append((method, path))
        parts = urlsplit(path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        segments = [s for s in parts.path.split("/") if s]
        try:
            discovery = self._discovery(segments)
            if discovery is not None:
                self._authenticate(request, None)
                return self._send(request, 200, discovery)
            route = self._route(segments)
            selector = query.get("fieldSelector")
            if selector:
                field, _, value = selector.partition("=")
                if field != "metadata.name" or not value:
                    raise APIError(400, "BadRequest", f"field selector {selector!r} not supported")
                route = attrs.evolve(route, only_name=value)
            verb = self._verb(method, route, query)
            self._authenticate(request, f"{verb}:{route.kind.plural}")
            return self._dispatch(request, verb, route, query)
        except APIError as exc:
            return self._send(request, exc.code, exc.body)

    def _send(self, request: Request, code: int, body: Obj) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode() + b"\n"

    def _authenticate(self, request: Request, verb: str | None) -> None:
        if self.tokens is None:
            return
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in self.tokens:
            raise APIError(401, "Unauthorized", "Unauthorized")
        role = self.tokens[token.strip()]
        if verb is None or role is None:
            return
        plain_verb, _, plural = verb.partition(":")
        if plain_verb not in role and verb not in role:
            raise APIError(
                403,
                "Forbidden",
                f'{plural} is forbidden: User cannot {plain_verb} resource "{plural}"',
            )

    def _discovery(self, segments: list[str]) -> Obj | None:
        if segments == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}
        if segments == ["apis"]:
            groups: dict[str, list[str]] = {}
            for kind in KINDS:
                if kind.group and kind.version not in groups.setdefault(kind.group, []):
                    groups[kind.group].append(kind.version)
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": group,
                        "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
                        "preferredVersion": {"groupVersion": f"{group}/{versions[-1]}", "version": versions[-1]},
                    }
                    for group, versions in groups.items()
                ],
            }
        if segments == ["version"]:
            return {"major": "1", "minor": "32", "gitVersion": "v1.32.0-flexgw-test"}
        group_version = None
        if segments[:1] == ["api"] and len(segments) == 2:
            group_version = ("", segments[1])
        elif segments[:1] == ["apis"] and len(segments) == 3:
            group_version = (segments[1], segments[2])
        if group_version is None:
            return None
        kinds = [k for k in KINDS if (k.group, k.version) == group_version]
        if not kinds:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        resources = [_resource_json(k) for k in kinds]
        resources += [
            {"name": f"{k.plural}/status", "namespaced": k.namespaced, "kind": k.kind,
             "verbs": ["get", "patch", "update"]}
            for k in kinds
            if k.status
        ]
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": kinds[0].api_version, "resources": resources}

    def _route(self, segments: list[str]) -> Route:
        not_found = APIError(404, "NotFound", "the server could not find the requested resource")
        if segments[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", segments[2:]
        elif segments[:1] == ["apis"] and len(segments) >= 3:
            group, version, rest = segments[1], segments[2], segments[3:]
        else:
            raise not_found
        namespace = ""
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise not_found
        for kind in KINDS:
            if (kind.group, kind.version, kind.plural) == (group, version, rest[0]):
                break
        else:
            raise not_found
        if namespace and not kind.namespaced:
            raise not_found
        name = rest[1] if len(rest) >= 2 else None
        subresource = rest[2] if len(rest) == 3 else ""
        if subresource and (subresource != "status" or not kind.status):
            raise not_found
        if name is not None and kind.namespaced and not namespace:
            raise not_found
        return Route(kind, namespace, name, subresource)

    @staticmethod
    def _verb(method: str, route: Route, query: Mapping[str, str]) -> str:
        if route.name is None:
            if method == "GET":
                return "watch" if query.get("watch") in ("1", "true") else "list"
            if method == "POST":
                return "create"
        else:
            verbs = {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
            if method in verbs:
                return verbs[method]
        raise APIError(405, "MethodNotAllowed", f"the server does not allow this method ({method})")

    def _body(self, request: Request) -> Obj:
        assert request.content is not None
        try:
            body = json.loads(request.content.read() or b"null")
        except ValueError:
            raise APIError(400, "BadRequest", "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "BadRequest", "the request body must be an object")
        return body

    def _dispatch(self, request: Request, verb: str, route: Route, query: Mapping[str, str]) -> Any:
        store = self.store
        kind = route.kind
        if verb == "list":
            return self._send(request, 200, self._list(route, query))
        if verb == "watch":
            return self._watch(request, route, query)
        if verb == "create":
            body = self._body(request)
            if body.get("kind") not in (None, kind.kind):
                raise APIError(400, "BadRequest", f"kind {body.get('kind')!r} posted to {kind.plural}")
            namespace = route.namespace or body.get("metadata", {}).get("namespace") or "default"
            return self._send(request, 201, store.create(kind, namespace if kind.namespaced else "", body))
        current = store.objects.get(route.key)
        if current is None and verb != "update":
            raise APIError(404, "NotFound", f'{kind.plural} "{route.name}" not found')
        if verb == "get":
            return self._send(request, 200, current)  # type: ignore[arg-type]
        if verb == "delete":
            store.delete(kind, route.key)
            return self._send(request, 200, {**status(200, "", ""), "status": "Success",
                                             "details": {"name": route.name, "kind": kind.plural}})
        body = self._body(request)
        if verb == "patch":
            assert current is not None
            body = merge_patch(current, body)
        return self._send(request, 200, store.update(kind, route.key, body, route.subresource))

    def _list(self, route: Route, query: Mapping[str, str]) -> Obj:
        store = self.store
        token = query.get("continue")
        if token:
            try:
                snapshot_rv, after = json.loads(base64.urlsafe_b64decode(token.encode()))
                after = tuple(after)
            except (ValueError, TypeError):
                raise APIError(400, "BadRequest", "continue key is not valid") from None
            try:
                state = store.state_at(int(snapshot_rv))
            except APIError:
                raise APIError(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list"
                    " result. You can start a new list without the continue parameter.",
                ) from None
        else:
            snapshot_rv, after, state = store.rv, None, store.objects
        keys = sorted(key for key in state if route.matches(key) and (after is None or key > after))
        limit = int(query.get("limit") or 0)
        metadata: Obj = {"resourceVersion": str(snapshot_rv)}
        if limit > 0 and len(keys) > limit:
            keys = keys[:limit]
            last = list(keys[-1])
            metadata["continue"] = base64.urlsafe_b64encode(json.dumps([snapshot_rv, last]).encode()).decode()
        items = [copy.deepcopy(state[key]) for key in keys]
        if route.kind.builtin:
            for item in items:
                item.pop("apiVersion", None)
                item.pop("kind", None)
        return {"apiVersion": route.kind.api_version, "kind": route.kind.kind + "List",
                "metadata": metadata, "items": items}

    def _watch(self, request: Request, route: Route, query: Mapping[str, str]) -> Any:
        start = query.get("resourceVersion", "")
        watch = _Watch(self, request, route, query.get("allowWatchBookmarks") in ("1", "true"))
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        request.write(b"")  # the head now (chunked), as the API server does, before any event
        if start in ("", "0"):
            for key in sorted(self.store.objects):
                if route.matches(key):
                    watch.send("ADDED", self.store.objects[key])
        else:
            try:
                events = self.store.events_after(int(start))
            except ValueError:
                raise APIError(400, "BadRequest", f"invalid resourceVersion {start!r}") from None
            except APIError as exc:
                watch.send("ERROR", exc.body)
                request.finish()
                self.watches_opened += 1
                self._notify_watchers()
                return NOT_DONE_YET
            for event in events:
                watch.deliver(event)
        self.watches.append(watch)
        self.store.listeners.append(watch.deliver)
        timeout = query.get("timeoutSeconds")
        if timeout:
            watch.timer = self.reactor.callLater(float(timeout), watch.end)
        if watch.bookmarks and self.bookmark_interval:
            watch.ticker = self.reactor.callLater(self.bookmark_interval, watch.tick)
        request.notifyFinish().addBoth(lambda _: watch.close())
        self.watches_opened += 1
        self._notify_watchers()
        return NOT_DONE_YET


class _TrackingSite(Site):
    """A Site remembering its open connections in `connections`."""

    def __init__(self, resource: Resource, connections: set[Any]) -> None:
        super().__init__(resource)
        self.connections = connections

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        connections = self.connections
        lost = protocol.connectionLost

        def connection_lost(reason: Any) -> None:
            connections.discard(protocol)
            lost(reason)

        protocol.connectionLost = connection_lost
        connections.add(protocol)
        return protocol


class _Watch:
    """One open watch stream."""

    def __init__(self, api: KubeAPI, request: Request, route: Route, bookmarks: bool) -> None:
        self.api = api
        self.request = request
        self.route = route
        self.bookmarks = bookmarks
        self.timer: IDelayedCall | None = None
        self.ticker: IDelayedCall | None = None
        self.closed = False

    def send(self, type_: str, obj: Obj) -> None:
        if not self.closed:
            self.request.write(json.dumps({"type": type_, "object": obj}).encode() + b"\n")

    def deliver(self, event: Event) -> None:
        if self.route.matches(event.key):
            self.send(event.type, event.obj)

    def bookmark(self) -> None:
        if self.bookmarks:
            kind = self.route.kind
            self.send("BOOKMARK", {"kind": kind.kind, "apiVersion": kind.api_version,
                                   "metadata": {"resourceVersion": str(self.api.store.rv)}})

    def tick(self) -> None:
        self.bookmark()
        if not self.closed and self.api.bookmark_interval:
            self.ticker = self.api.reactor.callLater(self.api.bookmark_interval, self.tick)

    def end(self) -> None:
        """The watch's timeout: finish the stream cleanly (the final chunk)."""
        if not self.closed:
            self.request.finish()

    def abort(self) -> None:
        """Cut the connection mid-stream."""
        if not self.closed:
            transport = self.request.channel.transport if self.request.channel else None
            self.close()
            if transport is not None:
                transport.abortConnection()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for call in (self.timer, self.ticker):
            if call is not None and call.active():
                call.cancel()
        if self in self.api.watches:
            self.api.watches.remove(self)
        if self.deliver in self.api.store.listeners:
            self.api.store.listeners.remove(self.deliver)
