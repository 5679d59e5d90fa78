"""One HTTP/2 stream's state as the codec keeps it: which directions are open, the windows."""

from __future__ import annotations

#: How a stream was closed (the codec remembers recent ones: frames on them are judged by it).
ENDED = 1  # both directions ended
RESET_SENT = 2  # we reset it: the peer's late frames are ignored (§5.1, closed)
RESET_RECEIVED = 3  # the peer reset it: its later DATA/HEADERS are a stream error


class Stream:
    """An open stream (open or half-closed; closed streams leave the codec's table)."""

    __slots__ = (
        "final_head",
        "length",
        "processed",
        "received",
        "recv_open",
        "recv_window",
        "send_open",
        "send_window",
        "stream_id",
    )

    def __init__(self, stream_id: int, recv_window: int, send_window: int) -> None:
        self.stream_id = stream_id
        self.recv_open = True  # the peer may still send (no END_STREAM received)
        self.send_open = True  # we may still send (no END_STREAM sent)
        self.recv_window = recv_window  # bytes the peer may still send on it
        self.processed = 0  # bytes handed back by the application, not yet in a WINDOW_UPDATE
        self.send_window = send_window  # bytes we may still send on it
        self.final_head = False  # (client side) the final response head was received
        self.length = -1  # the content-length of the message received, -1 without one
        self.received = 0  # DATA bytes received (checked against `length`)
