"""Checking a parsed HTTP/1.x request head and deriving what the proxy needs from it.

httptools (llhttp) already rejects most malformed input (bare CR/LF, NUL, obs-fold, whitespace
before the colon, CL+TE, duplicate or malformed Content-Length, bad chunk sizes). What it lets
through and a gateway must still refuse is checked here: CONNECT (405: no tunnels on ingress),
versions other than 1.0/1.1, a Transfer-Encoding other than exactly `chunked` or in an HTTP/1.0
request, missing/duplicate/malformed Host in HTTP/1.1, a fragment in the target, and an
absolute-form target whose authority disagrees with Host. The path is normalised here
(flexgw.http.path: one rule for routing, policies and the upstream).
"""

from __future__ import annotations

import re

import attrs

from flexgw.http.errors import METHOD_NOT_ALLOWED, GatewayError, bad_request
from flexgw.http.grpc import GRPC_PREFIX, parse_timeout
from flexgw.http.headers import HeaderList, without_underscored
from flexgw.http.path import DEFAULT_RULES, PathSettings, Redirect, needs_work, normalize_path

BODY_NONE = 0
BODY_LENGTH = 1
BODY_CHUNKED = 2

_AUTHORITY = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::[0-9]{0,5})?")
_ABSOLUTE = re.compile(rb"(?i)(https?)://([^/?#]*)([^#]*)")


@attrs.define(slots=True)
class RequestHead:
    """A validated request head: the raw parts plus what routing and forwarding need."""

    method: bytes
    target: bytes  # as received, with the path normalised
    version: bytes  # b"1.1" or b"1.0"
    headers: HeaderList  # arrival order, original case
    path: str  # path part of the target, no query, normalised (flexgw.http.path), latin-1 decoded
    query: bytes  # b"" or b"?..." as received
    authority: str  # host[:port] the request is for (target authority, else Host)
    keep_alive: bool
    body: int  # BODY_NONE, BODY_LENGTH or BODY_CHUNKED
    content_length: int
    connection_values: list[bytes]  # raw Connection header values (for hop-by-hop tokens)
    expect_continue: bool
    grpc: bytes = b""  # a gRPC request's content-type, lower-cased (application/grpc...)
    grpc_timeout: float | None = None  # seconds of a valid `grpc-timeout` (a gRPC deadline)


#: The request header names analyze_head looks at (one dict lookup for every other name).
_HOST, _CONTENT_LENGTH, _TRANSFER_ENCODING, _CONNECTION, _EXPECT, _CONTENT_TYPE, _GRPC_TIMEOUT = (
    range(7)
)
_FIELDS = {
    b"host": _HOST,
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"connection": _CONNECTION,
    b"expect": _EXPECT,
    b"content-type": _CONTENT_TYPE,
    b"grpc-timeout": _GRPC_TIMEOUT,
}

#: `Configuration.spec.http.headersWithUnderscoresAction` values (Envoy's names).
UNDERSCORES_ALLOW = "allow"  # kept, except the risky ones (headers.risky_underscored)
UNDERSCORES_DROP = "dropHeader"
UNDERSCORES_REJECT = "rejectRequest"
UNDERSCORED_HEADER = bad_request("A header name with an underscore is not accepted")


