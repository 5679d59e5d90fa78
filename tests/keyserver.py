"""A small JSON server on 127.0.0.1 for policy side-call tests (JWKS, token introspection)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site


class JsonServer(Resource):
    """Answers every request with `handler(request) -> (status, body)`; records each request.

    `hold` (a list) makes the server keep requests unanswered until `release()` is called.
    """

    isLeaf = True

    def __init__(self, handler: Callable[[Any], tuple[int, Any]]) -> None:
        super().__init__()
        self.handler = handler
        self.requests: list[dict[str, Any]] = []
        self.held: list[Any] | None = None
        self.port: Any = None
        self._arrivals: list[tuple[int, Deferred[None]]] = []

    def render(self, request: Any) -> Any:
        """Record the request, then answer (or hold it)."""
        body = request.content.read()
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": {k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()},
                "body": body,
            }
        )
        count = len(self.requests)
        for n, d in [a for a in self._arrivals if a[0] <= count]:
            self._arrivals.remove((n, d))
            d.callback(None)
        if self.held is not None:
            self.held.append(request)
            return NOT_DONE_YET
        return self._answer(request)

    def _answer(self, request: Any) -> bytes:
        status, payload = self.handler(request)
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        return payload if isinstance(payload, bytes) else json.dumps(payload).encode()

    def arrival(self, n: int) -> Deferred[None]:
        """A Deferred firing once `n` requests have arrived (at once if they have)."""
        d: Deferred[None] = Deferred()
        if len(self.requests) >= n:
            d.callback(None)
        else:
            self._arrivals.append((n, d))
        return d

    def release(self) -> None:
        """Answer every held request."""
        held, self.held = self.held or [], None
        for request in held:
            request.write(self._answer(request))
            request.finish()

    @property
    def url(self) -> str:
        """This server's base URL."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port.getHost().port}"

    tls = False

    def listen(self, reactor: Any, tls: Any = None) -> None:
        """Listen on an ephemeral loopback port (over TLS with `tls`, a context factory)."""
        site = Site(self)
        site.displayTracebacks = False
        if tls is not None:
            self.tls = True
            self.port = reactor.listenSSL(0, site, tls, interface="127.0.0.1")
        else:
            self.port = reactor.listenTCP(0, site, interface="127.0.0.1")

    def stop(self) -> Deferred[None]:
        """Stop listening."""
        return self.port.stopListening()
