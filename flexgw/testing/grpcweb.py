"""A gRPC-Web client's encoding, built from the protocol text (PROTOCOL-WEB.md) for tests:
length-prefixed messages, the trailer frame (flag 0x80), `-text` as base64."""

from __future__ import annotations

import base64
from collections.abc import Iterable

#: The headers a gRPC-Web browser client (grpc-web, Connect) sends besides its content-type.
CLIENT_HEADERS = [(b"x-grpc-web", b"1"), (b"x-user-agent", b"grpc-web-javascript/0.1")]


def encode_messages(messages: Iterable[bytes], text: bool = False) -> bytes:
    """A request body: each message with its 5-byte prefix (uncompressed); base64 for `-text`."""
    body = b"".join(b"\x00" + len(m).to_bytes(4, "big") + m for m in messages)
    return base64.b64encode(body) if text else body


def decode_body(body: bytes, text: bool = False) -> tuple[list[bytes], dict[str, str]]:
    """A response body: its messages and its trailer frame's fields (lower-case names).
    A `-text` body may be several padded base64 pieces one after another."""
    if text:
        raw = b""
        while body:
            pad = body.find(b"=")
            end = len(body) if pad < 0 else (pad // 4 + 1) * 4
            raw += base64.b64decode(body[:end])
            body = body[end:]
        body = raw
    messages: list[bytes] = []
    trailers: dict[str, str] = {}
    offset = 0
    while offset < len(body):
        flag = body[offset]
        length = int.from_bytes(body[offset + 1 : offset + 5], "big")
        payload = body[offset + 5 : offset + 5 + length]
        if len(payload) != length:
            raise ValueError("a frame runs past the end of the body")
        offset += 5 + length
        if flag & 0x80:
            for line in payload.split(b"\r\n"):
                if line:
                    name, _, value = line.partition(b":")
                    trailers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        else:
            messages.append(payload)
    return messages, trailers
