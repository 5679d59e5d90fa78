"""Active health checks (the `upstream-health-check` policy, a flexgw extension): each address
of a Service is checked every `intervalSeconds` (spread by `jitterPercent`), over HTTP/1.1 or
HTTP/2 (the Service's scheme: h2c, or h2 over TLS) with the Service's TLS settings, or by a TCP
connect. `unhealthyThreshold` failures in a row take the address out of rotation,
`healthyThreshold` successes in a row bring it back.

An HTTP check sends `method path` with `Host` (the configured one, else the Service's) and
passes when the status is one of `expectedStatuses` (default 200-299) within `timeoutSeconds`.
The check's connection is kept open between checks when the upstream allows it, as Envoy
does: a check then costs one request and one response, not a connection. The checks of a
Service are driven by one timer ticking `interval / 20` (a small timing wheel: no timer per
check, none per timeout), so 1,000 addresses checked every second cost one timer call per tick.
"""

from __future__ import annotations

import random
from typing import Any

import attrs
import httptools
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from flexgw.http.fastwrite import send_now
from flexgw.http.h2 import settings as h2settings
from flexgw.http.h2.connection import H2Codec, StreamClosedError
from flexgw.upstream.connection import MAX_RESPONSE_HEAD

_log = Logger(namespace="flexgw.upstream")
#: A check connection's SETTINGS: no push.
_H2_SETTINGS = {h2settings.ENABLE_PUSH: 0}


@attrs.frozen
class HealthPolicy:
    """One Service's health check settings."""

    kind: str = "http"  # "http" or "tcp"
    path: str = "/"
    host: str | None = None  # the Host to send (None: the Service's)
    method: str = "GET"
    statuses: frozenset[int] = frozenset(range(200, 300))
    interval: float = 5.0
    jitter: float = 0.1  # a fraction of the interval, added or taken at random
    timeout: float = 1.0
    healthy_threshold: int = 1
    unhealthy_threshold: int = 2


