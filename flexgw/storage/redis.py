"""The Redis rate-limit store (`Configuration.spec.sharedStorage.redis`) and a minimal RESP client.

Store
-----
`RedisRateLimitStore.hit` runs **one Lua script** per request (EVALSHA, EVAL when the server does
not know the script yet): it reads every limit's window of the key, opens the windows that ended
(or never started) at the request's time, checks every limit, counts the request in all of them
only when each has quota left, and answers the quotas. Redis runs a script atomically, so every
gateway sharing the server sees one consistent count.

One Redis hash per key, named `<namespace><key value>`; the namespace is made by the policy from
the API, the binding and a fingerprint of its limits (`flexgw:rl:<api>:<binding>:<fp>:`), so a
binding whose limits change starts from zero, as with the memory store. Fields `1`, `2`, ... hold
`end_0, count_0, end_1, count_1, ...` (window ends in milliseconds). The key expires (PEXPIRE,
relative, so Redis's own clock is irrelevant) 5 s after its last window ends: the script itself
restarts ended windows, so the margin changes no count; it only keeps a key from vanishing early
when the caller's clock and real time drift apart (a replica whose clock lags, or a slow caller
whose requests are far apart in real time but not on its clock).

Window times come from the clock the store is given (the gateway's reactor), passed to the script
as an argument: replicas sharing a Redis should keep their clocks in sync (NTP); a skew of `s`
milliseconds moves a window's end by at most `s` for the replica that did not open it.

Client
------
`RedisClient` is a small RESP2 client on `twisted.internet.protocol` (txredisapi was not used: it
imports the global reactor and queues commands while Redis is down instead of failing them, so a
request would wait for Redis to come back rather than fall to `blockOnUnknownQuota`). One
connection, opened at the first command and reopened at the first command after it is lost; AUTH
and SELECT are sent on every new connection. Every command has a timeout (`command_timeout`,
connecting included) after which its Deferred fails (`RedisTimeout`, a `TimeoutError`).

Outages
-------
The client has an `OutageBreaker` (flexgw.storage.breaker). A command that times out, or whose
connection cannot be opened or is lost under it, trips the breaker: Redis is marked down once,
with one log record, and a stalled connection is aborted, so the commands queued behind the one
that timed out fail at once instead of each waiting out its own timeout. While down, every
command (and `RedisRateLimitStore.hit`, synchronously) fails at once with `RedisUnavailable`
without touching the network, and a background probe (a new connection, its handshake and a
PING, bounded by `command_timeout`) runs `min_backoff` seconds after the trip, then with the
delay doubling up to `max_backoff` (0.5 s by default, so Redis is seen back within about half a
second). The first probe that gets its PONG closes the breaker (one log record, with the count of
checks answered without Redis); its connection serves the next commands. The error replies that
mean "not now" (`LOADING`, a restarted server reading its dataset; `BUSY`, a script running too
long; `MASTERDOWN`) trip the breaker too (PING gets the same reply until they end). Any other
error reply is an answer, not an outage: a check it refuses (out of memory, ACL, a replica's
READONLY without sentinels) fails with `RedisRefused`, reported to the breaker, which logs such
refusals at a bounded rate. A connection lost while no command waits on it is simply reopened
by the next command.

Sentinel and TLS
----------------
With `sentinel` (flexgw.plan.RedisSentinel) every new connection starts by asking the
sentinels, in their configured order, `SENTINEL get-master-addr-by-name <masterName>` (after
AUTH with the sentinel password, if any); the first that names a master wins. The client then
connects to that master and checks with `ROLE` that it is one (a sentinel may not have noticed
a failover yet). A lost connection (Sentinel itself kills clients when it demotes a master) and
a `READONLY` reply (the master became a replica) both drop the connection, so the next command
asks the sentinels again; a command refused with `READONLY` is sent once more on the new
connection (Redis executed nothing of it). A probe asks the sentinels too, so the breaker closes
once they name a reachable master.

With `tls` (a callable from a host name to an IOpenSSLClientConnectionCreator, built by
flexgw.policies.base from `sharedStorage.redis.tls`) every connection, to the sentinels and to
the master, is TLS, verified for the host it connects to. A connection counts as up only once
its first reply arrived (a PING when nothing else is sent), so a refused certificate is a failed
connection attempt (an outage, probed like any other).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    FirstError,
    TimeoutError,
    fail,
    gatherResults,
)
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from flexgw.storage.breaker import (
    MAX_PROBE_INTERVAL,
    MIN_PROBE_INTERVAL,
    SUMMARY_INTERVAL,
    OutageBreaker,
)
from flexgw.storage.breaker import describe as _describe
from flexgw.storage.interfaces import HitResult, IRateLimitStore, Quota, RateLimit, StoreUnavailable

_log = Logger()


class RedisError(Exception):
    """An error reply from the server (`-ERR ...`)."""


class RedisUnavailable(StoreUnavailable):
    """The server cannot be reached (not connected, connection lost, handshake refused, or known
    down: the breaker is open)."""


class RedisTimeout(RedisUnavailable, TimeoutError):
    """A command got no reply within `command_timeout`."""


class RedisRefused(StoreUnavailable):
    """Redis is up but refused the rate-limit check with an error reply (logged by the breaker,
    at a bounded rate)."""


#: Error replies that mean the server cannot serve commands for now: an outage for the breaker.
OUTAGE_REPLIES = ("LOADING", "BUSY", "MASTERDOWN")


def is_readonly(error: BaseException) -> bool:
    """An error reply saying the server is a read-only replica (a failover happened)."""
    return isinstance(error, RedisError) and str(error).startswith("READONLY")


class _Incomplete(Exception):
    """The buffer does not hold a whole reply yet."""


def encode_command(args: Sequence[Any]) -> bytes:
    """A command as a RESP array of bulk strings (str as UTF-8, int as decimal)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            data = arg.encode("utf-8")
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            data = bytes(arg)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def parse_reply(buffer: bytes | bytearray, pos: int = 0) -> tuple[Any, int]:
    """One RESP2 reply starting at `pos`: (value, position after it). Raises _Incomplete.

    Simple strings are str, errors are `RedisError` instances (returned, not raised), integers
    int, bulk strings bytes (None for null), arrays lists (None for null).
    """
    end = buffer.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buffer[pos : pos + 1]
    line = bytes(buffer[pos + 1 : end])
    after = end + 2
    if kind == b"+":
        return line.decode("utf-8", "replace"), after
    if kind == b"-":
        return RedisError(line.decode("utf-8", "replace")), after
    if kind == b":":
        return int(line), after
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, after
        if len(buffer) < after + size + 2:
            raise _Incomplete
        return bytes(buffer[after : after + size]), after + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, after
        items = []
        for _ in range(count):
            item, after = parse_reply(buffer, after)
            items.append(item)
        return items, after
    raise RedisError(f"protocol error: unexpected reply type {kind!r}")


