"""The LISTEN_* sockets Twisted's `systemd:` endpoint parser took from the environment.

Importing `twisted.internet.endpoints` (twistd does, before the service starts) parses LISTEN_*
for Twisted's `systemd:` endpoints and deletes LISTEN_PID and LISTEN_FDS from `os.environ`; the
descriptors it found are then only known to it.

Private API: `twisted.internet.endpoints._SystemdParser._sddaemon` (a public `ListenFDs`). Kept:
there is no public way to get them back once Twisted has deleted the variables.
"""

from __future__ import annotations


def twisted_listen_fds() -> tuple[list[int], list[str]]:
    """The descriptors (and their names, in the same order, when systemd named them all) that
    Twisted's `systemd:` endpoint parser found; empty lists when it found none."""
    from twisted.internet.endpoints import _SystemdParser

    found = _SystemdParser._sddaemon
    fds = found.inheritedDescriptors()
    by_fd = {fd: name for name, fd in found.inheritedNamedDescriptors().items()}
    names = [by_fd[fd] for fd in fds if fd in by_fd]
    return fds, names if len(names) == len(fds) else []