class _H1Probe(Protocol):
    """An HTTP/1.1 check connection: one request at a time, kept open when allowed."""

    def __init__(self, check: _Check) -> None:
        self.check = check
        self.parser = httptools.HttpResponseParser(self)
        self.keep = True
        self.done = False

    def connectionMade(self) -> None:
        """Connected (over TLS: the handshake follows): send the check's request."""
        self.check.connected(self)

    def send(self, request: bytes) -> None:
        """Send one check request."""
        self.done = False
        send_now(self.transport, request)

    def dataReceived(self, data: bytes) -> None:
        """Parse the response; its status decides."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.keep = False
            self.transport.abortConnection()
            self.check.answered(self, 0)

    def on_headers_complete(self) -> None:
        """The status is known; a response that closes the connection is not reused."""
        if not self.parser.should_keep_alive():
            self.keep = False

    def on_message_complete(self) -> None:
        """The whole response arrived (its body is read and dropped)."""
        if not self.done:
            self.done = True
            self.check.answered(self, self.parser.get_status_code())

    def connectionLost(self, reason: Failure | None = None) -> None:
        """The upstream closed: the next check connects again."""
        self.keep = False
        self.check.lost(self)


class _H2Probe(Protocol):
    """An HTTP/2 check connection (prior knowledge, or ALPN h2 over TLS): one stream per check,
    on flexgw's codec (the handler of its calls)."""

    def __init__(self, check: _Check) -> None:
        self.check = check
        self.conn = H2Codec(
            self,
            client=True,
            local_settings=_H2_SETTINGS,
            max_header_list=MAX_RESPONSE_HEAD,
            header_block_limit=MAX_RESPONSE_HEAD,
        )
        self.keep = True
        self.stream_id = 0

    def connectionMade(self) -> None:
        """Connected: the HTTP/2 preface, then the check's request."""
        self.conn.initiate()
        self._flush()
        self.check.connected(self)

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            send_now(self.transport, data)

    def send(self, request: Any) -> None:
        """Open a stream with the check's request headers."""
        stream_id = self.stream_id = self.conn.next_stream_id
        try:
            self.conn.send_headers(stream_id, request, end_stream=True)
        except StreamClosedError:  # the codec stopped (a connection error): no stream now
            self._failed()
            return
        self._flush()

    def _failed(self) -> None:
        """The connection is unusable: the check in flight failed, the next one reconnects."""
        self.keep = False
        self.transport.abortConnection()
        if self.stream_id:
            self.stream_id = 0
            self.check.answered(self, 0)

    def dataReceived(self, data: bytes) -> None:
        """Frames, for the codec (its calls below); the check's response head decides."""
        conn = self.conn
        conn.receive(data)
        if conn.closed:  # the upstream broke the protocol
            self._flush()  # our GOAWAY
            self._failed()
            return
        self._flush()

    def h2_headers(self, stream_id: int, headers: list, end_stream: bool) -> None:
        """A response head: the check's final one answers it."""
        status = self.conn.status
        if stream_id == self.stream_id and status >= 200:
            self.stream_id = 0
            self.check.answered(self, status)

    def h2_data(self, stream_id: int, data: bytes, flow: int, end_stream: bool) -> None:
        """Body bytes are dropped, their window handed back."""
        if flow:
            self.conn.acknowledge(stream_id, flow)

    def h2_reset(self, stream_id: int, code: int, remote: bool) -> None:
        """The check's stream was reset before its head: the check failed."""
        if stream_id == self.stream_id:
            self.stream_id = 0
            self.check.answered(self, 0)

    def h2_goaway(self, last_stream_id: int, code: int) -> None:
        """The upstream is going away: the next check connects again."""
        self.keep = False

    def h2_trailers(self, stream_id: int, headers: list) -> None:
        """Trailers end a response already judged."""

    def h2_window(self, stream_id: int) -> None:
        """A check sends no body."""

    def h2_settings(self) -> None:
        """The upstream's SETTINGS (the codec applies them)."""

    def h2_control(self) -> None:
        """Control frames of a check connection are not limited."""

    def connectionLost(self, reason: Failure | None = None) -> None:
        """The upstream closed: the next check connects again."""
        self.keep = False
        self.check.lost(self)


class _TCPProbe(Protocol):
    """A TCP check: connected is healthy; closed at once."""

    def __init__(self, check: _Check) -> None:
        self.check = check
        self.keep = False

    def connectionMade(self) -> None:
        """Connected: pass, and close."""
        self.transport.loseConnection()
        self.check.answered(self, -1)

    def connectionLost(self, reason: Failure | None = None) -> None:
        """Closed (by us)."""
        self.check.lost(self)


class _Connect(ClientFactory):
    """One check's connection attempt."""

    noisy = False

    def __init__(self, check: _Check) -> None:
        self.check = check

    def buildProtocol(self, addr: Any) -> Protocol:
        """The probe protocol for the check's kind."""
        return self.check.checker.protocol(self.check)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        """Refused or unreachable: the check failed."""
        self.check.failed()