class RespProtocol(Protocol):
    """One connection: commands are written at once, replies matched to them in order."""

    def __init__(self, client: RedisClient | None = None) -> None:
        self.client = client
        self._buffer = bytearray()
        self._pending: deque[Deferred[Any]] = deque()
        self.lost: Deferred[None] = Deferred()
        self.connected_ = False

    def connectionMade(self) -> None:
        """Ready for commands."""
        self.connected_ = True

    def send(self, args: Sequence[Any]) -> Deferred[Any]:
        """Write one command; the Deferred fires with its reply (errback for an error reply)."""
        if not self.connected_:
            return fail(RedisUnavailable("connection lost"))
        waiting: Deferred[Any] = Deferred()
        self._pending.append(waiting)
        self.transport.write(encode_command(args))  # type: ignore[union-attr]
        return waiting

    def dataReceived(self, data: bytes) -> None:
        """Parse every whole reply in the buffer and fire its command's Deferred."""
        buffer = self._buffer
        buffer += data
        pos = 0
        try:
            while pos < len(buffer):
                try:
                    reply, pos = parse_reply(buffer, pos)
                except _Incomplete:
                    break
                if not self._pending:
                    raise RedisError("protocol error: a reply nobody asked for")
                waiting = self._pending.popleft()
                if isinstance(reply, RedisError):
                    if self.client is not None and is_readonly(reply):
                        self.client._readonly(self)
                    waiting.errback(reply)
                else:
                    waiting.callback(reply)
        except (RedisError, ValueError):
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        del buffer[:pos]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        """Fail every command still waiting; tell the client."""
        self.connected_ = False
        pending, self._pending = self._pending, deque()
        for waiting in pending:
            waiting.errback(RedisUnavailable(f"connection lost: {reason.getErrorMessage()}"))
        if self.client is not None:
            self.client._lost(self)
        self.lost.callback(None)


