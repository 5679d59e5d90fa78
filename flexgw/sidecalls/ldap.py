"""An LDAP directory client for the gateway's own calls (ldaptor on the injected reactor): one
multiplexed, pooled connection bound as the service user for searches, a bounded pool of
connections used only for users' binds, every operation under a timeout, every read bounded.

RFC 4511 forbids sending a bind while other operations are outstanding on the connection, and a
bind changes the connection's identity: so searches share the service connection (several in
flight, by message id) and each user bind takes a connection of the bind pool for itself. Bind
pool connections never search, so the identity a user's bind left on them does not matter.

Bad servers: a reply larger than `MAX_MESSAGE_BYTES` or not LDAP (BER that does not decode, an
unknown message id) drops the connection and fails what was in flight with `LdapGarbage`; a
server that stalls fails the operation with `LdapTimeout` (and the connection is dropped, so a
stalled connection is not reused); connection failures are `LdapUnavailable`. Connections idle
for `idle_seconds` are closed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap.ldapclient import LDAPClient
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.python.failure import Failure

#: One LDAP message from the server larger than this drops the connection (a search for one
#: DN with no attributes answers a few hundred bytes).
MAX_MESSAGE_BYTES = 256 * 1024
#: Result codes (RFC 4511 §4.1.9).
SUCCESS = 0
SIZE_LIMIT_EXCEEDED = 4
NO_SUCH_OBJECT = 32
INVALID_CREDENTIALS = 49
#: Codes that say the directory cannot answer now (busy, unavailable, unwilling, other).
UNAVAILABLE_CODES = frozenset({1, 3, 51, 52, 80})


class LdapError(Exception):
    """The directory could not answer; `cause` is the x-flexgw-error cause."""

    cause = "ldap_unavailable"


class LdapUnavailable(LdapError):
    """Connection refused, lost or TLS failed, or the directory answered a server error."""


class LdapTimeout(LdapError):
    """The directory did not answer within the timeout."""

    cause = "ldap_timeout"


class LdapGarbage(LdapError):
    """The directory answered something that is not a well-formed LDAP reply, or too much."""

    cause = "ldap_bad_response"


class LdapServiceBindFailed(LdapError):
    """The service user's bind was refused (wrong ldapServerUserDn/ldapServerUserPassword)."""

    cause = "ldap_service_bind_failed"