def analyze_head(
    method: bytes,
    target: bytes,
    version: str,
    headers: HeaderList,
    keep_alive: bool,
    underscores: str = UNDERSCORES_ALLOW,
    path_rules: PathSettings = DEFAULT_RULES,
) -> RequestHead | GatewayError:
    """Validate a request head from the parser; return what the proxy needs, or the error to send.

    Header names with `_` follow `underscores`; the risky ones (framing, hop-by-hop, Host,
    forwarding) are dropped even when they are allowed. The path is normalised by `path_rules`
    (a path with nothing to normalise costs one regex search)."""
    if method == b"CONNECT":
        # Whatever its target: llhttp treats every CONNECT as a tunnel, and ingress has none.
        return METHOD_NOT_ALLOWED
    if version == "1.1":
        vbytes = b"1.1"
    elif version == "1.0":
        vbytes = b"1.0"
    else:
        return bad_request(f"Unsupported HTTP version {version}")

    hosts = []
    body = BODY_NONE
    content_length = 0
    connection_values: list[bytes] = []
    expect_continue = False
    underscored = False
    grpc_timeout = None
    grpc = b""
    fields = _FIELDS
    for name, value in headers:
        lname = name.lower()
        field = fields.get(lname)
        if field is None:
            if lname.find(b"_") >= 0:  # (`b"_" in lname` raises and clears a TypeError inside)
                underscored = True
        elif field == _HOST:
            hosts.append(value)
        elif field == _CONTENT_LENGTH:
            body = body or BODY_LENGTH
            content_length = int(value)  # llhttp guarantees digits and a single header
        elif field == _TRANSFER_ENCODING:
            if value.strip().lower() != b"chunked":
                return bad_request("Transfer-Encoding other than chunked is not accepted")
            if vbytes == b"1.0":
                # RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
                return bad_request("Transfer-Encoding is not accepted in an HTTP/1.0 request")
            body = BODY_CHUNKED
        elif field == _CONNECTION:
            connection_values.append(value)
        elif field == _EXPECT:
            if value.strip().lower() == b"100-continue":
                expect_continue = True
        elif field == _CONTENT_TYPE:
            if value[:16].lower() == GRPC_PREFIX:
                grpc = value.strip().lower()
        else:
            grpc_timeout = parse_timeout(value)
    if underscored:
        if underscores == UNDERSCORES_REJECT:
            return UNDERSCORED_HEADER
        headers = without_underscored(headers, underscores == UNDERSCORES_DROP)

    if len(hosts) > 1:
        return bad_request("Duplicate Host header")
    host = hosts[0].strip() if hosts else None
    if host is not None and not _AUTHORITY.fullmatch(host):
        return bad_request("Malformed Host header")
    if host is None and vbytes == b"1.1":
        return bad_request("Missing Host header")

    if target.find(b"#") >= 0:
        # No request-target form has a fragment (RFC 9112 §3.2). Routing and policy rules would
        # match "/admin#x" while an upstream that drops the fragment serves "/admin".
        return bad_request("A fragment is not allowed in the request target")
    if target[:1] == b"/":
        raw_path, sep, rest = target.partition(b"?")
        query = sep + rest
        authority = host or b""
        target_start = 0
    elif method == b"OPTIONS" and target == b"*":
        return bad_request("Asterisk-form request targets are not supported")
    else:
        absolute = _ABSOLUTE.fullmatch(target)
        if absolute is None:
            return bad_request("Malformed request target")
        target_authority = absolute.group(2)
        if not _AUTHORITY.fullmatch(target_authority):
            return bad_request("Malformed authority in request target")
        if host is not None and host.lower() != target_authority.lower():
            return bad_request("Request target authority and Host header disagree")
        authority = target_authority
        target_start = absolute.start(3)
        path_and_query = absolute.group(3) or b"/"
        if path_and_query[:1] == b"?":
            path_and_query = b"/" + path_and_query
        raw_path, sep, rest = path_and_query.partition(b"?")
        query = sep + rest

    if needs_work(raw_path):
        # Rules match the path while upstreams normalise it: "/api/../admin" must be routed
        # (and policy-selected) as the upstream will serve it.
        normal = normalize_path(raw_path, path_rules)
        if isinstance(normal, GatewayError):
            return normal
        if isinstance(normal, Redirect):
            location = normal.path + query
            return GatewayError(
                307, "path_redirect", "Redirected to the normalised path", ((b"Location", location),)
            )
        if normal is not raw_path:
            raw_path = normal
            target = target[:target_start] + normal + query

    return RequestHead(
        method=method,
        target=target,
        version=vbytes,
        headers=headers,
        path=raw_path.decode("latin-1"),
        query=query,
        authority=authority.decode("latin-1"),
        keep_alive=keep_alive,
        body=body,
        content_length=content_length,
        connection_values=connection_values,
        expect_continue=expect_continue,
        grpc=grpc,
        grpc_timeout=grpc_timeout if grpc else None,
    )


def error_for_parser_message(message: str) -> GatewayError:
    """The 400 for an llhttp error, with its message (llhttp messages are fixed ASCII text)."""
    return bad_request(f"Malformed request: {message}")
