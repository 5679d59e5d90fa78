"""Sending at once: skip Twisted's write queue when a TCP transport has nothing queued.

`transport.write` always queues and sends on the next reactor turn, after an epoll modify and
one more dispatch. A proxy that answers small requests pays that twice per request. When the
transport's queue is empty, `send_now` calls `send` on the socket directly and queues only what
the kernel did not take, so ordering and backpressure stay Twisted's. Other transports (TLS,
test transports) always use `write`.

Private API: `twisted.internet.abstract.FileDescriptor._tempDataBuffer` (with `dataBuffer`, the
write queue; no public way tells whether a transport has bytes queued). Kept because it pays:
a keep-alive request through a real gateway process costs 323k instructions under callgrind
with `send_now`, 439k with `transport.write` only (bench/gateway_instructions.py, same tree).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

_DIRECT = (tcp.Server, tcp.Client)


def send_now(transport: Any, data: bytes) -> None:
    """Send `data` now if nothing is queued before it; otherwise (or for the rest) `write` it."""
    if (
        type(transport) in _DIRECT
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.connected
        and not transport.disconnecting
    ):
        try:
            sent = transport.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = 0  # let Twisted's own write path meet and report the error
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
