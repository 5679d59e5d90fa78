"""The application protocols the ingress listeners serve, by their ALPN names (read by the compiler).

TLS listeners advertise the configured `alpn` list filtered by this tuple, so a protocol is
never offered before the gateway can speak it. `h2` is served by flexgw.ingress.h2front (the
protocol selector reads `transport.negotiatedProtocol` on the first bytes).
"""

SERVED_ALPN: tuple[bytes, ...] = (b"h2", b"http/1.1")
