"""Responses the gateway itself makes: JSON bodies with an `x-flexgw-error` cause header."""

from __future__ import annotations

import json

import attrs

REASONS = {
    100: b"Continue",
    200: b"OK",
    307: b"Temporary Redirect",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    407: b"Proxy Authentication Required",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


@attrs.frozen
class GatewayError:
    """A gateway-made error: status, the cause named in `x-flexgw-error`, a message for the body."""

    status: int
    cause: str
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()  # e.g. the Location of a redirect

    def render(self, close: bool, extra_headers: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
        """The complete HTTP/1.1 response bytes (status line, headers, JSON body)."""
        body = json.dumps({"error": self.message}).encode("ascii")
        lines = [
            b"HTTP/1.1 %d %s\r\n" % (self.status, REASONS.get(self.status, b"Error")),
            b"Content-Type: application/json\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"x-flexgw-error: " + self.cause.encode("ascii") + b"\r\n",
        ]
        lines.extend(name + b": " + value + b"\r\n" for name, value in self.headers)
        lines.extend(name + b": " + value + b"\r\n" for name, value in extra_headers)
        if close:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        lines.append(body)
        return b"".join(lines)


def bad_request(message: str) -> GatewayError:
    """400 for a request the gateway refuses to parse or forward."""
    return GatewayError(400, "bad_request", message)


NO_ROUTE = GatewayError(404, "no_route", "No route matches the request")
HEADERS_TOO_LARGE = GatewayError(
    431, "headers_too_large", "Request line and headers exceed the size limit"
)
HEADER_TIMEOUT = GatewayError(408, "request_timeout", "Request headers not received in time")
METHOD_NOT_ALLOWED = GatewayError(405, "method_not_allowed", "CONNECT is not allowed here")
UPSTREAM_CONNECT_FAILURE = GatewayError(
    503, "upstream_connect_failure", "Could not connect to the upstream service"
)
UPSTREAM_TLS = GatewayError(
    502, "upstream_tls", "The TLS handshake with the upstream service failed"
)
UPSTREAM_TIMEOUT = GatewayError(504, "upstream_timeout", "The upstream service did not respond in time")
STREAM_IDLE_TIMEOUT = GatewayError(504, "stream_idle_timeout", "The stream was idle for too long")
UPSTREAM_RESET = GatewayError(
    502, "upstream_reset", "The upstream service closed the connection before responding"
)
UPSTREAM_BAD_RESPONSE = GatewayError(
    502, "upstream_bad_response", "The upstream service sent a malformed response"
)
PAYLOAD_TOO_LARGE = GatewayError(
    413, "payload_too_large", "The request body exceeds the buffering limit"
)
EGRESS_DENIED = GatewayError(403, "egress_denied", "The destination is not allowed")
NO_HEALTHY_UPSTREAM = GatewayError(
    503, "no_healthy_upstream", "No address of the upstream service is available"
)
DNS_FAILURE = GatewayError(502, "dns_failure", "The destination name could not be resolved")
NOT_A_PROXY_REQUEST = GatewayError(
    400, "bad_request", "A forward proxy needs an absolute-form (http://) or CONNECT request"
)
INTERNAL_ERROR = GatewayError(500, "internal_error", "Internal gateway error")
