"""flexgw's own HTTP/2 codec (RFC 9113, HPACK by the `hpack` library): sans-IO, no event objects.

`frames` builds frames and names the wire constants, `settings` checks a SETTINGS payload,
`fields` checks header fields, `stream` holds one stream's state and windows, `connection`
parses a connection's bytes and calls its handler.
"""
