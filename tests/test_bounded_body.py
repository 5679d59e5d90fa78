"""flexgw.sidecalls.bounded.read_bounded: side-call bodies stay within their limit whatever the
framing, against a real loopback HTTP server."""

from __future__ import annotations

import treq
from twisted.internet import defer, reactor
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from flexgw.sidecalls.bounded import read_bounded


class TooLarge(Exception):
    """The error the tests ask for."""


class Endless(Resource):
    """Streams 16 KiB chunks without a Content-Length until the client goes away."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.gone: defer.Deferred[None] = defer.Deferred()
        self.sent = 0

    def render_GET(self, request):  # type: ignore[no-untyped-def]
        """Start streaming; stop when the connection is lost."""
        writer = LoopingCall(self._write, request)
        writer.clock = reactor

        def lost(_: object) -> None:
            writer.stop()
            self.gone.callback(None)

        request.notifyFinish().addBoth(lost)
        writer.start(0.001)
        return NOT_DONE_YET

    def _write(self, request) -> None:  # type: ignore[no-untyped-def]
        request.write(b"x" * 16384)
        self.sent += 16384


class Fixed(Resource):
    """A body of a declared length."""

    isLeaf = True

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def render_GET(self, request):  # type: ignore[no-untyped-def]
        """The body, with its Content-Length."""
        return b"y" * self.size


class ReadBoundedTests(TestCase):
    """Within, over, and endless bodies."""

    def serve(self, resource: Resource) -> str:
        """A loopback HTTP server for `resource`; its URL."""
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/"

    async def fetch(self, url: str, limit: int) -> bytes:
        """GET url (no persistent connection) and read the body within `limit`."""
        response = await treq.get(url, reactor=reactor, persistent=False)
        return await read_bounded(response, limit, lambda: TooLarge("too large"))

    async def test_within_limit(self) -> None:
        """A body up to the limit is returned whole."""
        body = await self.fetch(self.serve(Fixed(1000)), 1000)
        self.assertEqual(body, b"y" * 1000)

    async def test_declared_length_over_limit(self) -> None:
        """A Content-Length over the limit fails before the body is read."""
        with self.assertRaises(TooLarge):
            await self.fetch(self.serve(Fixed(1001)), 1000)

    async def test_endless_chunked_body_is_cut(self) -> None:
        """A chunked body that never ends fails once past the limit, and the connection is
        dropped (the server sees the client go, so nothing more is buffered)."""
        endless = Endless()
        with self.assertRaises(TooLarge):
            await self.fetch(self.serve(endless), 65536)
        await endless.gone
        self.assertGreater(endless.sent, 65536)
