"""Sending one HTTP/2 stream's queued body bytes within flow control, then its end.

Both HTTP/2 sides queue body bytes per stream (the downstream front its responses, the upstream
client its requests) and send them as the peer's windows open; this is that loop, once.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from flexgw.http.headers import HeaderList


def send_queued(
    conn: Any, stream_id: int, queue: deque[bytes], ending: bool, trailers: HeaderList | None
) -> tuple[int, bool]:
    """Send DATA frames from `queue` (taken off it) as far as the stream's flow-control window
    and the frame size allow. When `ending` and the queue empties, end the stream: END_STREAM on
    the last DATA frame, or a closing HEADERS frame with `trailers` when there are some.

    Returns (bytes sent, whether the stream was ended). `h2`'s errors propagate.
    """
    sent = 0
    while queue:
        window = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
        if window <= 0:
            return sent, False
        data = queue[0]
        if len(data) <= window:
            queue.popleft()
        else:
            queue[0] = data[window:]
            data = data[:window]
        sent += len(data)
        end = not queue and ending and not trailers
        conn.send_data(stream_id, data, end_stream=end)
        if end:
            return sent, True
    if not ending:
        return sent, False
    if trailers:
        conn.send_headers(stream_id, trailers, end_stream=True)
    else:
        conn.end_stream(stream_id)
    return sent, True