class BoundedLDAPClient(LDAPClient):
    """ldaptor's client with a bounded read buffer; garbage drops the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.garbage: str | None = None
        self.on_lost: Callable[[BoundedLDAPClient], None] | None = None
        self.gone: Deferred[None] = Deferred()  # fires when the connection is closed

    def kill(self) -> None:
        """Drop the connection now: unusable from this moment (its loss is reported later)."""
        self.connected = 0
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost(self)
        if self.transport is not None:
            self.transport.abortConnection()

    def dataReceived(self, recd: bytes) -> None:
        """Decode what arrived; too much or undecodable input aborts the connection."""
        if self.garbage is not None:
            return
        if len(self.buffer) + len(recd) > MAX_MESSAGE_BYTES:
            return self._garbage(f"a reply larger than {MAX_MESSAGE_BYTES} bytes")
        problem = _check_head(self.buffer + recd if self.buffer else recd)
        if problem is not None:
            return self._garbage(problem)
        try:
            super().dataReceived(recd)
        except Exception as e:  # noqa: BLE001 (any decoding failure is the server's fault)
            self._garbage(f"not an LDAP reply ({type(e).__name__})")
            return
        if self.buffer:  # a partial message left: its head must make sense too
            problem = _check_head(self.buffer)
            if problem is not None:
                self._garbage(problem)

    def handle(self, msg: Any) -> None:
        """One decoded message: refuse those that answer nothing we asked."""
        if msg.id != 0 and msg.id not in self.onwire:
            raise ValueError(f"reply to unknown message id {msg.id}")
        super().handle(msg)

    def _garbage(self, why: str) -> None:
        self.garbage = why
        self.buffer = b""
        self.kill()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        """Fail what is in flight (with LdapGarbage when that is why)."""
        if self.garbage is not None:
            reason = Failure(LdapGarbage(f"the directory sent {self.garbage}"))
        elif reason is None or not reason.check(LdapError):
            reason = Failure(LdapUnavailable(f"connection to the directory lost: "
                                             f"{reason.getErrorMessage() if reason else ''}"))
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost(self)
        super().connectionLost(reason)
        self.gone.callback(None)


def _check_head(data: bytes) -> str | None:
    """Why the message starting `data` cannot be an LDAP reply within the bound (None: it may
    be): an LDAPMessage is a BER SEQUENCE (0x30) with a definite length."""
    if not data:
        return None
    if data[0] != 0x30:
        return "not an LDAP reply (no BER SEQUENCE)"
    if len(data) < 2:
        return None
    first = data[1]
    if first < 0x80:
        return None
    count = first & 0x7F
    if count == 0 or count > 4:
        return "not an LDAP reply (bad BER length)"
    if len(data) < 2 + count:
        return None
    if int.from_bytes(data[2 : 2 + count], "big") > MAX_MESSAGE_BYTES:
        return f"a reply larger than {MAX_MESSAGE_BYTES} bytes"
    return None


def _shielded(inner: Deferred[Any]) -> Deferred[Any]:
    """What the caller gets for `inner`: cancelling it (the client went away) leaves `inner`
    alone, so the connection in use finishes its operation and goes back to its pool instead
    of being dropped midway (or, while connecting, leaked)."""
    outer: Deferred[Any] = Deferred()

    def relay(result: Any) -> None:
        if not outer.called:
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)

    inner.addBoth(relay)
    return outer


@attrs.frozen
class DirectoryAddress:
    """Where the directory is and how to talk to it."""

    host: str
    port: int
    tls: bool = False  # ldaps://
    start_tls: bool = False  # StartTLS (RFC 4513 §3) on an ldap:// connection
    # hostname -> IOpenSSLClientConnectionCreator (None: Twisted's default, system trust)
    tls_creator: Any = attrs.field(default=None, eq=False)


class LdapDirectory:
    """The pooled connections to one directory, as one service user."""

    def __init__(
        self,
        reactor: Any,
        address: DirectoryAddress,
        service_dn: str,
        service_password: str,
        timeout: float,
        max_bind_connections: int = 8,
        max_waiting: int = 1024,
        idle_seconds: float = 60.0,
        clock: Any = None,
    ) -> None:
        self.reactor = reactor
        self.clock = reactor if clock is None else clock  # operation timeouts and the idle timer
        self.address = address
        self.service_dn = service_dn
        self.service_password = service_password
        self.timeout = timeout
        self.max_bind_connections = max_bind_connections
        self.max_waiting = max_waiting
        self.idle_seconds = idle_seconds
        self._service: BoundedLDAPClient | None = None
        self._service_waiters: list[Deferred[Any]] | None = None  # a connect in progress
        self._idle: list[BoundedLDAPClient] = []
        self._bind_count = 0  # bind connections open or opening
        self._bind_waiters: deque[Deferred[Any]] = deque()
        self._busy = 0  # operations in flight
        self._idle_timer: Any = None
        self.connects = 0  # connections opened (tests, /status)
        self.closed = False

    # -- connections -----------------------------------------------------------------------------

    def _connect(self) -> Deferred[BoundedLDAPClient]:
        """A new connection (TLS or StartTLS as the address says). The endpoint's own timeout
        bounds the connect (its Deferred is never cancelled: a connect cancelled while a name
        is being resolved may never fire); the operations that follow have theirs."""
        a = self.address
        self.connects += 1
        endpoint: Any
        if isIPAddress(a.host):
            endpoint = TCP4ClientEndpoint(self.reactor, a.host, a.port, timeout=self.timeout)
        elif isIPv6Address(a.host):
            endpoint = TCP6ClientEndpoint(self.reactor, a.host, a.port, timeout=self.timeout)
        else:
            endpoint = HostnameEndpoint(self.reactor, a.host, a.port, timeout=self.timeout)
        if a.tls:
            endpoint = wrapClientTLS(self._creator(), endpoint)
        d: Deferred[Any] = connectProtocol(endpoint, BoundedLDAPClient())
        if a.start_tls:
            d.addCallback(self._start_tls)
        return d.addErrback(self._as_unavailable)

    def _creator(self) -> Any:
        a = self.address
        if a.tls_creator is not None:
            return a.tls_creator(a.host)
        from twisted.internet.ssl import optionsForClientTLS

        return optionsForClientTLS(a.host)

    def _start_tls(self, client: BoundedLDAPClient) -> Deferred[BoundedLDAPClient]:
        """RFC 4511 §4.14: the StartTLS extended operation, then the handshake."""

        def started(reply: Any) -> BoundedLDAPClient:
            if getattr(reply, "resultCode", None) != SUCCESS:
                client.kill()
                raise LdapUnavailable(
                    f"the directory refused StartTLS: {getattr(reply, 'errorMessage', reply)!r}"
                )
            client.transport.startTLS(self._creator())
            return client

        return self._send(client, pureldap.LDAPStartTLSRequest()).addCallback(started)

    @staticmethod
    def _as_unavailable(failure: Failure) -> Failure:
        if failure.check(LdapError, TimeoutError, CancelledError):
            return failure
        return Failure(LdapUnavailable(f"cannot reach the directory: {failure.getErrorMessage()}"))

    def _bounded(self, d: Deferred[Any], client: BoundedLDAPClient | None = None) -> Deferred[Any]:
        """`d` within the timeout; on timeout the client (if any) is dropped."""

        def timed_out(failure: Failure) -> Failure:
            if failure.check(TimeoutError, CancelledError):
                if client is not None:
                    client.kill()
                return Failure(LdapTimeout(f"the directory did not answer in {self.timeout:g}s"))
            return failure

        d.addTimeout(self.timeout, self.clock)
        return d.addErrback(timed_out)

    def _send(self, client: BoundedLDAPClient, op: Any) -> Deferred[Any]:
        """One request with one reply, bounded in time."""
        try:
            d = client.send(op)
        except Exception as e:  # noqa: BLE001 (not connected any more)
            return fail(LdapUnavailable(f"connection to the directory lost: {e}"))
        return self._bounded(d, client)

    def _service_client(self) -> Deferred[BoundedLDAPClient]:
        """The service connection (bound as the service user), connecting when needed."""
        if self._service is not None and self._service.connected:
            return succeed(self._service)
        waiter: Deferred[BoundedLDAPClient] = Deferred()
        if self._service_waiters is not None:
            self._service_waiters.append(waiter)
            return waiter
        self._service_waiters = [waiter]

        def bound(client: BoundedLDAPClient) -> Deferred[BoundedLDAPClient]:
            op = pureldap.LDAPBindRequest(dn=self.service_dn, auth=self.service_password)

            def checked(reply: Any) -> BoundedLDAPClient:
                if reply.resultCode != SUCCESS:
                    client.kill()
                    if reply.resultCode in UNAVAILABLE_CODES:
                        raise LdapUnavailable(f"the directory answered {reply.resultCode}")
                    raise LdapServiceBindFailed(
                        f"the service user's bind was refused (result {reply.resultCode})"
                    )
                return client

            return self._send(client, op).addCallback(checked)

        def done(result: Any) -> None:
            waiters, self._service_waiters = self._service_waiters or [], None
            if isinstance(result, BoundedLDAPClient):
                if self.closed:
                    result.kill()
                    result = Failure(LdapUnavailable("the directory client is closed"))
                else:
                    self._service = result
                    result.on_lost = self._service_lost
            for w in waiters:
                w.callback(result) if not isinstance(result, Failure) else w.errback(result)

        self._connect().addCallback(bound).addBoth(done)
        return waiter

    def _service_lost(self, client: BoundedLDAPClient) -> None:
        if self._service is client:
            self._service = None

    def _bind_client(self) -> Deferred[BoundedLDAPClient]:
        """A bind-pool connection for one bind (idle, new, or the next one released)."""
        while self._idle:
            client = self._idle.pop()
            if client.connected:
                return succeed(client)
            self._bind_count -= 1
        if self._bind_count < self.max_bind_connections:
            self._bind_count += 1

            def failed(failure: Failure) -> Failure:
                self._bind_count -= 1
                return failure

            return self._connect().addErrback(failed)
        if len(self._bind_waiters) >= self.max_waiting:
            return fail(LdapUnavailable("too many requests waiting for a directory connection"))
        waiter: Deferred[BoundedLDAPClient] = Deferred()
        self._bind_waiters.append(waiter)
        return self._bounded(waiter)

    def _bind_release(self, client: BoundedLDAPClient, healthy: bool) -> None:
        """Give a bind connection back (to a waiter first), or drop it."""
        if healthy and client.connected and not self.closed:
            while self._bind_waiters:
                waiter = self._bind_waiters.popleft()
                if not waiter.called:
                    waiter.callback(client)
                    return
            self._idle.append(client)
            return
        self._bind_count -= 1
        if client.connected:
            client.kill()
        while self._bind_waiters:  # room for a new connection: give it to a waiter
            waiter = self._bind_waiters.popleft()
            if not waiter.called:
                self._bind_count += 1

                def failed(failure: Failure) -> Failure:
                    self._bind_count -= 1
                    return failure

                self._connect().addErrback(failed).chainDeferred(waiter)
                return

    # -- operations ------------------------------------------------------------------------------

    def find(
        self, base: str, subtree: bool, filter_: Any, limit: int = 2
    ) -> Deferred[tuple[list[str], bool]]:
        """(DNs, more) of the entries under `base` matching `filter_` (a pureldap filter),
        searched as the service user: at most `limit` DNs, `more` when there were others."""
        self._begin()
        scope = pureldap.LDAP_SCOPE_wholeSubtree if subtree else pureldap.LDAP_SCOPE_singleLevel
        op = pureldap.LDAPSearchRequest(
            baseObject=base,
            scope=scope,
            derefAliases=pureldap.LDAP_DEREF_neverDerefAliases,
            sizeLimit=limit,
            timeLimit=max(1, int(self.timeout)),
            typesOnly=0,
            filter=filter_,
            attributes=["1.1"],  # RFC 4511 §4.5.1.8: no attributes, only the DNs
        )

        def search(client: BoundedLDAPClient) -> Deferred[tuple[list[str], bool]]:
            found: list[str] = []
            result: Deferred[tuple[list[str], bool]] = Deferred()

            def handler(reply: Any) -> bool:
                if isinstance(reply, pureldap.LDAPSearchResultEntry):
                    name = reply.objectName
                    found.append(name.decode("utf-8") if isinstance(name, bytes) else str(name))
                    if len(found) > limit and not result.called:  # it ignored the size limit
                        result.callback((found[:limit], True))
                    return False
                if isinstance(reply, pureldap.LDAPSearchResultReference):
                    return False  # referrals are not followed
                if not isinstance(reply, pureldap.LDAPSearchResultDone):
                    raise LdapGarbage(f"unexpected search reply {type(reply).__name__}")
                code = reply.resultCode
                if result.called:
                    return True
                if code in (SUCCESS, NO_SUCH_OBJECT):
                    result.callback((found, False))
                elif code == SIZE_LIMIT_EXCEEDED:
                    result.callback((found, True))
                else:
                    result.errback(LdapUnavailable(
                        f"the directory answered the search with result {code}"))
                return True

            try:
                sent = client.send_multiResponse(op, handler)
            except Exception as e:  # noqa: BLE001
                return fail(LdapUnavailable(f"connection to the directory lost: {e}"))
            sent.addErrback(lambda f: None if result.called else result.errback(f))
            return self._bounded(result, client)

        return _shielded(self._service_client().addCallback(search).addBoth(self._end))

    def authenticate(self, dn: str, password: str) -> Deferred[bool]:
        """True when a simple bind as `dn` with `password` succeeds, False when the directory
        refuses the credentials; a failure (LdapError) when it cannot answer. An empty password
        is False without asking (RFC 4513 §5.1.2: it would be an unauthenticated bind)."""
        if not password:
            return succeed(False)
        self._begin()

        def bind(client: BoundedLDAPClient) -> Deferred[bool]:
            op = pureldap.LDAPBindRequest(dn=dn, auth=password)

            def answered(reply: Any) -> bool:
                code = getattr(reply, "resultCode", None)
                if not isinstance(reply, pureldap.LDAPBindResponse):
                    self._bind_release(client, False)
                    raise LdapGarbage("the directory answered a bind with something else")
                if code in UNAVAILABLE_CODES:
                    self._bind_release(client, False)
                    raise LdapUnavailable(f"the directory answered the bind with result {code}")
                self._bind_release(client, True)
                return code == SUCCESS

            def lost(failure: Failure) -> Failure:
                self._bind_release(client, False)
                return failure

            return self._send(client, op).addCallbacks(answered, lost)

        return _shielded(self._bind_client().addCallback(bind).addBoth(self._end))

    def _begin(self) -> None:
        self._busy += 1
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _end(self, result: Any) -> Any:
        self._busy -= 1
        idle = self._busy == 0 and not self.closed and self.idle_seconds > 0
        if idle and (self._service is not None or self._idle):
            self._idle_timer = self.clock.callLater(self.idle_seconds, self._close_idle)
        return result

    def _close_idle(self) -> None:
        """Nothing happened for `idle_seconds`: close the connections (reopened on demand)."""
        self._idle_timer = None
        self._drop_connections()

    def _drop_connections(self) -> list[Deferred[None]]:
        """Close the idle connections (and the service one); their `gone` Deferreds."""
        service, self._service = self._service, None
        idle, self._idle = self._idle, []
        self._bind_count -= len(idle)
        gone = []
        for client in ([service] if service is not None else []) + idle:
            if client.connected:
                gone.append(client.gone)
                client.kill()
        return gone

    def close(self) -> Deferred[Any]:
        """Close every connection and the idle timer (the gateway stopping); fires when the
        connections are closed."""
        from twisted.internet.defer import gatherResults

        self.closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        gone = self._drop_connections()
        waiters, self._bind_waiters = self._bind_waiters, deque()
        for waiter in waiters:
            if not waiter.called:
                waiter.errback(LdapUnavailable("the directory client is closed"))
        return gatherResults(gone)