class RedisClient:
    """A Redis connection that reconnects on demand, with an outage breaker (see the module
    docstring)."""

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        connect_timeout: float = 2.0,
        command_timeout: float = 2.0,
        min_backoff: float = MIN_PROBE_INTERVAL,
        max_backoff: float = MAX_PROBE_INTERVAL,
        sentinel: Any = None,
        tls: Any = None,
        summary_interval: float = SUMMARY_INTERVAL,
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.username = username
        self.password = password
        self.db = db
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.sentinel = sentinel  # RedisSentinel (master_name, addresses, password), or None
        self.tls = tls  # host name -> IOpenSSLClientConnectionCreator, or None: plaintext
        self.master: tuple[str, int] | None = None  # the last master the sentinels named
        self.connections = 0  # successful connections so far (for tests and logs)
        self._protocol: RespProtocol | None = None
        self._waiting: list[Deferred[RespProtocol]] | None = None
        self._opening: Deferred[Any] | None = None  # the connection attempt under way
        self._closed = False
        # min_backoff/max_backoff: the probe delays while Redis is down
        self.breaker = OutageBreaker(
            reactor, f"Redis at {self.address}", self._probe, min_backoff, max_backoff,
            summary_interval, unavailable=RedisUnavailable,
        )

    @property
    def address(self) -> str:
        """host:port (or the sentinel master name), for messages."""
        if self.sentinel is not None:
            return f"sentinel master {self.sentinel.master_name!r}"
        return f"{self.host}:{self.port}"

    def execute(self, *args: Any) -> Deferred[Any]:
        """Send one command; fails with RedisUnavailable (at once while Redis is known down),
        RedisTimeout or RedisError."""
        breaker = self.breaker
        if breaker.down_since is not None:
            return fail(breaker.refuse())
        result = self._send(args)
        if self.sentinel is not None:
            result.addErrback(self._again_if_readonly, args)
        return result.addTimeout(self.command_timeout, self.reactor).addErrback(self._failed)

    def _failed(self, failure: Failure) -> Failure:
        """A command failed: a timeout or a connection failure trips the breaker (see the
        module docstring); a timeout also aborts the stalled connection."""
        if self._closed:
            return failure
        if failure.check(RedisError) and str(failure.value).startswith(OUTAGE_REPLIES):
            error = RedisUnavailable(f"Redis at {self.address} answered {failure.value}")
            self.breaker.trip(str(failure.value))
            return Failure(error)
        if not failure.check(RedisUnavailable, TimeoutError):
            return failure
        if failure.check(RedisUnavailable):
            self.breaker.trip(_describe(failure.value))
            return failure
        error = RedisTimeout(f"no reply within {self.command_timeout}s")
        self.breaker.trip(str(error))
        self._drop()  # the commands behind this one would wait as long: fail them now
        return Failure(error)

    def _drop(self) -> None:
        """Abort the current connection, if any (its waiting commands fail)."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.connected_:
            protocol.transport.abortConnection()  # type: ignore[union-attr]

    def _probe(self) -> Deferred[Any]:
        """The breaker's probe: a new connection (handshake included) answering PING in time."""
        self._drop()
        answer = self._connection().addCallback(lambda protocol: protocol.send(["PING"]))
        return answer.addTimeout(self.command_timeout, self.reactor)

    def when_up(self) -> Deferred[None]:
        """Fires when Redis is not known down (at once if it is not)."""
        return self.breaker.when_up()

    def _send(self, args: Sequence[Any]) -> Deferred[Any]:
        """Send on the current connection, or on a new one."""
        protocol = self._protocol
        if protocol is not None:
            return protocol.send(args)
        return self._connection().addCallback(lambda p: p.send(args))

    def _again_if_readonly(self, failure: Failure, args: Sequence[Any]) -> Any:
        """After a failover the old master refuses writes: once more, on a new connection."""
        if is_readonly(failure.value):
            return self._send(args)
        return failure

    def _readonly(self, protocol: RespProtocol) -> None:
        """A READONLY reply: this server is a replica now; with sentinels, drop the connection
        (the next one goes to the master they name). A fixed `address` is kept as it is."""
        if self.sentinel is None:
            return
        if self._protocol is protocol:
            self._protocol = None
            _log.warn("Redis {master} answered READONLY: asking the sentinels again",
                          master=self.master)
        protocol.transport.abortConnection()  # type: ignore[union-attr]

    def evalsha(self, sha: str, script: str, keys: Sequence[Any], args: Sequence[Any]) -> Deferred[Any]:
        """Run a script by its SHA1, sending its source once when the server does not have it."""

        def retry(failure: Failure) -> Any:
            if failure.check(RedisError) and str(failure.value).startswith("NOSCRIPT"):
                return self.execute("EVAL", script, len(keys), *keys, *args)
            return failure

        return self.execute("EVALSHA", sha, len(keys), *keys, *args).addErrback(retry)

    def close(self) -> Deferred[None]:
        """Close the connection for good; fires when it is closed."""
        self._closed = True
        self.breaker.close()
        if self._opening is not None:  # e.g. a probe's attempt: stop it (a clean reactor)
            self._opening.cancel()
        protocol, self._protocol = self._protocol, None
        if protocol is None or not protocol.connected_:
            return _succeeded()
        protocol.transport.loseConnection()  # type: ignore[union-attr]
        return protocol.lost

    def _connection(self) -> Deferred[RespProtocol]:
        """A Deferred firing with a ready connection (one attempt shared by its callers)."""
        if self._closed:
            return fail(RedisUnavailable("client closed"))
        waiting: Deferred[RespProtocol] = Deferred()
        if self._waiting is not None:
            self._waiting.append(waiting)
            return waiting
        self._waiting = [waiting]
        opening = self._opening = Deferred.fromCoroutine(self._open())
        opening.addCallbacks(self._up, self._down)
        return waiting

    async def _open(self) -> RespProtocol:
        """Connect to the master (asking the sentinels where it is, if configured), handshake."""
        if self.sentinel is None:
            host, port = self.host, self.port
        else:
            host, port = await self._ask_sentinels()
            if self.master != (host, port):
                _log.info(
                    "Redis master {name!r} is at {host}:{port}",
                    name=self.sentinel.master_name, host=host, port=port,
                )
            self.master = (host, port)
        protocol: RespProtocol = await self._connect(host, port, RespProtocol(self))
        return await self._handshake(protocol, host, port)

    def _connect(self, host: str, port: int, protocol: RespProtocol) -> Deferred[Any]:
        """A TCP (or TLS, verified for `host`) connection to host:port."""
        endpoint: Any = HostnameEndpoint(self.reactor, host, port, timeout=self.connect_timeout)
        if self.tls is not None:
            endpoint = wrapClientTLS(self.tls(host), endpoint)
        return connectProtocol(endpoint, protocol)

    async def _ask_sentinels(self) -> tuple[str, int]:
        """The master's address from the first sentinel (in order) that knows it."""
        assert self.sentinel is not None
        name = self.sentinel.master_name
        errors = []
        for host, port in self.sentinel.addresses:
            protocol = RespProtocol()
            try:
                await self._connect(host, port, protocol)
                if self.sentinel.password is not None:
                    await protocol.send(["AUTH", self.sentinel.password]).addTimeout(
                        self.command_timeout, self.reactor
                    )
                reply = await protocol.send(["SENTINEL", "get-master-addr-by-name", name]).addTimeout(
                    self.command_timeout, self.reactor
                )
                if not isinstance(reply, list) or len(reply) != 2:
                    raise RedisError(f"does not know master {name!r}")
                return reply[0].decode("utf-8"), int(reply[1])
            except CancelledError:
                raise  # the client is closed
            except Exception as exc:  # noqa: BLE001 (every failure means: ask the next sentinel)
                errors.append(f"{host}:{port}: {_describe(exc)}")
            finally:
                if protocol.connected_:
                    protocol.transport.loseConnection()  # type: ignore[union-attr]
        raise RedisUnavailable(f"no sentinel named master {name!r} ({'; '.join(errors)})")

    def _handshake(self, protocol: RespProtocol, host: str, port: int) -> Deferred[RespProtocol]:
        """AUTH, SELECT and (with sentinels) ROLE on a new connection, pipelined; with TLS and
        nothing else to send, PING (so the TLS handshake is over before the connection is up)."""
        steps = []
        if self.password is not None:
            auth = ["AUTH", self.password] if not self.username else ["AUTH", self.username, self.password]
            steps.append(protocol.send(auth))
        if self.db:
            steps.append(protocol.send(["SELECT", self.db]))
        if self.sentinel is not None:
            steps.append(protocol.send(["ROLE"]).addCallback(_must_be_master, host, port))
        if not steps and self.tls is not None:
            steps.append(protocol.send(["PING"]))
        if not steps:
            return _succeeded(protocol)

        def refused(failure: Failure) -> Failure:
            if protocol.connected_:
                protocol.transport.abortConnection()  # type: ignore[union-attr]
            return failure

        return (
            gatherResults(steps, consumeErrors=True)
            .addErrback(lambda f: f.value.subFailure if isinstance(f.value, FirstError) else f)
            .addTimeout(self.command_timeout, self.reactor)
            .addCallbacks(lambda _: protocol, refused)
        )

    def _up(self, protocol: RespProtocol) -> None:
        """Connected: serve the waiting commands."""
        waiting, self._waiting, self._opening = self._waiting or [], None, None
        if self._closed:
            protocol.transport.loseConnection()  # type: ignore[union-attr]
            for each in waiting:
                each.errback(RedisUnavailable("client closed"))
            return
        self.connections += 1
        self._protocol = protocol
        for each in waiting:
            each.callback(protocol)

    def _down(self, failure: Failure) -> None:
        """Could not connect: fail the waiting commands (an outage, see `_failed`)."""
        waiting, self._waiting, self._opening = self._waiting or [], None, None
        error = RedisUnavailable(f"cannot use Redis at {self.address}: {_describe(failure.value)}")
        for each in waiting:
            each.errback(error)

    def _lost(self, protocol: RespProtocol) -> None:
        """A connection closed: the next command opens another."""
        if self._protocol is protocol:
            self._protocol = None


