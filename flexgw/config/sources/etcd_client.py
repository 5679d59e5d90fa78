"""A small etcd v3 client over etcd's JSON gateway (`/v3/...`), with treq on an injected reactor.

No threads and no gRPC: every call is one HTTP POST of a JSON body to the first endpoint that
answers (`EtcdClient.endpoints`, tried in order from the last one that worked; a refused or
timed-out connection, or etcd's "unavailable", moves to the next; `EtcdUnavailable` when none
answers). Keys and values are bytes (base64 on the wire); revisions and lease IDs are ints
(strings on the wire). What it covers: a range over a prefix, a transaction (compares, then
puts and deletes, applied together or not at all), compaction, a streaming watch (newline-
delimited JSON results over one chunked response: created, events, compact_revision when the
start revision was compacted; cancelled by dropping the connection), leases (grant, keep-alive,
revoke) and password authentication (the token goes in the Authorization header and is renewed
once when etcd calls it invalid). This is the transport the etcd config source builds on.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from typing import Any, Literal

import attrs
from twisted.internet import defer
from twisted.internet.error import ConnectError, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from flexgw.sidecalls.bounded import read_bounded

#: Default bound on one response (a range over a large prefix); etcd itself caps a request at
#: 1.5 MiB by default.
MAX_RESPONSE = 64 * 1024 * 1024
#: gRPC status codes etcd's gateway reports.
PERMISSION_DENIED = 7
UNAVAILABLE = 14
UNAUTHENTICATED = 16
#: Failures that mean "this endpoint is not answering": try the next.
_ENDPOINT_FAILURES = (
    ConnectError,
    ConnectionLost,
    ResponseFailed,
    ResponseNeverReceived,
    defer.TimeoutError,
    defer.CancelledError,
)


class EtcdError(Exception):
    """etcd answered with an error (`code`: the gRPC status code, `status`: the HTTP status)."""

    def __init__(self, message: str, code: int | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class EtcdUnavailable(EtcdError):
    """No endpoint answered; `reasons` says why, endpoint by endpoint."""

    def __init__(self, reasons: Sequence[tuple[str, str]]) -> None:
        super().__init__(
            "no etcd endpoint answered: " + "; ".join(f"{url}: {why}" for url, why in reasons),
            code=UNAVAILABLE,
        )
        self.reasons = tuple(reasons)


class ResponseTooLarge(EtcdError):
    """A response passed the client's size bound."""


def _b64(data: bytes) -> str:
    """Bytes as the gateway's base64 string."""
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes:
    """The gateway's base64 string (absent: empty) as bytes."""
    return base64.b64decode(text) if text else b""


def _key_range(key: bytes, range_end: bytes | None, **numbers: int) -> dict[str, Any]:
    """A request body naming [key, range_end) and the non-zero `numbers` (strings on the wire)."""
    body: dict[str, Any] = {"key": _b64(key)}
    if range_end is not None:
        body["range_end"] = _b64(range_end)
    body.update((name, str(value)) for name, value in numbers.items() if value)
    return body


def prefix_end(prefix: bytes) -> bytes:
    """The `range_end` covering every key that starts with `prefix` (its last byte below 0xff
    plus one; an empty or all-0xff prefix: b"\\0", every key)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"
    return stripped[:-1] + bytes([stripped[-1] + 1])


@attrs.frozen
class KeyValue:
    """One key as etcd holds it."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyValue:
        """From the gateway's JSON (absent fields are zero/empty)."""
        return cls(
            key=_unb64(data.get("key")),
            value=_unb64(data.get("value")),
            create_revision=int(data.get("create_revision", 0)),
            mod_revision=int(data.get("mod_revision", 0)),
            version=int(data.get("version", 0)),
            lease=int(data.get("lease", 0)),
        )


@attrs.frozen
class RangeResult:
    """A range: the store's revision when it was read, the keys, whether more were cut off."""

    revision: int
    kvs: tuple[KeyValue, ...]
    more: bool
    count: int


