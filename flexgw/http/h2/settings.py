"""SETTINGS (RFC 9113 §6.5): the codes, and a received payload checked into values."""

from __future__ import annotations

import struct

from flexgw.http.h2.frames import FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, MAX_WINDOW, PROTOCOL_ERROR

HEADER_TABLE_SIZE = 0x1
ENABLE_PUSH = 0x2
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME_SIZE = 0x5
MAX_HEADER_LIST_SIZE = 0x6
ENABLE_CONNECT_PROTOCOL = 0x8

_PAIR = struct.Struct(">HL")


class SettingsError(Exception):
    """A SETTINGS payload the peer must not send: a connection error of `code`."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse(payload: bytes, from_server: bool) -> list[tuple[int, int]]:
    """The (code, value) pairs of a SETTINGS payload, in order, unknown codes left out."""
    if len(payload) % 6:
        raise SettingsError(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
    pairs = []
    for offset in range(0, len(payload), 6):
        code, value = _PAIR.unpack_from(payload, offset)
        if code == ENABLE_PUSH or code == ENABLE_CONNECT_PROTOCOL:
            if value > 1 or (code == ENABLE_PUSH and from_server and value):
                raise SettingsError(PROTOCOL_ERROR, f"invalid setting {code}={value}")
        elif code == INITIAL_WINDOW_SIZE:
            if value > MAX_WINDOW:
                raise SettingsError(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE too large")
        elif code == MAX_FRAME_SIZE:
            if not 16384 <= value <= 16777215:
                raise SettingsError(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
        elif code not in (HEADER_TABLE_SIZE, MAX_CONCURRENT_STREAMS, MAX_HEADER_LIST_SIZE):
            continue  # unknown settings are ignored (§6.5.2)
        pairs.append((code, value))
    return pairs