class _Check:
    """The checks of one address: its kept connection and the check in flight."""

    __slots__ = ("checker", "in_flight", "member", "probe", "serial", "stopped")

    def __init__(self, checker: HealthChecker, member: Any) -> None:
        self.checker = checker
        self.member = member
        self.probe: Any = None  # the kept connection
        self.in_flight = False
        self.serial = 0  # which check is in flight (a timeout names the one it is for)
        self.stopped = False

    def run(self) -> None:
        """Check now (the checker's wheel calls it, and schedules the next one)."""
        if self.in_flight or self.stopped:
            return  # (its timeout comes first: timeout <= interval)
        checker = self.checker
        self.in_flight = True
        self.serial += 1
        checker.expect(self)
        probe = self.probe
        if probe is not None and probe.keep:
            probe.send(checker.request)
            return
        self.probe = None
        member = self.member
        factory: Any = _Connect(self)
        tls = checker.upstream.tls
        if tls is not None and checker.policy.kind != "tcp":
            from flexgw.tls.contexts import QuietTLSFactory

            factory = QuietTLSFactory(tls.creator, True, factory)
        checker.reactor.connectTCP(member.host, member.port, factory, timeout=checker.policy.timeout)

    def connected(self, probe: Any) -> None:
        """A new check connection is up: send the pending check on it."""
        self.probe = probe
        if self.stopped:
            probe.transport.abortConnection()
        elif self.in_flight:
            probe.send(self.checker.request)

    def answered(self, probe: Any, status: int) -> None:
        """A response (`status`; -1 for a TCP connect, 0 for garbage)."""
        if not self.in_flight or self.stopped:
            return
        self.in_flight = False
        ok = status == -1 or status in self.checker.policy.statuses
        self.checker.verdict(self.member, ok)

    def failed(self) -> None:
        """The connection could not be made."""
        if self.in_flight and not self.stopped:
            self.in_flight = False
            self.checker.verdict(self.member, False)

    def lost(self, probe: Any) -> None:
        """The check connection closed: a check waiting on it failed."""
        if self.probe is probe:
            self.probe = None
        if self.in_flight and not self.stopped and self.checker.policy.kind != "tcp":
            self.in_flight = False
            self.checker.verdict(self.member, False)

    def timed_out(self, serial: int) -> None:
        """Check number `serial` got no answer within timeoutSeconds: failed; the connection is
        dropped (nothing if that check already ended)."""
        if not self.in_flight or serial != self.serial or self.stopped:
            return
        self.in_flight = False
        probe, self.probe = self.probe, None
        if probe is not None:
            probe.keep = False
            if probe.transport is not None:
                probe.transport.abortConnection()
        self.checker.verdict(self.member, False)

    def stop(self) -> None:
        """No more checks of this address."""
        self.stopped = True
        self.in_flight = False
        probe, self.probe = self.probe, None
        if probe is not None and probe.transport is not None:
            probe.transport.abortConnection()


