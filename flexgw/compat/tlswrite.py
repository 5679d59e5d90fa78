"""TLS records sent at once: a TLSMemoryBIOProtocol whose encrypted bytes skip the write queue.

Private API: `twisted.protocols.tls.TLSMemoryBIOProtocol._flushSendBIO` (overridden; the
connection itself is reached through the public `getHandle()`). Kept because it pays: a
keep-alive https request through a real gateway process costs 448k instructions under callgrind
with it, 505k with Twisted's own flush (bench/gateway_instructions.py --tls, same tree; the
first measurement, bench/README.md "--tls", gave 346k against 418k).
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.protocols.tls import TLSMemoryBIOProtocol

from flexgw.compat.tcpwrite import send_now


class SendNowTLSProtocol(TLSMemoryBIOProtocol):
    """TLSMemoryBIOProtocol whose encrypted bytes go out at once when the TCP transport has
    nothing queued (`send_now`), as plain connections' bytes do, instead of on the next reactor
    turn."""

    def _flushSendBIO(self) -> None:
        try:
            data = self.getHandle().bio_read(2**15)
        except SSL.WantReadError:
            return
        send_now(self.transport, data)
