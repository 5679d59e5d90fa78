"""TLS records sent at once: a TLSMemoryBIOProtocol whose encrypted bytes skip the write queue.

Private API: `twisted.protocols.tls.TLSMemoryBIOProtocol._flushSendBIO` (overridden; the
connection itself is reached through the public `getHandle()`). Kept because it pays: a
keep-alive https request through the gateway costs about 346k instructions under callgrind with
it, 418k without (bench/README.md, "--tls").
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
