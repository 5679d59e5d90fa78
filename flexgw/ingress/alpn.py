"""The application protocols the ingress listeners serve, by their ALPN names.

TLS listeners advertise the configured `alpn` list filtered by this tuple, so a protocol is
never offered before the gateway can speak it.
"""

SERVED_ALPN: tuple[bytes, ...] = (b"http/1.1",)
