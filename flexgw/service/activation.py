"""systemd socket activation: listening sockets passed in LISTEN_FDS, matched to listeners.

systemd passes `LISTEN_FDS` descriptors starting at fd 3, with `LISTEN_PID` (they are for
this process only: any other pid means they are not ours, and they are ignored, as
`sd_listen_fds` does) and `LISTEN_FDNAMES` (colon-separated `FileDescriptorName=` values).

A listener (host, port) adopts an inherited socket:

1. by name: a name that is the port (`FileDescriptorName=8081`) or ends in `-PORT`
   (`FileDescriptorName=api-8081`) goes to the listener on that port (a plan has one listener
   per port; a name cannot hold `host:port`, as `:` separates the names);
2. otherwise by the socket's bound address (getsockname): the same port, and the same host, or
   a wildcard socket (`ListenStream=8081` binds `[::]:8081`, dual stack) for a wildcard
   listener (`0.0.0.0` or `::`).

The pool keeps every inherited descriptor open for the life of the process; a listener
adopts a duplicate (Twisted's `adoptStreamPort`), so closing a listener on reload leaves the
inherited socket listening (connection attempts wait in its backlog) and a later reload can
adopt it again. The descriptors are made close-on-exec and non-blocking; LISTEN_* are left in the environment
(children see a LISTEN_PID that is not theirs and ignore them, and Twisted's own `systemd:`
endpoints, e.g. `--admin systemd:domain=INET:name=admin`, still find theirs).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from twisted.logger import Logger

from flexgw.compat.systemd import twisted_listen_fds

_log = Logger(namespace="flexgw.systemd")

#: The first descriptor systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3

_WILDCARDS = {"0.0.0.0", "::", ""}


@dataclass
class InheritedSocket:
    """One listening socket passed by systemd."""

    fd: int
    family: int
    host: str
    port: int
    name: str | None
    user: tuple[str, int] | None = None  # the listener address that adopted it, if any

    def name_port(self) -> int | None:
        """The port the name designates (`8081`, `api-8081`), if it names one."""
        if not self.name:
            return None
        tail = self.name.rsplit("-", 1)[-1]
        return int(tail) if tail.isdigit() and 0 < int(tail) < 65536 else None

    def describe(self) -> str:
        """For log lines: fd, name and bound address."""
        name = f" {self.name!r}" if self.name else ""
        return f"fd {self.fd}{name} ({self.host}:{self.port})"


def _same_host(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def listen_environ(environ: Mapping[str, str]) -> Mapping[str, str]:
    """LISTEN_* for this process: `environ`'s, or else the copy Twisted took of them.

    Importing `twisted.internet.endpoints` (twistd does, before the service starts) parses
    LISTEN_* for Twisted's `systemd:` endpoints and deletes LISTEN_PID and LISTEN_FDS from
    `os.environ`; the descriptors it found are then only known to it.
    """
    if "LISTEN_FDS" in environ:
        return environ
    try:
        fds, names = twisted_listen_fds()
    except (ImportError, AttributeError):  # a Twisted without it: nothing to recover
        return environ
    if not fds or fds != list(range(fds[0], fds[0] + len(fds))):
        return environ
    recovered = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": str(len(fds))}
    if len(names) == len(fds):
        recovered["LISTEN_FDNAMES"] = ":".join(names)
    return recovered


class InheritedSockets:
    """The pool of sockets systemd passed to this process (empty outside socket activation)."""

    def __init__(
        self,
        environ: Mapping[str, str],
        pid: int | None = None,
        start: int = LISTEN_FDS_START,
    ) -> None:
        self.sockets: list[InheritedSocket] = []
        if environ.get("LISTEN_PID") != str(os.getpid() if pid is None else pid):
            return  # unset, or meant for another process
        try:
            count = int(environ.get("LISTEN_FDS", ""))
        except ValueError:
            _log.warn("LISTEN_FDS={value!r} is not a number: ignored", value=environ.get("LISTEN_FDS"))
            return
        names: list[str | None] = list(environ.get("LISTEN_FDNAMES", "").split(":"))
        if len(names) != count:
            if "LISTEN_FDNAMES" in environ:
                _log.warn("LISTEN_FDNAMES does not name LISTEN_FDS descriptors: names ignored")
            names = [None] * count
        for offset in range(max(count, 0)):
            fd = start + offset
            found = self._inspect(fd, names[offset])
            if found is not None:
                self.sockets.append(found)

    @staticmethod
    def _inspect(fd: int, name: str | None) -> InheritedSocket | None:
        """The socket at `fd` if it is a listening TCP socket (fd left open either way)."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            _log.warn("Inherited fd {fd}: {error}; ignored", fd=fd, error=exc)
            return None
        try:
            family, kind = sock.family, sock.type
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            address = sock.getsockname()
        except OSError as exc:
            _log.warn("Inherited fd {fd}: {error}; ignored", fd=fd, error=exc)
            return None
        finally:
            sock.detach()  # the descriptor stays open: it is the pool's
        if family not in (socket.AF_INET, socket.AF_INET6) or kind != socket.SOCK_STREAM or not listening:
            _log.warn(
                "Inherited fd {fd} ({name}) is not a listening TCP socket; ignored", fd=fd, name=name
            )
            return None
        os.set_inheritable(fd, False)
        os.set_blocking(fd, False)  # systemd passes blocking sockets; the reactor needs non-blocking
        return InheritedSocket(fd=fd, family=family, host=address[0], port=address[1], name=name)

    def __len__(self) -> int:
        return len(self.sockets)

    def take(self, host: str, port: int) -> InheritedSocket | None:
        """The free inherited socket for listener (host, port), marked as used; None if none."""
        free = [s for s in self.sockets if s.user is None]
        chosen = next((s for s in free if s.name_port() == port), None)
        if chosen is None:
            chosen = next(
                (
                    s
                    for s in free
                    if s.name_port() is None
                    and s.port == port
                    and (_same_host(s.host, host) or (s.host in _WILDCARDS and host in _WILDCARDS))
                ),
                None,
            )
        if chosen is not None:
            chosen.user = (host, port)
        return chosen

    def release(self, address: tuple[str, int]) -> None:
        """The listener at `address` closed: its inherited socket (kept open) is free again."""
        for inherited in self.sockets:
            if inherited.user == address:
                inherited.user = None

    def unused(self) -> list[InheritedSocket]:
        """Inherited sockets no listener adopted."""
        return [s for s in self.sockets if s.user is None]
