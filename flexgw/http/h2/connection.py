"""A sans-IO HTTP/2 connection (RFC 9113) for either side: bytes in, handler calls out, bytes
queued for the transport. No object per frame and none per event: frames are read off a
bytearray and dispatched by type to the handler's methods; stream states and windows are plain
attributes (`flexgw.http.h2.stream`). HPACK is the `hpack` library behind flexgw's caches.

The handler (the front's or the upstream connection's protocol) provides:

- `h2_headers(stream_id, headers, end_stream)`: a request head (server; a new stream, whose
  checked parts are in `request` meanwhile: `fields.RequestFields`) or a response head (client;
  informational ones included; its checked `:status`, which is the first field, and
  content-length, -1 without one, are in `status` and `length` meanwhile);
- `h2_trailers(stream_id, headers)`: a trailer section (the stream's end);
- `h2_data(stream_id, data, flow_length, end_stream)`: body bytes; `flow_length` must be handed
  back with `acknowledge` once passed on;
- `h2_reset(stream_id, code, remote)`: the stream was reset by the peer (`remote`) or by the
  codec for the peer's stream error (a RST_STREAM already queued);
- `h2_window(stream_id)`: a window opened (0: the connection's, or every stream's after SETTINGS);
- `h2_settings()`: the peer's SETTINGS applied;
- `h2_goaway(last_stream_id, code)`: the peer's GOAWAY;
- `h2_control()`: a control frame arrived (PING, SETTINGS, PRIORITY, unknown type, empty DATA),
  counted before the codec answers it; the handler may `close` the connection then.

A connection error queues GOAWAY with its code and stops reading (`closed`, `error`); the
handler learns it from `closed` after `receive`. Stream errors queue RST_STREAM and call
`h2_reset`. Sending methods raise `StreamClosedError` for a stream that cannot carry the frame.
"""

from __future__ import annotations

from typing import Any

from hpack.exceptions import HPACKError, OversizedHeaderListError

from flexgw.compat.hpackcache import CachingDecoder, CachingEncoder
from flexgw.http.h2 import fields
from flexgw.http.h2.frames import (
    ACK,
    COMPRESSION_ERROR,
    CONTINUATION,
    DEFAULT_FRAME_SIZE,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    HEAD,
    MAX_WINDOW,
    PADDED,
    PREFACE,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    SETTINGS,
    SETTINGS_ACK,
    STREAM_CLOSED,
    data_frame,
    goaway,
    header_frames,
    ping_ack,
    rst_stream,
    settings,
    window_update,
)
from flexgw.http.h2.settings import (
    HEADER_TABLE_SIZE,
    INITIAL_WINDOW_SIZE,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE,
    SettingsError,
    parse,
)
from flexgw.http.h2.stream import ENDED, RESET_RECEIVED, RESET_SENT, Stream

#: Closed streams remembered (so late frames on them are told from frames on idle streams).
_REMEMBERED = 1024
#: CONTINUATION frames one header block may take.
_MAX_CONTINUATIONS = 64


class StreamClosedError(Exception):
    """A frame to send on a stream that is closed (or not open for sending)."""

    def __init__(self, stream_id: int) -> None:
        super().__init__(f"stream {stream_id} is closed")
        self.stream_id = stream_id


class HeaderListTooLargeError(StreamClosedError):
    """(server side) A header block over the peer's SETTINGS_MAX_HEADER_LIST_SIZE (RFC 9113
    §6.5.2): not sent; the stream cannot carry it, as if closed."""

    def __init__(self, stream_id: int, size: int, limit: int) -> None:
        super().__init__(stream_id)
        self.args = (f"stream {stream_id}: a header list of {size} over the peer's limit of {limit}",)


