"""A real `etcd` for tests: one member, or a three-member cluster, on free loopback ports with a
temporary data directory; ready when its log says it serves clients; killed by its PID."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import SkipTest

from tests.harness import free_port

ETCD = shutil.which("etcd")
#: Longest wait for a member to say it serves clients (a bound, not a sleep).
READY_TIMEOUT = 20.0
#: etcd logs this once the member has joined its cluster (quorum reached) and serves clients.
READY = b"serving client traffic"
#: How much of a member's log is kept for error messages.
LOG_TAIL = 64 * 1024


class _MemberOutput(ProcessProtocol):
    """Reads a member's log as it comes (so the pipe never fills), fires `ready` at READY and
    `ended` when the process is gone."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.log = b""
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        """Keep the tail of the log; fire `ready` when the marker shows."""
        self.log = (self.log + data)[-LOG_TAIL:]
        if not self.ready.called and READY in self.log:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        """The member is gone: fail `ready` if it never got there."""
        if not self.ready.called:
            self.ready.errback(
                RuntimeError(f"etcd member {self.name} exited: {self.log[-1500:]!r}")
            )
        self.ended.callback(None)


class EtcdMember:
    """One etcd process: `name`, a client and a peer port on 127.0.0.1, a data directory."""

    def __init__(self, name: str, extra: tuple[str, ...] = ()) -> None:
        """`extra` etcd arguments; with `--cert-file` among them the client URL is https."""
        if ETCD is None:
            raise SkipTest("etcd is not installed (apt-get install etcd-server)")
        self.name = name
        self.client_port = free_port()
        self.peer_port = free_port()
        self.extra = extra
        self.scheme = "https" if "--cert-file" in extra else "http"
        self.data_dir = tempfile.mkdtemp(prefix=f"flexgw-etcd-{name}-")
        self.output: _MemberOutput | None = None
        self.process: Any = None

    @property
    def url(self) -> str:
        """The client URL (what a client's endpoint list names)."""
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        """The peer URL (what --initial-cluster names)."""
        return f"http://127.0.0.1:{self.peer_port}"

    def command(self, initial_cluster: str) -> list[str]:
        """The command line of this member in a new cluster `initial_cluster` (its members'
        "name=peer URL" list, which also makes the cluster's token)."""
        assert ETCD is not None
        return [
            ETCD,
            "--name", self.name,
            "--data-dir", self.data_dir,
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"flexgw-test-{os.getpid()}-{initial_cluster.split(':')[-1]}",
            "--logger", "zap",
            "--log-outputs", "stderr",
            *self.extra,
        ]

    def spawn(self, reactor: Any, initial_cluster: str) -> defer.Deferred[None]:
        """Start the process; the Deferred fires once it serves clients (bounded wait)."""
        self.output = _MemberOutput(self.name)
        command = self.command(initial_cluster)
        self.process = reactor.spawnProcess(
            self.output, command[0], command, env={"PATH": os.environ.get("PATH", "")}
        )
        return self.output.ready.addTimeout(READY_TIMEOUT, reactor)

    @property
    def running(self) -> bool:
        """Whether the process is alive (started and not yet ended)."""
        return self.output is not None and not self.output.ended.called

    def kill(self) -> defer.Deferred[None]:
        """SIGKILL the member by its PID; fires once it is reaped."""
        if not self.running:
            return defer.succeed(None)
        assert self.output is not None
        if self.process.pid is not None:  # None: it exited; its pipes are still closing
            os.kill(self.process.pid, signal.SIGKILL)
        ended = defer.Deferred[None]()
        self.output.ended.addBoth(lambda _: ended.callback(None))
        return ended

    def cleanup(self) -> defer.Deferred[None]:
        """Kill the member if it runs, then remove its data directory."""
        d = self.kill()
        d.addBoth(lambda _: shutil.rmtree(self.data_dir, ignore_errors=True))
        return d

    @property
    def log(self) -> bytes:
        """The tail of what the member printed."""
        return b"" if self.output is None else self.output.log


class EtcdCluster:
    """`size` etcd members on loopback forming one cluster (size 1: a single server).

    `await EtcdCluster(reactor).start()` spawns all members together (a member only serves once
    a quorum has joined) and waits until each serves clients; `kill(i)` kills member i; `stop()`
    kills them all and removes their data (register it with addCleanup before starting)."""

    def __init__(self, reactor: Any, size: int = 1, extra: tuple[str, ...] = ()) -> None:
        self.reactor = reactor
        self.size = size
        self.extra = extra
        self.members = [EtcdMember(f"m{i}", extra) for i in range(size)]
        self.retired: list[EtcdMember] = []  # members of attempts that lost a port race

    @property
    def urls(self) -> list[str]:
        """Every member's client URL, in order."""
        return [member.url for member in self.members]

    @property
    def url(self) -> str:
        """The first member's client URL."""
        return self.members[0].url

    async def start(self) -> EtcdCluster:
        """Spawn every member and wait until all serve clients. A port taken meanwhile by
        another process on the machine (free_port() only says it was free) means new ports
        for every member, at most three times."""
        for attempt in range(3):
            initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
            try:
                await defer.gatherResults(
                    [m.spawn(self.reactor, initial) for m in self.members], consumeErrors=True
                )
                return self
            except defer.FirstError as error:
                if attempt == 2 or b"address already in use" not in str(error.subFailure.value).encode():
                    raise
            await defer.gatherResults([m.kill() for m in self.members], consumeErrors=True)
            self.retired.extend(self.members)
            self.members = [EtcdMember(f"m{i}", self.extra) for i in range(self.size)]
        return self  # pragma: no cover - the loop returns or raises

    def kill(self, index: int) -> defer.Deferred[None]:
        """SIGKILL member `index` by its PID (the others keep quorum when size >= 3)."""
        return self.members[index].kill()

    def stop(self) -> defer.Deferred[Any]:
        """Kill every member and remove their data directories."""
        members = self.retired + self.members
        return defer.gatherResults([m.cleanup() for m in members], consumeErrors=True)


async def start_etcd(case: Any, reactor: Any, size: int = 1, extra: tuple[str, ...] = ()) -> EtcdCluster:
    """An etcd (size 1) or an etcd cluster for test `case`, stopped in its cleanup."""
    cluster = EtcdCluster(reactor, size, extra)
    case.addCleanup(cluster.stop)
    return await cluster.start()
