"""Integration-test harness: a real gateway on a loopback port, in front of a recording upstream."""

from __future__ import annotations

import collections
import fcntl
import io
import json
import os
import random
import shutil
import socket
import tempfile
import textwrap
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from flexgw.config.pipeline import load_config
from flexgw.service.accesslog import AccessLog
from flexgw.service.gateway import GatewayService
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream, Responder

#: Ports handed out by free_port(): below Linux's ephemeral range (32768-60999 by default), so
#: no outgoing connection of any test can take one between free_port() and the bind that follows;
#: split into slices, one per trial worker (`trial --jobs` runs worker N in `<temp>/N`), so two
#: workers never hand out the same port.
_PORT_RANGE = (20000, 32768)

#: The trial timeout of tests that start `twistd flexgw` processes: a hang guard, not a bound on
#: any behaviour (the tests wait for events: sd_notify messages, output lines, responses).
#: Starting one twistd costs about 1.3 s of CPU (imports, compile); at a load average of 15 on
#: two cores it took over 5 s of wall time, and tests starting two to four of them overran
#: 30-60 s guards, leaving their coroutine to fail a later test (AlreadyCalledError).
PROCESS_TEST_TIMEOUT = 180
_PORT_SLICES = 8
_port_slice: tuple[int, int] | None = None
#: Ports claimed by this process (their lock files' descriptors), the oldest first; a port is
#: bound by its test soon after it is handed out, so only the recent ones need the claim.
_CLAIMS_KEPT = 64
_claims: collections.deque[int] = collections.deque()
_next_port = 0


def _slice() -> tuple[int, int]:
    """This process's slice of _PORT_RANGE: by trial worker number, else the whole range."""
    low, high = _PORT_RANGE
    worker = os.path.basename(os.getcwd())
    if worker.isdigit():
        size = (high - low) // _PORT_SLICES
        low += (int(worker) % _PORT_SLICES) * size
        high = low + size
    return low, high


