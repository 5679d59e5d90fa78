"""How many bytes of an unfinished HTTP/2 header block h2 holds (CONTINUATION frames).

h2 buffers a HEADERS frame and its CONTINUATIONs until END_HEADERS and only bounds their count
(64 frames, up to 64 x 16 KiB); flexgw refuses a run past `max_header_bytes` as it arrives.

Private API: `h2.frame_buffer.FrameBuffer._headers_buffer`. Kept: h2 has no public way to see
a header block before it is complete.
"""

from __future__ import annotations

from typing import Any


def header_backlog(conn: Any) -> int:
    """Bytes of a header block `conn` (an h2 H2Connection) still buffers for its CONTINUATION
    frames; 0 when none (or when an h2 without the buffer: tests/test_compat.py says so)."""
    buffered = getattr(conn.incoming_buffer, "_headers_buffer", None)
    if not buffered:
        return 0
    return sum(len(frame.data) for frame in buffered)
