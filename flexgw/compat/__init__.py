"""Twisted and h2 private APIs flexgw relies on, one small adapter module each (bottom layer).

Each module here names the private attribute it touches, why flexgw keeps it (a measured gain,
or no public way to do the same), and `tests/test_compat.py` fails with the attribute and the
library version when an upgrade removes it. Nothing outside this package touches a Twisted or
h2 private name, and nothing here imports the rest of flexgw.

- `tcpwrite`: a TCP transport's write queue (`dataBuffer`, `_tempDataBuffer`): send at once.
- `tlswrite`: `TLSMemoryBIOProtocol._flushSendBIO`: encrypted bytes sent at once.
- `systemd`: `endpoints._SystemdParser._sddaemon`: the LISTEN_* sockets Twisted took over.
- `logobservers`: `LogPublisher._observers`: wrap twistd's log observers in a level filter.
- `haproxy`: `twisted.protocols.haproxy` parsers and wrapper (only `proxyEndpoint` is public).
- `hpackcache`: hpack's `HeaderTable.add`/`maxsize`: cached HPACK blocks for unchanged tables.
"""
