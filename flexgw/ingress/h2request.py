"""An exchange's upstream request as HTTP/2 fields, for a stream on an HTTP/2 upstream
(flexgw.upstream.h2): nothing is written as HTTP/1.1 and parsed back.

The rules are ProxyExchange._upstream_head's, field for field: hop-by-hop fields and those the
client's Connection header names are dropped; the first Host (rewritten to the Service's
authority under `rewriteHost`) becomes `:authority`; X-Forwarded-* claims are kept only from a
trusted proxy and the gateway's own are added (none at all for an egress exchange); the body's
length as a policy left it; the upstream attempt's `traceparent` in place of the client's. Then
HTTP/2's own: lower-case names, no connection-specific fields (nor HTTP2-Settings), `te:
trailers` when the client asked for trailers (gRPC does), credentials never indexed by HPACK.
tests/test_h2_request.py checks that both give the same request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flexgw.http.h2.fields import NEVER_INDEXED, request_field
from flexgw.http.headers import HOP_BY_HOP, HeaderList, connection_tokens
from flexgw.http.request import BODY_CHUNKED, BODY_LENGTH

if TYPE_CHECKING:
    from flexgw.ingress.exchange import ProxyExchange

#: Client fields never forwarded as they are (content-length is the exchange's to say).
_DROP = HOP_BY_HOP | {b"content-length", b"http2-settings"}
#: Fields that may need HPACK's never-indexed form (fields.request_field decides).
_SENSITIVE = NEVER_INDEXED | {b"cookie"}
_TRACEPARENT = b"traceparent"


def send_request(exchange: ProxyExchange, conn: Any, traceparent: bytes | None, pending: list[bytes] | None) -> None:
    """Send `exchange`'s request on the HTTP/2 stream `conn`: HEADERS, the body received so
    far (`pending`), and the end when the request is complete. `traceparent` is the upstream
    attempt's header line (flexgw.http.tracecontext), or None."""
    authority, fields, has_body = upstream_fields(exchange, traceparent)
    conn.send_head(exchange.head.method, authority, exchange.upstream_target, fields, not has_body)
    if not has_body:
        return
    if pending:
        conn.write(pending[0] if len(pending) == 1 else b"".join(pending))
    if exchange.request_complete:
        conn.end_request()


def upstream_fields(
    exchange: ProxyExchange, traceparent: bytes | None
) -> tuple[bytes, HeaderList, bool]:
    """(`:authority`, the regular fields, whether a body follows) of `exchange`'s upstream
    request."""
    head = exchange.head
    front = exchange.front
    upstream = exchange.destination.upstream  # type: ignore[union-attr]
    drop = connection_tokens(head.connection_values) if head.connection_values else None
    peer = front.peer
    relay = exchange.relay_forwarded
    trusted = relay and peer.trusted  # claims kept only from a trusted proxy, and relayed
    rewrite_host = front.http.rewrite_host
    prior_xff = None
    has_xfh = has_xfp = False
    trailers = False
    authority = None
    fields: HeaderList = []
    append = fields.append
    chain = exchange.chain
    headers = original = head.headers
    if chain is not None and chain.ctx.changed_headers is not None:
        headers = chain.ctx.changed_headers
        drop = None  # already removed before the policies ran (see _select_policies)
    for name, value in headers:
        lname = name.lower()
        if lname in _DROP:
            if lname == b"te" and b"trailers" in value.lower():
                trailers = True
            continue
        if drop is not None and lname in drop:
            continue
        if lname == b"host":
            if authority is None:
                authority = upstream.authority.encode("latin-1") if rewrite_host else value
            continue
        if lname[:12] == b"x-forwarded-":
            if not trusted or lname == b"x-forwarded-client-cert":
                continue  # XFCC comes only from the gateway (the verified client certificate)
            if lname == b"x-forwarded-for":
                prior_xff = value if prior_xff is None else prior_xff + b", " + value
                continue
            if lname == b"x-forwarded-host":
                has_xfh = True
            elif lname == b"x-forwarded-proto":
                has_xfp = True
        elif lname == b"forwarded":
            if not trusted:
                continue  # RFC 7239's form of the same claims: only a trusted proxy may make them
        elif traceparent is not None and lname == _TRACEPARENT:
            continue
        if lname in _SENSITIVE:
            append(request_field(lname, value))
        else:
            append((lname, value))
    if headers is not original:
        # Whether the client asked for trailers is the client's say, whatever policies changed.
        trailers = any(n.lower() == b"te" and b"trailers" in v.lower() for n, v in original)
    if authority is None:
        authority = (upstream.authority if rewrite_host else (head.authority or "")).encode("latin-1")
    if relay:
        client = peer.address_bytes
        append((b"x-forwarded-for", client if prior_xff is None else prior_xff + b", " + client))
        if not has_xfp and peer.proto:
            append((b"x-forwarded-proto", peer.proto))
        if peer.xfcc:
            append((b"x-forwarded-client-cert", peer.xfcc))
        if not has_xfh and head.authority:
            append((b"x-forwarded-host", head.authority.encode("latin-1")))
    body = head.body
    if body == BODY_LENGTH:
        length = head.content_length
        if chain is not None and chain.ctx.body_replaced:
            length = len(chain.ctx.body or b"")
        append((b"content-length", b"%d" % length))
        has_body = length != 0
    else:
        has_body = body == BODY_CHUNKED
    if traceparent is not None:
        append((_TRACEPARENT, traceparent[13:-2]))  # the value of b"traceparent: ...\r\n"
    if trailers:
        append((b"te", b"trailers"))
    return authority, fields, has_body