def _must_be_master(reply: Any, host: str, port: int) -> Any:
    """ROLE's reply must start with "master" (the sentinels may not have seen a failover yet)."""
    role = reply[0] if isinstance(reply, list) and reply else None
    if role != b"master":
        raise RedisUnavailable(f"{host}:{port} is not a master (ROLE {role!r})")
    return reply


def _succeeded(value: Any = None) -> Deferred[Any]:
    """An already fired Deferred."""
    done: Deferred[Any] = Deferred()
    done.callback(value)
    return done


#: The check-and-count script. KEYS[1]: the key. ARGV: now_ms, then (maximum, period_ms) per limit.
#: Returns {created, allowed, remaining_1, reset_1, remaining_2, reset_2, ...}.
HIT_SCRIPT = """
local key = KEYS[1]
local now = tonumber(ARGV[1])
local n = (#ARGV - 1) / 2
local fields = {}
for i = 1, 2 * n do fields[i] = tostring(i) end
local state = redis.call('HMGET', key, unpack(fields))
local created = 1
if state[1] then created = 0 end
local ends, counts = {}, {}
local allowed = 1
local last = 0
for i = 1, n do
  local maximum = tonumber(ARGV[2 * i])
  local e = tonumber(state[2 * i - 1])
  local c = tonumber(state[2 * i])
  if e == nil or c == nil or e <= now then
    e = now + tonumber(ARGV[2 * i + 1])
    c = 0
  end
  ends[i] = e
  counts[i] = c
  if c >= maximum then allowed = 0 end
  if e > last then last = e end
end
local out = {created, allowed}
local set = {}
for i = 1, n do
  if allowed == 1 then counts[i] = counts[i] + 1 end
  set[#set + 1] = tostring(2 * i - 1)
  set[#set + 1] = string.format('%d', ends[i])
  set[#set + 1] = tostring(2 * i)
  set[#set + 1] = string.format('%d', counts[i])
  out[#out + 1] = math.max(tonumber(ARGV[2 * i]) - counts[i], 0)
  out[#out + 1] = ends[i] - now
end
redis.call('HSET', key, unpack(set))
redis.call('PEXPIRE', key, last - now + 5000)
return out
"""
HIT_SCRIPT_SHA = hashlib.sha1(HIT_SCRIPT.encode("utf-8")).hexdigest()