@attrs.frozen
class Compare:
    """A transaction guard: `target` of `key` compared (`result`) with `value`
    (e.g. Compare(b"k", "VERSION", "EQUAL", 0): the key does not exist)."""

    key: bytes
    target: Literal["VERSION", "CREATE", "MOD", "VALUE", "LEASE"]
    result: Literal["EQUAL", "GREATER", "LESS", "NOT_EQUAL"]
    value: int | bytes

    def to_json(self) -> dict[str, Any]:
        """As the gateway's Compare message."""
        field = {
            "VERSION": "version", "CREATE": "create_revision", "MOD": "mod_revision",
            "VALUE": "value", "LEASE": "lease",
        }[self.target]
        value = _b64(self.value) if isinstance(self.value, bytes) else str(self.value)
        return {"key": _b64(self.key), "target": self.target, "result": self.result, field: value}


@attrs.frozen
class Put:
    """A put in a transaction (`lease`: 0 for none)."""

    key: bytes
    value: bytes
    lease: int = 0

    def to_json(self) -> dict[str, Any]:
        """As the gateway's RequestOp."""
        put: dict[str, Any] = {"key": _b64(self.key), "value": _b64(self.value)}
        if self.lease:
            put["lease"] = str(self.lease)
        return {"request_put": put}


@attrs.frozen
class Delete:
    """A delete in a transaction: `key`, or every key in [key, range_end)."""

    key: bytes
    range_end: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        """As the gateway's RequestOp."""
        return {"request_delete_range": _key_range(self.key, self.range_end)}


@attrs.frozen
class TxnResult:
    """A transaction's outcome: whether the compares held, and the revision after it."""

    succeeded: bool
    revision: int
    responses: tuple[dict[str, Any], ...]


@attrs.frozen
class Event:
    """One change seen by a watch."""

    type: Literal["PUT", "DELETE"]
    kv: KeyValue
    prev_kv: KeyValue | None


@attrs.frozen
class WatchEnd:
    """Why a watch ended: "cancelled" (by `Watch.cancel`), "compacted" (the start revision was
    compacted: re-read, then watch from `compact_revision` or later) or "server" (etcd
    cancelled it)."""

    reason: Literal["cancelled", "compacted", "server"]
    compact_revision: int = 0


def _header_revision(result: dict[str, Any]) -> int:
    """The store revision in a response's header."""
    return int(result.get("header", {}).get("revision", 0))


