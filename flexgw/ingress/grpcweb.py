"""gRPC-Web to gRPC (Envoy's `grpc_web` filter): a browser's `application/grpc-web[+proto]` or
`application/grpc-web-text[+proto]` request, over HTTP/1.1 or HTTP/2, goes to its `h2c://` or
`h2://` upstream as gRPC, and the answer comes back as gRPC-Web.

Request: the content-type becomes `application/grpc[+proto]`, `te: trailers` is added, a
`-text` body is base64-decoded as it streams (its length changes: it goes chunked). Response:
the content-type becomes the gRPC-Web one, the upstream's trailers become the body's closing
trailer frame (flag 0x80), a `-text` body is base64-encoded as it streams; a trailers-only
answer keeps its status in the headers, as the protocol allows. A request with an `Origin`
gets `grpc-status`, `grpc-message` and `grpc-status-details-bin` exposed to scripts (the CORS
policy still decides whether the origin is allowed).

`GrpcWebSink` stands between the upstream connection and the exchange (it is the sink the
exchange hands the upstream), so plain requests pay nothing for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flexgw.http.grpc import (
    EXPOSE_GRPC,
    GRPC_WEB_TEXT,
    Base64Decoder,
    Base64Encoder,
    grpc_type_for_web,
    trailer_frame,
    web_type_for_grpc,
)
from flexgw.http.headers import HeaderList
from flexgw.http.request import BODY_CHUNKED, BODY_LENGTH

if TYPE_CHECKING:
    from flexgw.ingress.exchange import ProxyExchange


class GrpcWebSink:
    """The response sink of a gRPC-Web exchange: translates the upstream's gRPC answer."""

    __slots__ = ("decoder", "encoder", "exchange", "expose", "head", "text")

    def __init__(self, exchange: ProxyExchange) -> None:
        """Rewrite the request head for the upstream (before routing and policies see it)."""
        self.exchange = exchange
        head = self.head = exchange.head
        self.text = head.grpc.startswith(GRPC_WEB_TEXT)
        self.decoder = Base64Decoder() if self.text else None
        self.encoder = Base64Encoder() if self.text else None
        self.expose = False
        headers: HeaderList = []
        for name, value in head.headers:
            lname = name.lower()
            if lname == b"content-type":
                value = grpc_type_for_web(head.grpc)
            elif lname == b"content-length" and self.text:
                continue  # the decoded body is shorter: chunked to the upstream
            elif lname == b"te":
                continue
            elif lname == b"origin":
                self.expose = True
            headers.append((name, value))
        headers.append((b"te", b"trailers"))
        head.headers = headers
        if self.text and head.body == BODY_LENGTH:
            head.body = BODY_CHUNKED
            head.content_length = 0

    def request_data(self, data: bytes) -> bytes:
        """A piece of a `-text` request body, decoded."""
        assert self.decoder is not None
        return self.decoder.feed(data)

    # -- the ResponseSink the upstream connection reports to --------------------------------------

    def response_interim(self, status: int, headers: HeaderList) -> None:
        """As the exchange's."""
        self.exchange.response_interim(status, headers)

    def response_head(
        self, status: int, reason: bytes, headers: HeaderList, keep_alive: bool
    ) -> None:
        """The gRPC-Web content-type, no length (the body changes), CORS exposure."""
        out: HeaderList = []
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-type":
                value = web_type_for_grpc(value, self.text)
            elif lname == b"content-length":
                continue
            elif lname == b"access-control-expose-headers":
                self.expose = False
            out.append((name, value))
        if not any(n.lower() == b"transfer-encoding" for n, _ in out):
            out.append((b"transfer-encoding", b"chunked"))  # the body ends with the response
        if self.expose:
            out.append(EXPOSE_GRPC)
        self.exchange.response_head(status, reason, out, keep_alive)

    def response_body(self, data: bytes) -> None:
        """gRPC messages pass as they are (base64 for `-text`)."""
        encoder = self.encoder
        if encoder is not None:
            data = encoder.feed(data)
            if not data:
                return
        self.exchange.response_body(data)

    def response_trailers(self, trailers: HeaderList) -> None:
        """The trailers, as the body's trailer frame."""
        self.response_body(trailer_frame(trailers))

    def response_complete(self) -> None:
        """The end of a `-text` body, then as the exchange's."""
        encoder = self.encoder
        if encoder is not None:
            rest = encoder.end()
            if rest:
                self.exchange.response_body(rest)
        self.exchange.response_complete()

    def flush_response(self) -> None:
        """As the exchange's."""
        self.exchange.flush_response()

    def response_malformed(self, message: str) -> None:
        """As the exchange's."""
        self.exchange.response_malformed(message)

    def upstream_lost(self, got_response_bytes: bool) -> None:
        """As the exchange's."""
        self.exchange.upstream_lost(got_response_bytes)

    def response_switched(self, rest: bytes) -> None:
        """As the exchange's."""
        self.exchange.response_switched(rest)
