"""A hook on each frame h2 receives, run before h2 acts on it (answers a PING or SETTINGS,
resets a stream), so a guard can count frames as they come rather than after a whole read.

Private API: `h2.connection.H2Connection._receive_frame(frame) -> list[Event]`, which
`receive_data` calls once per frame. Kept: h2 has no public per-frame hook, and guards that
count the events `receive_data` returns act only after every frame of the read was answered.
With it, a 50,000-stream "MadeYouReset" attack got GOAWAY after 201 resets and opened no upstream
connection; counting events after the read, it never got GOAWAY (bench/made_you_reset.py).

Also here, the GOAWAY code for the one frame h2 refuses with the wrong one: a SETTINGS ACK with
a payload is a FRAME_SIZE_ERROR (RFC 9113 §6.5), which hyperframe reports as invalid data and
h2 as a PROTOCOL_ERROR, before any hook sees the frame. Private API:
`H2Connection._terminate_connection(error_code)` (h2 queues its GOAWAY there) and
`FrameBuffer._data` (the refused frame is still at its start). Kept: no public way to choose
the code; only a connection that is ending pays for it.
"""

from __future__ import annotations

from typing import Any

from h2.connection import H2Connection
from h2.errors import ErrorCodes


class FrameHookConnection(H2Connection):
    """An H2Connection whose subclass's `frame_hook(frame)` handles every received frame.

    `frame_hook` must return what `receive_one_frame(frame)` (h2's own handling) returns, and
    may raise an h2 ProtocolError to end the read. It replaces h2's method on the subclass
    itself, so the hook costs no call more than h2's own dispatch.
    """

    receive_one_frame = H2Connection._receive_frame

    def _terminate_connection(self, error_code: int) -> None:
        """h2 ends the connection for a protocol error: FRAME_SIZE_ERROR for a refused SETTINGS
        ACK that carries a payload (see the module docstring), h2's code otherwise."""
        head = bytes(getattr(self.incoming_buffer, "_data", b"")[:9])
        settings_ack = len(head) == 9 and head[3] == 0x4 and head[4] & 0x1
        if error_code == ErrorCodes.PROTOCOL_ERROR and settings_ack and head[:3] != b"\0\0\0":
            error_code = ErrorCodes.FRAME_SIZE_ERROR
        super()._terminate_connection(error_code)  # type: ignore[misc]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        hook = cls.__dict__.get("frame_hook")
        if hook is not None:
            cls._receive_frame = hook  # type: ignore[method-assign]