class HealthChecker:
    """The active checks of one cluster's addresses."""

    def __init__(self, cluster: Any, policy: HealthPolicy, rng: random.Random) -> None:
        self.cluster = cluster
        self.policy = policy
        self.rng = rng
        self.reactor = cluster.manager.reactor
        self.clock = cluster.clock
        self.upstream = cluster.upstream
        self.checks: dict[Any, _Check] = {}
        self.checks_run = 0
        # The wheel: `slots` lists of checks due (or timeouts to judge), one slot per tick;
        # wide enough for an interval plus its jitter.
        self.tick = policy.interval / 20
        self.slots: list[list[Any]] = [[] for _ in range(int(40 * (1 + policy.jitter)) + 2)]
        self.position = 0
        self.timeout_ticks = max(1, round(policy.timeout / self.tick))
        # (withCount: ticks the reactor was too busy to run are turned too, so a loaded
        # gateway still checks every interval and judges timeouts after timeoutSeconds)
        self.loop = LoopingCall.withCount(self._turns)
        self.loop.clock = self.clock
        upstream = self.upstream
        host = policy.host or upstream.authority
        if policy.kind == "tcp":
            self.protocol: Any = _TCPProbe
            self.request: Any = None
        elif upstream.scheme in ("h2", "h2c"):
            self.protocol = _H2Probe
            self.request = [
                (b":method", policy.method.encode("ascii")),
                (b":scheme", b"https" if upstream.scheme == "h2" else b"http"),
                (b":authority", host.encode("latin-1")),
                (b":path", policy.path.encode("latin-1")),
                (b"user-agent", b"flexgw-health-check"),
            ]
        else:
            self.protocol = _H1Probe
            self.request = (
                f"{policy.method} {policy.path} HTTP/1.1\r\nHost: {host}\r\n"
                "User-Agent: flexgw-health-check\r\n\r\n"
            ).encode("latin-1")

    def _schedule(self, entry: Any, ticks: int) -> None:
        """Put `entry` (a check, or a (check, serial) timeout) `ticks` ticks ahead."""
        slots = self.slots
        slots[(self.position + ticks) % len(slots)].append(entry)

    def _next_ticks(self) -> int:
        """Ticks to the next check of an address: the interval, spread by the jitter."""
        jitter = self.policy.jitter
        spread = 1 + self.rng.uniform(-jitter, jitter) if jitter else 1
        return max(1, round(20 * spread))

    def _turns(self, ticks: int) -> None:
        """`ticks` ticks have passed since the last turn (more than one when the reactor was
        late): turn the wheel that far (at most once round: everything on it is due then)."""
        if ticks == 1:
            self._turn()
            return
        postponed: list[Any] = []
        for _ in range(min(ticks, len(self.slots))):
            self._turn(postponed)
        for check, serial in postponed:
            self._schedule((check, serial, True), 1)

    def _turn(self, postponed: list[Any] | None = None) -> None:
        """One tick: run the checks due, judge the timeouts due. A timeout coming due while
        the wheel catches up with a late reactor goes to `postponed`, judged one tick after
        the catch-up, once: answers that arrived during the delay are read first (timers run
        before the reactor polls)."""
        slots = self.slots
        self.position = position = (self.position + 1) % len(slots)
        due, slots[position] = slots[position], []
        for entry in due:
            if entry.__class__ is tuple:
                if postponed is not None and len(entry) == 2:
                    postponed.append(entry)
                else:
                    entry[0].timed_out(entry[1])
            elif entry.in_flight and not entry.stopped:
                # The previous check's timeout is still to be judged (it falls on this tick,
                # or was postponed by a catch-up): this one runs right after, a tick later.
                self._schedule(entry, 1)
            elif not entry.stopped:
                self._schedule(entry, self._next_ticks())
                entry.run()

    def expect(self, check: _Check) -> None:
        """A check was sent: its timeout is judged `timeoutSeconds` from now."""
        self._schedule((check, check.serial), self.timeout_ticks)

    def watch(self, member: Any) -> None:
        """Check a new address: first within one interval (at random, so that the checks of
        many addresses, and their connections, spread over the interval)."""
        check = self.checks[member] = _Check(self, member)
        self._schedule(check, self.rng.randrange(1, 21))
        if not self.loop.running:
            self.loop.start(self.tick, now=False)

    def forget(self, member: Any) -> None:
        """An address left the set: stop checking it (its wheel entries are dropped as they
        come up)."""
        check = self.checks.pop(member, None)
        if check is not None:
            check.stop()

    def stop(self) -> None:
        """The cluster retired: stop every check."""
        if self.loop.running:
            self.loop.stop()
        for check in self.checks.values():
            check.stop()
        self.checks.clear()

    def verdict(self, member: Any, ok: bool) -> None:
        """One check's result: move the address in or out of rotation at the thresholds."""
        self.checks_run += 1
        policy = self.policy
        if ok:
            member.health_failures = 0
            member.health_successes += 1
            if not member.healthy and member.health_successes >= policy.healthy_threshold:
                member.healthy = True
                _log.info(
                    "Upstream {upstream}: address {address} is healthy again",
                    upstream=self.upstream.key,
                    address=member.address,
                )
                self.cluster.rebuild()
        else:
            member.health_successes = 0
            member.health_failures += 1
            if member.healthy and member.health_failures >= policy.unhealthy_threshold:
                member.healthy = False
                _log.warn(
                    "Upstream {upstream}: address {address} failed {n} health checks; out of"
                    " rotation",
                    upstream=self.upstream.key,
                    address=member.address,
                    n=member.health_failures,
                )
                self.cluster.rebuild()