class _ConnectionError(Exception):
    """A connection error found while reading (RFC 9113 §5.4.1)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class H2Codec:
    """One HTTP/2 connection's framing, stream states, flow control and HPACK."""

    def __init__(
        self,
        handler: Any,
        client: bool,
        local_settings: dict[int, int],
        max_header_list: int,
        header_block_limit: int,
    ) -> None:
        """`local_settings` are what we advertise in `initiate`; each takes effect at once where
        it lets the peer send more than the protocol's default, and only once the peer
        acknowledged it where it lets the peer send less (RFC 9113 §6.5.3: a peer that has not
        read it yet may still use the default);
        `max_header_list` bounds a decoded header list (beyond: ENHANCE_YOUR_CALM), and
        `header_block_limit` a header block still waiting for CONTINUATION frames."""
        self.handler = handler
        self.client = client
        self.local_settings = dict(local_settings)
        self.out: list[bytes] = []
        self.buf = bytearray()
        self.preface_needed = not client
        self.settings_needed = True  # the peer's first frame must be SETTINGS
        self.streams: dict[int, Stream] = {}
        self.closed_streams: dict[int, int] = {}
        self.highest_inbound = 0  # highest stream id the peer opened
        self.next_stream_id = 1 if client else 2
        self.closed = False  # a GOAWAY with an error was sent: nothing more is read
        self.error: tuple[int, str] | None = None  # the connection error, when there was one
        self.reason = ""  # what the last stream error was (read by the handler's h2_reset)
        self.status = 0  # (client side) the checked :status of the head h2_headers is called with
        self.length = -1  # (client side) and its content-length (-1: none)
        # (client side) the checks' outcome, (status, length), of response header blocks that
        # decode alike whatever the HPACK table holds (bounded): a repeated head is checked once
        self.checked: dict[bytes, tuple[int, int]] = {}
        #: (server side) what the checks read of the request head h2_headers is called with
        self.request: fields.RequestFields | None = None
        #: The smallest HPACK table the decoder accepts whatever our SETTINGS said (a peer may
        #: ignore a smaller SETTINGS_HEADER_TABLE_SIZE: flexgw.upstream.h2 tolerates it)
        self.min_decoder_table = 0
        # Our settings in force (the protocol's defaults until `initiate` and the peer's ACK)
        self.local_window = DEFAULT_WINDOW
        self.local_max_streams = 2**31
        self.local_max_frame = DEFAULT_FRAME_SIZE
        self.unacknowledged: list[dict[int, int]] = []  # settings sent, not acknowledged yet
        self.remote_window = DEFAULT_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self.remote_max_streams = 2**31
        self.max_outbound_frame_size = DEFAULT_FRAME_SIZE
        #: (server side) the client's SETTINGS_MAX_HEADER_LIST_SIZE; None: none advertised
        self.remote_max_header_list: int | None = None
        self.send_window = DEFAULT_WINDOW  # the connection's window for what we send
        self.recv_window = DEFAULT_WINDOW  # what the peer may still send on the connection
        self.recv_max = DEFAULT_WINDOW
        self.processed = 0  # connection bytes handed back, not yet in a WINDOW_UPDATE
        self.block_stream = 0  # a header block waiting for CONTINUATION frames
        self.block_parts: list[bytes] = []
        self.block_size = 0
        self.block_flags = 0
        self.block_priority_error = False
        self.block_limit = header_block_limit
        self.decoder = CachingDecoder(max_header_list)
        self.encoder = CachingEncoder()
        self._dispatch = (
            self._data,
            self._headers,
            self._priority,
            self._rst_stream,
            self._settings,
            self._push_promise,
            self._ping,
            self._goaway,
            self._window_update,
            self._continuation,
        )

    # -- sending ---------------------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue our connection preface (the client's magic first) and SETTINGS."""
        frame = settings(self.local_settings)
        self.out.append(PREFACE + frame if self.client else frame)
        self.unacknowledged.append(self.local_settings)
        self._apply_local(self.local_settings, acknowledged=False)

    def _apply_local(self, values: dict[int, int], acknowledged: bool) -> None:
        """Put our settings `values` in force: all of them once `acknowledged`, before that only
        those letting the peer send more (a larger window, frame size, table, stream count)."""
        for code, value in values.items():
            if code == INITIAL_WINDOW_SIZE:
                delta = value - self.local_window
                if delta > 0 or (delta and acknowledged):
                    self.local_window = value
                    for stream in self.streams.values():  # §6.9.2: open streams' windows too
                        stream.recv_window += delta
            elif code == MAX_FRAME_SIZE:
                if acknowledged or value > self.local_max_frame:
                    self.local_max_frame = value
            elif code == MAX_CONCURRENT_STREAMS:
                if acknowledged or value > self.local_max_streams:
                    self.local_max_streams = value
            elif code == HEADER_TABLE_SIZE:
                decoder = self.decoder
                value = max(value, self.min_decoder_table)
                if acknowledged or value > decoder.max_allowed_table_size:
                    decoder.max_allowed_table_size = value

    def increase_window(self, increment: int) -> None:
        """Let the peer send `increment` more bytes on the connection (for good)."""
        self.recv_window += increment
        self.recv_max += increment
        self.out.append(window_update(0, increment))

    def data_to_send(self) -> bytes:
        """The bytes queued since the last call."""
        out = self.out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def get_next_available_stream_id(self) -> int:
        """The id the next stream we open gets (client side)."""
        return self.next_stream_id

    def send_headers(self, stream_id: int, headers: Any, end_stream: bool = False) -> None:
        """A header block (a head, an informational head, or trailers with `end_stream`)."""
        stream = self.streams.get(stream_id)
        if stream is None:
            if not (self.client and stream_id == self.next_stream_id) or self.closed:
                raise StreamClosedError(stream_id)
            stream = self.streams[stream_id] = Stream(stream_id, self.local_window, self.remote_window)
            self.next_stream_id += 2
        elif not stream.send_open:
            raise StreamClosedError(stream_id)
        if self.remote_max_header_list is not None:
            self._check_list_size(stream_id, headers)
        block = self.encoder.encode(headers)
        self.out.append(header_frames(stream_id, block, end_stream, self.max_outbound_frame_size))
        if end_stream:
            self._send_end(stream)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """A DATA frame; the caller keeps within `local_flow_control_window` and the frame size."""
        stream = self.streams.get(stream_id)
        if stream is None or not stream.send_open:
            raise StreamClosedError(stream_id)
        size = len(data)
        if size:
            stream.send_window -= size
            self.send_window -= size
        self.out.append(data_frame(stream_id, data, end_stream))
        if end_stream:
            self._send_end(stream)

    def send_response(self, stream_id: int, headers: Any, body: bytes) -> bool:
        """A whole message at once: HEADERS, then `body` in one DATA frame with END_STREAM (or
        HEADERS with END_STREAM when `body` is empty), queued as one piece. False, with nothing
        queued, when `body` does not fit the windows or one frame: send it piece by piece."""
        stream = self.streams.get(stream_id)
        if stream is None or not stream.send_open:
            raise StreamClosedError(stream_id)
        size = len(body)
        if size > stream.send_window or size > self.send_window or size > self.max_outbound_frame_size:
            return False
        if self.remote_max_header_list is not None:
            self._check_list_size(stream_id, headers)
        block = self.encoder.encode(headers)
        if size:
            stream.send_window -= size
            self.send_window -= size
            self.out.append(
                header_frames(stream_id, block, False, self.max_outbound_frame_size)
                + data_frame(stream_id, body, True)
            )
        else:
            self.out.append(header_frames(stream_id, block, True, self.max_outbound_frame_size))
        self._send_end(stream)
        return True

    def _check_list_size(self, stream_id: int, headers: Any) -> None:
        """Refuse a header list over the peer's SETTINGS_MAX_HEADER_LIST_SIZE (§6.5.2: the
        uncompressed size, 32 octets more per field)."""
        size = 0
        for name, value in headers:
            size += len(name) + len(value) + 32
        limit = self.remote_max_header_list
        if limit is not None and size > limit:
            raise HeaderListTooLargeError(stream_id, size, limit)

    def end_stream(self, stream_id: int) -> None:
        """An empty DATA frame with END_STREAM."""
        self.send_data(stream_id, b"", True)

    def local_flow_control_window(self, stream_id: int) -> int:
        """How many bytes may be sent on the stream now."""
        stream = self.streams.get(stream_id)
        if stream is None:
            raise StreamClosedError(stream_id)
        window = stream.send_window
        return min(self.send_window, window)

    def reset_stream(self, stream_id: int, code: int) -> None:
        """RST_STREAM (nothing for a stream already closed)."""
        if self.streams.pop(stream_id, None) is None:
            return
        self.out.append(rst_stream(stream_id, code))
        self._remember(stream_id, RESET_SENT)

    def acknowledge(self, stream_id: int, size: int) -> None:
        """`size` received bytes were passed on: give the windows back (WINDOW_UPDATE once half
        a window is owed; the connection's share only for a stream no longer receiving)."""
        processed = self.processed + size
        if processed >= self.recv_max >> 1:
            self.recv_window += processed
            self.processed = 0
            self.out.append(window_update(0, processed))
        else:
            self.processed = processed
        stream = self.streams.get(stream_id)
        if stream is not None and stream.recv_open:
            processed = stream.processed + size
            if processed >= self.local_window >> 1:
                stream.recv_window += processed
                stream.processed = 0
                self.out.append(window_update(stream_id, processed))
            else:
                stream.processed = processed

    def close(self, code: int, message: str = "") -> None:
        """A connection error of ours: GOAWAY(`code`) and stop reading."""
        if self.closed:
            return
        self.closed = True
        self.error = (code, message)
        self.block_stream = 0
        self.buf.clear()
        self.out.append(goaway(self.highest_inbound, code, message.encode("ascii", "replace")[:128]))

    def stop(self) -> None:
        """Read nothing more (the handler is closing the connection without an error of ours)."""
        self.closed = True
        self.block_stream = 0
        self.buf.clear()

    def goaway(self, code: int, last_stream_id: int) -> None:
        """A GOAWAY that goes on reading (a graceful shutdown: streams up to the last finish)."""
        self.out.append(goaway(last_stream_id, code))

    def _send_end(self, stream: Stream) -> None:
        stream.send_open = False
        if not stream.recv_open:
            del self.streams[stream.stream_id]
            self._remember(stream.stream_id, ENDED)

    # -- receiving -------------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Read `data`: every complete frame in it is acted on (or the read ends at a connection
        error: GOAWAY queued, `closed` set)."""
        if self.closed:
            return
        buf = self.buf
        buf += data
        if self.preface_needed:
            if len(buf) < 24:
                if not PREFACE.startswith(bytes(buf)):
                    self.close(PROTOCOL_ERROR, "invalid connection preface")
                return
            if buf[:24] != PREFACE:
                self.close(PROTOCOL_ERROR, "invalid connection preface")
                return
            del buf[:24]
            self.preface_needed = False
        pos = 0
        size = len(buf)
        unpack = HEAD.unpack_from
        dispatch = self._dispatch
        max_frame = self.local_max_frame
        try:
            while size - pos >= 9:
                high, low, kind, flags, stream_id = unpack(buf, pos)
                length = high << 8 | low
                if length > max_frame:
                    raise _ConnectionError(FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE")
                end = pos + 9 + length
                if end > size:
                    break
                payload = bytes(buf[pos + 9 : end])
                pos = end
                stream_id &= 0x7FFFFFFF
                if self.block_stream and kind != CONTINUATION:
                    raise _ConnectionError(PROTOCOL_ERROR, "header block interrupted")
                if self.settings_needed:
                    if kind != SETTINGS or flags & ACK:
                        raise _ConnectionError(PROTOCOL_ERROR, "first frame not SETTINGS")
                    self.settings_needed = False
                if kind < 10:
                    dispatch[kind](flags, stream_id, payload)
                else:
                    self._control()  # an extension frame: ignored (§5.5), but counted
                if self.closed:
                    return
        except _ConnectionError as exc:
            self.close(exc.code, str(exc))
            return
        if pos:
            del buf[:pos]

    def _control(self) -> None:
        self.handler.h2_control()

    def _idle(self, stream_id: int) -> bool:
        """Whether `stream_id` was never opened."""
        if (stream_id & 1) == (0 if self.client else 1):  # the peer's
            return stream_id > self.highest_inbound
        return stream_id >= self.next_stream_id

    def _remember(self, stream_id: int, how: int) -> None:
        remembered = self.closed_streams
        remembered[stream_id] = how
        if len(remembered) > _REMEMBERED:
            del remembered[next(iter(remembered))]

    def _stream_error(self, stream_id: int, code: int, reason: str = "") -> None:
        """RST_STREAM for the peer's error on a stream (§5.4.2); `reason` says what it was."""
        self.reason = reason
        self.streams.pop(stream_id, None)
        self.out.append(rst_stream(stream_id, code))
        self._remember(stream_id, RESET_SENT)
        self.handler.h2_reset(stream_id, code, False)

    def _credit(self, size: int) -> None:
        """Flow-controlled bytes the codec dropped: the connection's share back at once."""
        if size:
            self.acknowledge(0, size)

    def _not_receiving(self, stream_id: int, data: bool) -> None:
        """DATA (`data`) or HEADERS on a stream that takes none (§5.1)."""
        if stream_id in self.streams:  # half-closed (remote)
            self._stream_error(stream_id, STREAM_CLOSED, "a frame after END_STREAM")
            return
        how = self.closed_streams.get(stream_id)
        if how == RESET_SENT:
            return  # late frames after our RST_STREAM are ignored
        if how == RESET_RECEIVED or (how == ENDED and data):
            # (DATA after both ends: a stream error, as the h2 library makes it; the message
            # that ended is whole, the connection's other streams go on)
            self._stream_error(stream_id, STREAM_CLOSED, "a frame on a closed stream")
            return
        if how == ENDED:
            raise _ConnectionError(STREAM_CLOSED, "HEADERS on a closed stream")
        if self._idle(stream_id):
            raise _ConnectionError(PROTOCOL_ERROR, "frame on an idle stream")
        raise _ConnectionError(PROTOCOL_ERROR, "frame on a stream closed long ago, or never opened")

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        flow = len(payload)
        if flags & PADDED:
            if not flow or payload[0] >= flow:
                raise _ConnectionError(PROTOCOL_ERROR, "invalid padding")
            data = payload[1 : flow - payload[0]]
        else:
            data = payload
        if flow > self.recv_window:
            raise _ConnectionError(FLOW_CONTROL_ERROR, "connection window exceeded")
        self.recv_window -= flow
        end = flags & END_STREAM
        if not data and not end:
            self._control()
            if self.closed:
                return
        stream = self.streams.get(stream_id)
        if stream is None or not stream.recv_open:
            self._credit(flow)
            self._not_receiving(stream_id, True)
            return
        if flow > stream.recv_window:
            self._credit(flow)
            self._stream_error(stream_id, FLOW_CONTROL_ERROR, "DATA over the stream window")
            return
        stream.recv_window -= flow
        if stream.length >= 0:
            received = stream.received = stream.received + len(data)
            if received > stream.length or (end and received != stream.length):
                self._credit(flow)
                self._stream_error(stream_id, PROTOCOL_ERROR, "body not its content-length")
                return
        if end:
            stream.recv_open = False
            if not stream.send_open:
                del self.streams[stream_id]
                self._remember(stream_id, ENDED)
        self.handler.h2_data(stream_id, data, flow, bool(end))

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on stream 0")
        start = 0
        end = len(payload)
        if flags & PADDED:
            if not end:
                raise _ConnectionError(PROTOCOL_ERROR, "invalid padding")
            start = 1
            end -= payload[0]
        priority_error = False
        if flags & PRIORITY_FLAG:
            if end - start < 5:
                raise _ConnectionError(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            dependency = int.from_bytes(payload[start : start + 4], "big") & 0x7FFFFFFF
            priority_error = dependency == stream_id
            start += 5
        if end < start:
            raise _ConnectionError(PROTOCOL_ERROR, "invalid padding")
        fragment = payload[start:end] if start or end != len(payload) else payload
        if flags & END_HEADERS:
            self._block(stream_id, fragment, flags & END_STREAM, priority_error)
            return
        self.block_stream = stream_id
        self.block_parts = [fragment]
        self.block_size = len(fragment)
        self.block_flags = flags
        self.block_priority_error = priority_error
        if self.block_size > self.block_limit:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "header block too large")

    def _continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not self.block_stream or stream_id != self.block_stream:
            raise _ConnectionError(PROTOCOL_ERROR, "unexpected CONTINUATION")
        parts = self.block_parts
        parts.append(payload)
        self.block_size += len(payload)
        if not flags & END_HEADERS:
            if self.block_size > self.block_limit or len(parts) > _MAX_CONTINUATIONS:
                raise _ConnectionError(ENHANCE_YOUR_CALM, "header block too large")
            return
        self.block_stream = 0
        self.block_parts = []
        self._block(stream_id, b"".join(parts), self.block_flags & END_STREAM, self.block_priority_error)

    def _decode(self, block: bytes) -> list:
        try:
            return self.decoder.decode(block, raw=True)  # type: ignore[no-any-return]
        except OversizedHeaderListError as exc:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "header list too large") from exc
        except (HPACKError, IndexError, TypeError, ValueError) as exc:
            raise _ConnectionError(COMPRESSION_ERROR, "invalid header block") from exc

    def _block(self, stream_id: int, block: bytes, end_stream: int, priority_error: bool) -> None:
        """A complete header block."""
        headers = self._decode(block)  # always: the HPACK state is the connection's
        stream = self.streams.get(stream_id)
        if stream is None:
            if self.client or not stream_id & 1:
                if stream_id in self.closed_streams:
                    self._not_receiving(stream_id, False)
                    return
                raise _ConnectionError(PROTOCOL_ERROR, "HEADERS opening a stream the peer may not open")
            if stream_id <= self.highest_inbound:
                self._not_receiving(stream_id, False)
                return
            self.highest_inbound = stream_id
            if priority_error:
                self._stream_error(stream_id, PROTOCOL_ERROR)
                return
            if len(self.streams) >= self.local_max_streams:
                raise _ConnectionError(PROTOCOL_ERROR, "over SETTINGS_MAX_CONCURRENT_STREAMS")
            try:
                request = self.request = fields.request_fields(headers)
            except fields.MalformedFields as exc:
                raise _ConnectionError(PROTOCOL_ERROR, str(exc)) from exc
            length = request[0]
            stream = Stream(stream_id, self.local_window, self.remote_window)
            self.streams[stream_id] = stream
            if length > 0 and end_stream:
                self._stream_error(stream_id, PROTOCOL_ERROR)
                return
            stream.length = length
            if end_stream:
                stream.recv_open = False
            self.handler.h2_headers(stream_id, headers, bool(end_stream))
            return
        if not stream.recv_open:
            self._not_receiving(stream_id, False)
            return
        if priority_error:
            self._stream_error(stream_id, PROTOCOL_ERROR)
            return
        if self.client and not stream.final_head:
            # A malformed response is a stream error (§8.1.1): the other streams go on.
            contained = self.decoder.contained
            known = self.checked.get(block) if contained else None
            if known is not None:
                status, length = known
            else:
                try:
                    status, length = fields.response_status(headers)
                except fields.MalformedFields as exc:
                    self._stream_error(stream_id, PROTOCOL_ERROR, str(exc))
                    return
                if contained:
                    if len(self.checked) >= 64:
                        self.checked.clear()
                    self.checked[block] = (status, length)
            if status < 200:
                if end_stream:
                    self._stream_error(stream_id, PROTOCOL_ERROR, "informational head ending the stream")
                    return
            else:
                stream.final_head = True
                stream.length = length
                if end_stream:
                    self._end_received(stream)
            self.status = status
            self.length = length
            self.handler.h2_headers(stream_id, headers, bool(end_stream))
            return
        # trailers
        if not end_stream:
            self._stream_error(stream_id, PROTOCOL_ERROR, "trailers (or a second head) without END_STREAM")
            return
        try:
            fields.check_trailers(headers)
        except fields.MalformedFields as exc:
            if self.client:
                self._stream_error(stream_id, PROTOCOL_ERROR, str(exc))
                return
            raise _ConnectionError(PROTOCOL_ERROR, str(exc)) from exc
        if stream.length >= 0 and stream.received != stream.length:
            self._stream_error(stream_id, PROTOCOL_ERROR, "body shorter than its content-length")
            return
        self._end_received(stream)
        self.handler.h2_trailers(stream_id, headers)

    def _end_received(self, stream: Stream) -> None:
        stream.recv_open = False
        if not stream.send_open:
            del self.streams[stream.stream_id]
            self._remember(stream.stream_id, ENDED)

    def _priority(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            raise _ConnectionError(FRAME_SIZE_ERROR, "PRIORITY of a length other than 5")
        self._control()
        if self.closed:
            return
        if int.from_bytes(payload[:4], "big") & 0x7FFFFFFF == stream_id:
            self._stream_error(stream_id, PROTOCOL_ERROR)

    def _rst_stream(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "RST_STREAM of a length other than 4")
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            if self._idle(stream_id):
                raise _ConnectionError(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            return
        self._remember(stream_id, RESET_RECEIVED)
        self.handler.h2_reset(stream_id, int.from_bytes(payload, "big"), True)

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            if self.unacknowledged:
                self._apply_local(self.unacknowledged.pop(0), acknowledged=True)
            return
        self._control()
        if self.closed:
            return
        try:
            pairs = parse(payload, self.client)
        except SettingsError as exc:
            raise _ConnectionError(exc.code, str(exc)) from exc
        for code, value in pairs:
            if code == INITIAL_WINDOW_SIZE:
                delta = value - self.remote_window
                self.remote_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise _ConnectionError(FLOW_CONTROL_ERROR, "a stream window over 2^31-1")
            elif code == MAX_FRAME_SIZE:
                self.max_outbound_frame_size = value
            elif code == MAX_CONCURRENT_STREAMS:
                self.remote_max_streams = value
            elif code == HEADER_TABLE_SIZE:
                self.encoder.header_table_size = value
            elif code == MAX_HEADER_LIST_SIZE and not self.client:
                self.remote_max_header_list = value
        self.out.append(SETTINGS_ACK)
        self.handler.h2_settings()

    def _push_promise(self, flags: int, stream_id: int, payload: bytes) -> None:
        raise _ConnectionError(PROTOCOL_ERROR, "PUSH_PROMISE (push is disabled)")

    def _ping(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise _ConnectionError(FRAME_SIZE_ERROR, "PING of a length other than 8")
        if flags & ACK:
            return
        self._control()
        if not self.closed:
            self.out.append(ping_ack(payload))

    def _goaway(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise _ConnectionError(FRAME_SIZE_ERROR, "GOAWAY shorter than 8")
        last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
        self.handler.h2_goaway(last, int.from_bytes(payload[4:8], "big"))

    def _window_update(self, flags: int, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "WINDOW_UPDATE of a length other than 4")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if not stream_id:
            if not increment:
                raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "connection window over 2^31-1")
            self.handler.h2_window(0)
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if self._idle(stream_id):
                raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return
        if not increment:
            self._stream_error(stream_id, PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._stream_error(stream_id, FLOW_CONTROL_ERROR, "stream window over 2^31-1")
            return
        if stream.send_open:
            self.handler.h2_window(stream_id)

