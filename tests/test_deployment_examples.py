"""The deployment-model examples `conf/standalone` and `conf/sidecar`, served as shipped.

Each test copies an example directory, moving only its addresses to free loopback ports and its
upstream to a local echo server (the files are otherwise as shipped), and checks what the README
promises for that model.
"""

from __future__ import annotations

import base64
import json
import os

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from flexgw.config.pipeline import load_config
from flexgw.testing import client
from flexgw.testing.upstream import EchoUpstream
from tests.harness import Gateway, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf")


def example_files(name: str, moves: dict[str, str]) -> dict[str, str]:
    """The files of conf/`name`, with each address in `moves` replaced by its new value."""
    directory = os.path.join(CONF, name)
    files = {}
    for filename in sorted(os.listdir(directory)):
        with open(os.path.join(directory, filename), encoding="utf-8") as handle:
            text = handle.read()
        for old, new in moves.items():
            text = text.replace(old, new)
        files[filename] = text
    return files


def basic(user: str, password: str) -> bytes:
    """An Authorization header value for HTTP Basic."""
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


class ExampleCase(TestCase):
    """Starts an example with an echo upstream on a free port."""

    def serve(self, name: str, listen: str, upstream: str, probe: str) -> tuple[int, int]:
        """Serve conf/`name` with its listener, upstream and probe addresses moved; returns
        (gateway port, probe port)."""
        port_up = reactor.listenTCP(0, EchoUpstream(), interface="127.0.0.1")
        self.addCleanup(port_up.stopListening)
        port, probe_port = free_port(), free_port()
        files = example_files(
            name,
            {
                listen: f"127.0.0.1:{port}",
                upstream: f"127.0.0.1:{port_up.getHost().port}",
                f"port: {probe}": f"port: {probe_port}",
            },
        )
        gateway = Gateway(self, files)
        gateway.start()
        return port, probe_port

    async def get(self, port: int, path: str, *headers: tuple[bytes, bytes]) -> client.Response:
        """One GET on the gateway."""
        extra = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        return await client.request(
            reactor,
            "127.0.0.1",
            port,
            b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra + b"\r\n",
        )


class StandaloneTests(ExampleCase):
    """conf/standalone: an internal API with basic auth and a per-client rate limit."""

    def test_validates_cleanly(self) -> None:
        """No errors and no warnings as shipped."""
        state = load_config([os.path.join(CONF, "standalone")], {})
        self.assertEqual([str(p) for p in state.problems], [])

    async def test_auth_rate_limit_and_probe(self) -> None:
        """Without credentials: 401 with Flex's challenge; with them: the request reaches
        /api/orders/... upstream with the rate-limit headers; the readiness probe answers."""
        port, probe = self.serve("standalone", "127.0.0.1:8080", "127.0.0.1:9000", "3000")
        refused = await self.get(port, "/orders/42")
        self.assertEqual(refused.status, 401)
        self.assertEqual(refused.header(b"www-authenticate"), [b'Basic realm="mule-realm"'])
        wrong = await self.get(port, "/orders/42", (b"Authorization", basic("orders", "nope")))
        self.assertEqual(wrong.status, 401)
        ok = await self.get(port, "/orders/42", (b"Authorization", basic("orders", "change-me")))
        self.assertEqual(ok.status, 200)
        self.assertEqual(json.loads(ok.body)["path"], "/api/orders/42")
        self.assertEqual(ok.header(b"x-ratelimit-limit"), [b"100"])
        self.assertEqual(ok.header(b"x-ratelimit-remaining"), [b"99"])
        ready = await self.get(probe, "/probes/readiness")
        self.assertEqual(ready.status, 200)

    async def test_rate_limit_answers_429(self) -> None:
        """The 101st request in the window is refused with 429 and Retry-After."""
        port, _ = self.serve("standalone", "127.0.0.1:8080", "127.0.0.1:9000", "3000")
        auth = (b"Authorization", basic("orders", "change-me"))
        statuses = []
        for _ in range(101):
            response = await self.get(port, "/orders/1", auth)
            statuses.append(response.status)
        self.assertEqual(statuses[:100], [200] * 100)
        self.assertEqual(statuses[100], 429)
        self.assertEqual(len(response.header(b"retry-after")), 1)
        self.assertEqual(response.header(b"x-ratelimit-remaining"), [b"0"])


class SidecarTests(ExampleCase):
    """conf/sidecar: one local service behind a small gateway."""

    def test_validates_cleanly(self) -> None:
        """No errors and no warnings; the small-footprint settings are the ones applied."""
        state = load_config([os.path.join(CONF, "sidecar")], {})
        self.assertEqual([str(p) for p in state.problems], [])
        self.assertEqual(state.plan.http.max_idle_per_upstream, 8)
        self.assertEqual(state.plan.http.body_buffer_limit, 262144)
        self.assertEqual(state.plan.timeouts.stream_idle, 60.0)

    async def test_every_path_reaches_the_service(self) -> None:
        """Any path and query go to the local service unchanged; the probe answers."""
        port, probe = self.serve("sidecar", "127.0.0.1:8080", "127.0.0.1:8081", "3001")
        response = await self.get(port, "/anything/deep?x=1")
        self.assertEqual(response.status, 200)
        echoed = json.loads(response.body)
        self.assertEqual(echoed["path"], "/anything/deep?x=1")
        root = await self.get(port, "/")
        self.assertEqual(json.loads(root.body)["path"], "/")
        ready = await self.get(probe, "/probes/readiness")
        self.assertEqual(ready.status, 200)
