"""Listening sockets with SO_REUSEPORT, so the `--workers` processes each listen on the same address.

Every worker binds its own socket to the listener's address with SO_REUSEPORT; Linux then spreads
new connections over the workers' sockets (by a hash of the connection's addresses). A worker
that stops listening (draining, reloading a listener away, dying) takes only its own socket
away: the others keep accepting. Sockets passed by systemd (socket activation) are not bound
here: every worker inherits those and accepts from the one shared queue.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from twisted.internet.error import CannotListenError

#: listen() backlog (Twisted's listenTCP default).
BACKLOG = 50


def listen_reuse_port(reactor: Any, port: int, factory: Any, interface: str = "") -> Any:
    """`reactor.listenTCP(port, factory, interface=...)`, on a socket with SO_REUSEPORT.

    Raises CannotListenError as listenTCP does.
    """
    host = interface or "0.0.0.0"
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a name: bound as IPv4, as listenTCP does
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
        return reactor.adoptStreamPort(sock.fileno(), family, factory)
    except OSError as exc:
        raise CannotListenError(host, port, exc) from exc
    finally:
        sock.close()  # the reactor holds its own duplicate