@implementer(IRateLimitStore)
class RedisRateLimitStore:
    """Fixed-window counters in Redis, checked and counted by one atomic script per hit."""

    def __init__(self, client: RedisClient, clock: Any, namespace: str) -> None:
        self.client = client
        self.clock = clock
        self.namespace = namespace
        self.created = 0  # keys this store created in Redis (expired ones included)

    def __len__(self) -> int:
        """Approximate: the keys this store created in Redis (they expire there on their own)."""
        return self.created

    def hit(self, key: str, limits: Sequence[RateLimit]) -> Deferred[HitResult]:
        """Check and count one request for `key` against every limit (atomically, in Redis).

        While Redis is known down, raises RedisUnavailable at once (no Deferred, no I/O)."""
        breaker = self.client.breaker
        if breaker.down_since is not None:
            raise breaker.refuse()
        now = round(self.clock.seconds() * 1000)
        args: list[int] = [now]
        for limit in limits:
            args.append(limit.maximum_requests)
            args.append(limit.period_ms)
        answer = self.client.evalsha(HIT_SCRIPT_SHA, HIT_SCRIPT, (self.namespace + key,), args)
        return answer.addCallbacks(self._result, self._refused, callbackArgs=(limits,))

    def _refused(self, failure: Failure) -> Failure:
        """An error reply to the check: RedisRefused, reported to the breaker (which logs it at
        a bounded rate); outages pass as they are."""
        if not failure.check(RedisError):
            return failure
        client = self.client
        client.breaker.refused(str(failure.value))
        return Failure(RedisRefused(f"Redis at {client.address} refused the check: {failure.value}"))

    def _result(self, reply: list[int], limits: Sequence[RateLimit]) -> HitResult:
        """The script's reply as a HitResult."""
        if reply[0]:
            self.created += 1
        quotas = tuple(
            Quota(limit, reply[2 + 2 * index], reply[3 + 2 * index])
            for index, limit in enumerate(limits)
        )
        return HitResult(bool(reply[1]), quotas)