class EtcdClient:
    """An etcd v3 client on `reactor` for `endpoints` (client URLs such as http://h:2379).

    `timeout` bounds each call (connection, answer and body) and the creation of a watch;
    `user`/`password` turn on authentication; `tls_policy` (an IPolicyForHTTPS such as
    flexgw.tls.contexts.SideCallTLSPolicy: trusted CA, client certificate) serves https
    endpoints; `agent` replaces the default Agent altogether; `max_response` bounds a response
    body and a watch message."""

    def __init__(
        self,
        reactor: Any,
        endpoints: Sequence[str],
        *,
        timeout: float = 5.0,
        user: str | None = None,
        password: str | None = None,
        tls_policy: Any = None,
        agent: Any = None,
        max_response: int = MAX_RESPONSE,
    ) -> None:
        if not endpoints:
            raise ValueError("an etcd client needs at least one endpoint")
        self.reactor = reactor
        self.endpoints = [url.rstrip("/") for url in endpoints]
        self.timeout = timeout
        self.user = user
        self.password = password
        self.max_response = max_response
        self.current = 0  # index of the endpoint that answered last
        self.token: str | None = None
        if agent is None:
            from twisted.web.client import Agent, HTTPConnectionPool

            tls = {} if tls_policy is None else {"contextFactory": tls_policy}
            agent = Agent(
                reactor,
                connectTimeout=timeout,
                pool=HTTPConnectionPool(reactor, persistent=False),
                **tls,
            )
        self.agent = agent

    # -- transport ---------------------------------------------------------------------------

    def _order(self) -> list[int]:
        """Endpoint indexes to try, from the one that worked last."""
        n = len(self.endpoints)
        return [(self.current + i) % n for i in range(n)]

    def _headers(self) -> dict[bytes, list[bytes]]:
        """Request headers (the auth token once there is one)."""
        headers = {b"Content-Type": [b"application/json"]}
        if self.token is not None:
            headers[b"Authorization"] = [self.token.encode("ascii")]
        return headers

    def _request(self, url: str, body: dict[str, Any]) -> defer.Deferred[Any]:
        """POST `body` as JSON to `url`; fires with the treq response (headers read)."""
        import treq

        return treq.request(
            "POST",
            url,
            data=json.dumps(body).encode("utf-8"),
            headers=self._headers(),
            agent=self.agent,
            reactor=self.reactor,
        )

    def _too_large(self) -> Exception:
        """The error for a response over max_response."""
        return ResponseTooLarge(f"etcd response over {self.max_response} bytes")

    async def _post_once(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        """One call to one endpoint, bounded by `timeout`; the decoded answer or EtcdError."""

        async def call() -> tuple[int, bytes]:
            response = await self._request(url, body)
            data = await read_bounded(response, self.max_response, self._too_large)
            return response.code, data

        status, data = await defer.Deferred.fromCoroutine(call()).addTimeout(
            self.timeout, self.reactor
        )
        return _decode(status, data)

    async def _post(self, path: str, body: dict[str, Any], *, auth: bool = True) -> dict[str, Any]:
        """Call `path` on the first endpoint that answers (failover); authenticates first when
        a user is set, and once more when etcd calls the token invalid."""
        if auth and self.user is not None and self.token is None:
            await self.authenticate()
        try:
            return await self._failover(path, body)
        except EtcdError as error:
            if not (auth and self.user is not None and _is_bad_token(error)):
                raise
        await self.authenticate()
        return await self._failover(path, body)

    async def _failover(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Try each endpoint in turn until one answers (an etcd error that is not
        "unavailable" is an answer)."""
        reasons: list[tuple[str, str]] = []
        for index in self._order():
            url = self.endpoints[index]
            try:
                result = await self._post_once(url + path, body)
            except _ENDPOINT_FAILURES as error:
                reasons.append((url, _describe(error)))
                continue
            except EtcdError as error:
                if error.code != UNAVAILABLE:
                    raise
                reasons.append((url, str(error)))
                continue
            self.current = index
            return result
        raise EtcdUnavailable(reasons)

    def call(self, path: str, body: dict[str, Any]) -> defer.Deferred[dict[str, Any]]:
        """Any gateway call (`path` such as "/v3/auth/user/add") with failover and auth: the
        decoded JSON answer."""
        return defer.Deferred.fromCoroutine(self._post(path, body))

    # -- authentication ----------------------------------------------------------------------

    def authenticate(self) -> defer.Deferred[str]:
        """Get a token for `user`/`password` (kept for later calls); fires with it."""

        async def run() -> str:
            if self.user is None:
                raise EtcdError("no etcd user to authenticate as")
            self.token = None
            answer = await self._failover(
                "/v3/auth/authenticate", {"name": self.user, "password": self.password or ""}
            )
            token = answer.get("token")
            if not isinstance(token, str) or not token:
                raise EtcdError(f"etcd gave no token: {answer!r}")
            self.token = token
            return token

        return defer.Deferred.fromCoroutine(run())

    # -- key/value ---------------------------------------------------------------------------

    def range(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        revision: int = 0,
        limit: int = 0,
    ) -> defer.Deferred[RangeResult]:
        """The keys in [key, range_end) (`key` alone without range_end), at `revision` (0: now)."""
        body = _key_range(key, range_end, revision=revision, limit=limit)

        async def run() -> RangeResult:
            answer = await self._post("/v3/kv/range", body)
            return RangeResult(
                revision=_header_revision(answer),
                kvs=tuple(KeyValue.from_json(kv) for kv in answer.get("kvs", ())),
                more=bool(answer.get("more", False)),
                count=int(answer.get("count", 0)),
            )

        return defer.Deferred.fromCoroutine(run())

    def range_all(self, prefix: bytes, *, page: int = 1000) -> defer.Deferred[RangeResult]:
        """Every key under `prefix` at one revision, read `page` keys per call (etcd's `more`)."""

        async def run() -> RangeResult:
            end = prefix_end(prefix)
            key, revision, kvs = prefix, 0, []
            while True:
                result = await self.range(key, end, revision=revision, limit=page)
                revision = revision or result.revision
                kvs.extend(result.kvs)
                if not result.more or not result.kvs:
                    return RangeResult(revision, tuple(kvs), False, len(kvs))
                key = result.kvs[-1].key + b"\0"

        return defer.Deferred.fromCoroutine(run())

    def range_prefix(self, prefix: bytes, *, revision: int = 0) -> defer.Deferred[RangeResult]:
        """Every key under `prefix`."""
        return self.range(prefix, prefix_end(prefix), revision=revision)

    def txn(
        self,
        compare: Sequence[Compare] = (),
        success: Sequence[Put | Delete] = (),
        failure: Sequence[Put | Delete] = (),
    ) -> defer.Deferred[TxnResult]:
        """One transaction: if every `compare` holds, apply `success`, else `failure`; all of
        it at one revision or none of it."""
        body = {
            "compare": [c.to_json() for c in compare],
            "success": [op.to_json() for op in success],
            "failure": [op.to_json() for op in failure],
        }

        async def run() -> TxnResult:
            answer = await self._post("/v3/kv/txn", body)
            return TxnResult(
                succeeded=bool(answer.get("succeeded", False)),
                revision=_header_revision(answer),
                responses=tuple(answer.get("responses", ())),
            )

        return defer.Deferred.fromCoroutine(run())

    def put(self, key: bytes, value: bytes, lease: int = 0) -> defer.Deferred[TxnResult]:
        """Put one key (a transaction of one put)."""
        return self.txn(success=[Put(key, value, lease)])

    def delete(self, key: bytes, range_end: bytes | None = None) -> defer.Deferred[TxnResult]:
        """Delete one key, or [key, range_end) (a transaction of one delete)."""
        return self.txn(success=[Delete(key, range_end)])

    def compact(self, revision: int) -> defer.Deferred[dict[str, Any]]:
        """Compact the history up to `revision` (watches from before it report compaction)."""
        return self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    # -- leases ------------------------------------------------------------------------------

    def lease_grant(self, ttl: int) -> defer.Deferred[tuple[int, int]]:
        """A new lease of `ttl` seconds: fires with (lease ID, granted TTL)."""

        async def run() -> tuple[int, int]:
            answer = await self._post("/v3/lease/grant", {"TTL": str(ttl)})
            return int(answer["ID"]), int(answer.get("TTL", 0))

        return defer.Deferred.fromCoroutine(run())

    def lease_keepalive(self, lease: int) -> defer.Deferred[int]:
        """Renew `lease` once: fires with its new TTL (0: the lease is gone)."""

        async def run() -> int:
            answer = await self._post("/v3/lease/keepalive", {"ID": str(lease)})
            return int(answer.get("result", answer).get("TTL", 0))

        return defer.Deferred.fromCoroutine(run())

    def lease_revoke(self, lease: int) -> defer.Deferred[dict[str, Any]]:
        """Revoke `lease` (its keys are deleted)."""
        return self.call("/v3/lease/revoke", {"ID": str(lease)})

    # -- watch -------------------------------------------------------------------------------

    def watch(
        self,
        key: bytes,
        range_end: bytes | None,
        on_events: Callable[[list[Event], int], Any],
        *,
        start_revision: int = 0,
        prev_kv: bool = False,
    ) -> defer.Deferred[Watch]:
        """Watch [key, range_end) from `start_revision` (0: from now) on the first endpoint
        that accepts it; fires with the Watch once etcd has created it. `on_events(events,
        revision)` is called for each batch, in revision order."""
        request = _key_range(key, range_end, start_revision=start_revision)
        if prev_kv:
            request["prev_kv"] = True
        body = {"create_request": request}

        async def run() -> Watch:
            if self.user is not None and self.token is None:
                await self.authenticate()
            try:
                return await attempt()
            except EtcdError as error:
                if self.user is None or not (_is_bad_token(error) or error.code == PERMISSION_DENIED):
                    raise
            await self.authenticate()
            return await attempt()

        async def attempt() -> Watch:
            reasons: list[tuple[str, str]] = []
            for index in self._order():
                url = self.endpoints[index]
                watch = Watch(on_events, self.max_response)
                try:
                    response = await self._request(url + "/v3/watch", body).addTimeout(
                        self.timeout, self.reactor
                    )
                    if response.code != 200:
                        data = await read_bounded(response, self.max_response, self._too_large)
                        _decode(response.code, data)  # raises the etcd error
                    response.deliverBody(watch.stream)
                    await watch.created.addTimeout(self.timeout, self.reactor)
                except _ENDPOINT_FAILURES as error:
                    watch.discard()
                    reasons.append((url, _describe(error)))
                    continue
                except EtcdError as error:
                    watch.discard()
                    if error.code != UNAVAILABLE:
                        raise
                    reasons.append((url, str(error)))
                    continue
                self.current = index
                watch.endpoint = url
                return watch
            raise EtcdUnavailable(reasons)

        return defer.Deferred.fromCoroutine(run())

    def watch_prefix(
        self,
        prefix: bytes,
        on_events: Callable[[list[Event], int], Any],
        *,
        start_revision: int = 0,
    ) -> defer.Deferred[Watch]:
        """Watch every key under `prefix` (see `watch`)."""
        return self.watch(prefix, prefix_end(prefix), on_events, start_revision=start_revision)


class Watch:
    """One running watch stream.

    `created` fires with the store revision when etcd has created it; `done` fires with a
    WatchEnd when it ends on purpose (cancelled, compacted, cancelled by etcd) and fails when
    the stream breaks (the endpoint went away: re-watch from `revision + 1`). `revision` is the
    last revision the watch has reported (events, or the header when created)."""

    def __init__(self, on_events: Callable[[list[Event], int], Any], max_line: int) -> None:
        self.on_events = on_events
        self.created: defer.Deferred[int] = defer.Deferred()
        self.done: defer.Deferred[WatchEnd] = defer.Deferred()
        self.revision = 0
        self.endpoint: str | None = None
        self.stream = _WatchStream(self, max_line)

    def cancel(self) -> None:
        """Stop the watch (its connection is dropped); `done` fires with "cancelled"."""
        self._end(WatchEnd("cancelled"))
        self.stream.abort()

    def discard(self) -> None:
        """Cancel a watch nobody will follow (a failed attempt): its end is not reported."""
        self.done.addErrback(lambda _: None)
        self.cancel()

    def _end(self, outcome: WatchEnd | Exception) -> None:
        """Settle `created` (if still pending) and `done`, once."""
        if not self.created.called:  # ended at once (e.g. compacted): created, then done
            if isinstance(outcome, Exception):
                self.created.errback(outcome)
            else:
                self.created.callback(self.revision)
        if self.done.called:
            return
        if isinstance(outcome, Exception):
            self.done.errback(outcome)
        else:
            self.done.callback(outcome)

    def _message(self, message: dict[str, Any]) -> None:
        """One JSON message of the stream."""
        if "error" in message:
            error = message["error"]
            self._end(EtcdError(str(error.get("message", error)), error.get("grpc_code")))
            self.stream.abort()
            return
        result = message.get("result", {})
        revision = _header_revision(result)
        compacted = int(result.get("compact_revision", 0))
        if compacted:
            self._end(WatchEnd("compacted", compacted))
            self.stream.abort()
            return
        if result.get("canceled") and not self.created.called:
            # refused at creation (created and cancelled at once): a permission denied, which
            # is also what etcd says about an expired token on a watch
            reason = str(result.get("cancel_reason") or "etcd refused the watch")
            self._end(EtcdError(reason, PERMISSION_DENIED if "permission denied" in reason else None))
            self.stream.abort()
            return
        if result.get("created") and not self.created.called:
            self.revision = revision
            self.created.callback(revision)
        events = [
            Event(
                type="DELETE" if event.get("type") == "DELETE" else "PUT",
                kv=KeyValue.from_json(event.get("kv", {})),
                prev_kv=KeyValue.from_json(event["prev_kv"]) if "prev_kv" in event else None,
            )
            for event in result.get("events", ())
        ]
        if events:
            self.revision = max(e.kv.mod_revision for e in events)
            try:
                self.on_events(events, self.revision)
            except Exception as error:  # noqa: BLE001 - a consumer bug ends the watch, reported
                self._end(error)
                self.stream.abort()
                return
        if result.get("canceled"):
            self._end(WatchEnd("server"))
            self.stream.abort()


class _WatchStream(Protocol):
    """The watch response body: newline-delimited JSON messages, each at most `max_line`."""

    def __init__(self, watch: Watch, max_line: int) -> None:
        self.watch = watch
        self.max_line = max_line
        self.buffer = b""
        self.aborted = False

    def abort(self) -> None:
        """Drop the connection (no more messages are handled)."""
        self.aborted = True
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        """Split complete lines off and hand each message to the watch."""
        self.buffer += data
        while not self.aborted:
            line, newline, rest = self.buffer.partition(b"\n")
            if not newline:
                break
            self.buffer = rest
            if line.strip():
                try:
                    message = json.loads(line)
                except ValueError:
                    self.watch._end(EtcdError(f"watch sent a message that is not JSON: {line[:200]!r}"))
                    self.abort()
                    return
                self.watch._message(message)
        if len(self.buffer) > self.max_line and not self.aborted:
            self.watch._end(ResponseTooLarge(f"watch message over {self.max_line} bytes"))
            self.abort()

    def connectionLost(self, reason: Any = None) -> None:
        """The stream ended: a failure unless the watch already ended."""
        self.watch._end(ConnectionLost(f"watch stream ended: {_describe(reason.value)}"))


def _decode(status: int, data: bytes) -> dict[str, Any]:
    """The gateway's JSON answer, or the EtcdError it reports."""
    text = data.strip()
    try:
        try:
            answer = json.loads(text) if text else {}
        except ValueError:  # a streamed call's results, one per line: the first is the answer
            answer = json.loads(text.split(b"\n", 1)[0])
    except ValueError:
        raise EtcdError(f"etcd answered {status} with a body that is not JSON: {data[:200]!r}",
                        status=status) from None
    if isinstance(answer, dict) and "result" in answer and status == 200:
        return answer  # a streamed call's single result (lease keep-alive)
    if status != 200 or (isinstance(answer, dict) and "error" in answer and "code" in answer):
        message = answer.get("message") or answer.get("error") if isinstance(answer, dict) else None
        code = answer.get("code") if isinstance(answer, dict) else None
        raise EtcdError(f"etcd: {message or data[:200]!r} (HTTP {status})", code=code, status=status)
    if not isinstance(answer, dict):
        raise EtcdError(f"etcd answered with {type(answer).__name__}, not an object", status=status)
    return answer


def _is_bad_token(error: EtcdError) -> bool:
    """Whether etcd refused the auth token (expired, or the server restarted)."""
    return error.code == UNAUTHENTICATED or "invalid auth token" in str(error)


def _describe(error: BaseException) -> str:
    """A short reason for an endpoint failure."""
    if isinstance(error, ResponseFailed | ResponseNeverReceived):
        reasons = getattr(error, "reasons", None) or []
        inner = "; ".join(str(r.value) for r in reasons)
        return f"{type(error).__name__}: {inner}" if inner else type(error).__name__
    if isinstance(error, defer.TimeoutError | defer.CancelledError):
        return "timed out"
    return str(error) or type(error).__name__