def _claim(port: int) -> bool:
    """Claim `port` for this process among every test process on the machine (an exclusive
    flock on a file named after it, kept for the last _CLAIMS_KEPT ports handed out): False
    when another process holds it."""
    directory = os.path.join(tempfile.gettempdir(), "flexgw-test-ports")
    os.makedirs(directory, exist_ok=True)
    fd = os.open(os.path.join(directory, str(port)), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _claims.append(fd)
    if len(_claims) > _CLAIMS_KEPT:
        os.close(_claims.popleft())  # (closing releases the lock)
    return True


def free_port() -> int:
    """A loopback TCP port that is free right now (for config files, which cannot say port 0).

    Ports come from outside the kernel's ephemeral range, from this process's own slice, in
    sequence from a random start: the kernel's own choice (bind to port 0) could be handed out
    again at once, to another trial worker or as the local port of some test's outgoing
    connection, before the gateway under test binds it. Each port is also claimed (`_claim`)
    across processes: test suites of several checkouts running at once on one machine use the
    same slices, and one's probe could find free a port another had just been given but not
    yet bound (its gateway compiling its configuration), which then failed to bind.
    """
    global _port_slice, _next_port
    if _port_slice is None:
        _port_slice = _slice()
        _next_port = random.SystemRandom().randrange(*_port_slice)
    low, high = _port_slice
    for _ in range(high - low):
        port = _next_port
        _next_port = low if port + 1 >= high else port + 1
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (or lingering): try the next one
        if _claim(port):
            return port
    raise RuntimeError(f"no free port in {low}-{high - 1}")


class MemoryStream(io.BytesIO):
    """A binary stream for the access log whose lines tests can read back as dicts."""

    def records(self) -> list[dict[str, Any]]:
        """Every access log line written so far, decoded."""
        return [json.loads(line) for line in self.getvalue().splitlines() if line]


class Gateway:
    """A running GatewayService on a conf dir, with its access log kept in memory."""

    def __init__(
        self,
        case: TestCase,
        files: dict[str, str],
        environ: dict[str, str] | None = None,
        resolver: Any = None,
        clock: Any = None,
    ):
        """`clock`: the policies' clock (their side-call timeouts), e.g. a task.Clock a test
        advances to fire a timeout at a moment it chooses; default: the reactor."""
        self.case = case
        self.root = case.mktemp()
        os.makedirs(self.root)
        self.write(files)
        self.log_stream = MemoryStream()
        self.access_log = AccessLog(reactor, self.log_stream)
        self.service = GatewayService(
            reactor, [self.root], environ or {}, access_log=self.access_log, resolver=resolver
        )
        if clock is not None:
            self.service.runtime.clock = clock

    def write(self, files: dict[str, str | None]) -> None:
        """Write (or delete, for None) configuration files, dedented."""
        for name, text in files.items():
            path = os.path.join(self.root, name)
            if text is None:
                os.remove(path)
                continue
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(textwrap.dedent(text).lstrip("\n"))

    def start(self) -> None:
        """Start serving; stopped automatically when the test ends."""
        self.service.startService()
        self.case.addCleanup(self.stop)

    def stop(self) -> defer.Deferred[Any]:
        """Stop listening and drop every connection the gateway still holds."""
        for factory in list(self.service.factories.values()):
            for connection in list(factory.connections):
                connection.transport.abortConnection()
        for _, _, pool in self.service.pools.all_pools():
            for conn in list(pool.idle):
                conn.transport.abortConnection()
        return defer.maybeDeferred(self.service.stopService)

    def records(self) -> list[dict[str, Any]]:
        """The access log records written so far."""
        self.access_log.flush()
        return self.log_stream.records()


def simple_api(port: int, upstream_port: int, base_path: str = "", rules: str = "",
               destination_path: str = "", config: str = "") -> str:
    """A one-API inline configuration: 127.0.0.1:port[base_path] -> 127.0.0.1:upstream_port."""
    route = ""
    if rules or destination_path:
        route = "      routes:\n        - "
        parts = []
        if rules:
            parts.append("rules:\n" + textwrap.indent(textwrap.dedent(rules).strip("\n"), " " * 12))
        if destination_path:
            parts.append(f"config:\n            destinationPath: {destination_path}")
        route += "\n          ".join(parts) + "\n"
    text = (
        "apiVersion: gateway.mulesoft.com/v1alpha1\n"
        "kind: ApiInstance\n"
        "metadata:\n  name: test-api\n"
        "spec:\n"
        f"  address: http://127.0.0.1:{port}{base_path}\n"
        "  services:\n"
        "    backend:\n"
        f"      address: http://127.0.0.1:{upstream_port}\n"
        + route
    )
    if config:
        text += "---\n" + textwrap.dedent(config).lstrip("\n")
    return text


async def gateway_with_upstream(
    case: TestCase,
    responder: Responder | None = None,
    retain_bodies: bool = True,
    **api_options: Any,
) -> tuple[Gateway, RecordingUpstream, int]:
    """Start a recording upstream and a gateway in front of it; return (gateway, upstream, port)."""
    upstream = RecordingUpstream(responder, reactor=reactor, retain_bodies=retain_bodies)
    upstream.listen(reactor)
    case.addCleanup(upstream.stop)
    port = free_port()
    gateway = Gateway(case, {"api.yaml": simple_api(port, upstream.address[1], **api_options)})
    gateway.start()
    return gateway, upstream, port


def api_document(port: int, upstream_port: int, name: str = "test-api") -> str:
    """An inline ApiInstance document: 127.0.0.1:port -> service `b` at 127.0.0.1:upstream_port."""
    return (
        "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: ApiInstance\n"
        f"metadata: {{name: {name}}}\n"
        f"spec:\n  address: http://127.0.0.1:{port}\n"
        f"  services:\n    b:\n      address: http://127.0.0.1:{upstream_port}\n"
    )


def start_api_gateway(
    case: TestCase, port: int, upstream_port: int, documents: str = "", name: str = "test-api",
    clock: Any = None,
) -> Gateway:
    """A started gateway serving `api_document(...)` followed by `documents` (bindings...);
    `clock`: its policies' clock (Gateway)."""
    gateway = Gateway(case, {"api.yaml": api_document(port, upstream_port, name) + documents},
                      clock=clock)
    gateway.start()
    return gateway


class PolicyGatewayCase(TestCase):
    """End-to-end tests of a policy: a recording upstream (`self.upstream`) and a gateway port
    (`self.port`); `start(documents)` serves test-api there with `documents` (its bindings,
    `self.documents` by default), `send(raw)` makes one request through it."""

    timeout = 20
    documents = ""

    def setUp(self) -> None:
        """A recording upstream and a free port (then the next class's setUp, if any)."""
        super().setUp()
        self.upstream = RecordingUpstream(reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.port = free_port()

    def start(self, documents: str | None = None) -> Gateway:
        """A started gateway with test-api on `self.port` and `documents`."""
        return start_api_gateway(
            self, self.port, self.upstream.address[1],
            self.documents if documents is None else documents,
        )

    async def send(self, raw: bytes) -> client.Response:
        """One request through the gateway."""
        return await client.request(reactor, "127.0.0.1", self.port, raw)


def assert_loads_cleanly(case: SynchronousTestCase, documents: str) -> Any:
    """The pipeline behind `flexgw validate` loads an API followed by `documents` (a binding
    with Flex's documented keys, say) without an error; its ConfigState."""
    root = tempfile.mkdtemp()
    case.addCleanup(shutil.rmtree, root)
    with open(os.path.join(root, "api.yaml"), "w", encoding="utf-8") as handle:
        handle.write(api_document(free_port(), free_port()) + documents)
    state = load_config([root], {})
    case.assertEqual([str(p) for p in state.problems if p.severity == "error"], [])
    return state
