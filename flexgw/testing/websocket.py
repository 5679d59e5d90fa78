"""A minimal RFC 6455 WebSocket for tests: frame encoding/decoding and an echo responder for
RecordingUpstream (handshake, unmasking, echo of text/binary frames, close handshake)."""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from typing import Any

from flexgw.testing.upstream import Exchange, Responder

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA


def accept_key(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept value for a Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key.strip() + GUID).digest())


def new_key() -> bytes:
    """A random Sec-WebSocket-Key."""
    return base64.b64encode(os.urandom(16))


def encode_frame(opcode: int, payload: bytes, mask: bool) -> bytes:
    """One final frame; clients mask (RFC 6455 §5.3), servers do not."""
    head = bytes([0x80 | opcode])
    length = len(payload)
    bit = 0x80 if mask else 0
    if length < 126:
        head += bytes([bit | length])
    elif length < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _unmask(key, payload)


def _unmask(key: bytes, payload: bytes) -> bytes:
    if not payload:
        return payload
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(payload), "big"
    )


def decode_frames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Take every complete frame out of `buffer` (unmasking masked ones): (opcode, payload)."""
    frames = []
    while len(buffer) >= 2:
        opcode = buffer[0] & 0x0F
        masked = bool(buffer[1] & 0x80)
        length = buffer[1] & 0x7F
        offset = 2
        if length == 126:
            if len(buffer) < 4:
                break
            length = struct.unpack("!H", bytes(buffer[2:4]))[0]
            offset = 4
        elif length == 127:
            if len(buffer) < 10:
                break
            length = struct.unpack("!Q", bytes(buffer[2:10]))[0]
            offset = 10
        key = b""
        if masked:
            key = bytes(buffer[offset : offset + 4])
            offset += 4
        if len(buffer) < offset + length:
            break
        payload = bytes(buffer[offset : offset + length])
        del buffer[: offset + length]
        frames.append((opcode, _unmask(key, payload) if masked else payload))
    return frames


class WebSocketEchoResponder(Responder):
    """Answers a WebSocket handshake with 101, then echoes each data frame back unmasked and
    answers a close frame with a close frame and a close. Other requests get a 400."""

    def __init__(self) -> None:
        self.received: list[tuple[int, bytes]] = []  # every frame the upstream got, in order
        self.buffers: dict[int, bytearray] = {}

    def respond(self, ex: Exchange) -> None:
        """The handshake: 101 with the accept key, or 400 for a request that is not one."""
        request = ex.request
        key = request.header("sec-websocket-key")
        upgrade = [v.lower() for v in request.header("upgrade")]
        if not key or upgrade != [b"websocket"]:
            ex.respond(400, [(b"Content-Length", b"0")])
            return
        ex.send_head(
            101,
            [
                (b"Upgrade", b"websocket"),
                (b"Connection", b"Upgrade"),
                (b"Sec-WebSocket-Accept", accept_key(key[0])),
            ],
        )

    def on_tunnel_data(self, ex: Exchange, data: bytes) -> None:
        """Frames from the client: echo data, answer ping and close."""
        buffer = self.buffers.setdefault(id(ex), bytearray())
        buffer += data
        for opcode, payload in decode_frames(buffer):
            self.received.append((opcode, payload))
            if opcode in (TEXT, BINARY):
                ex.write_raw(encode_frame(opcode, payload, mask=False))
            elif opcode == PING:
                ex.write_raw(encode_frame(PONG, payload, mask=False))
            elif opcode == CLOSE:
                ex.write_raw(encode_frame(CLOSE, payload, mask=False))
                ex.close()


def handshake_request(path: bytes = b"/ws", host: bytes = b"a.test", key: bytes | None = None,
                      extra: bytes = b"") -> tuple[bytes, bytes]:
    """A WebSocket handshake request and its key."""
    key = key or new_key()
    return (
        b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n" + extra + b"\r\n",
        key,
    )


def echo() -> Any:
    """A WebSocketEchoResponder."""
    return WebSocketEchoResponder()
