"""flexgw.testing.certs: demo private keys are written readable by their owner only."""

from __future__ import annotations

import os
import stat

from twisted.trial import unittest

from flexgw.testing.certs import CertificateAuthority, main


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class KeyFileModeTests(unittest.TestCase):
    """Keys are 0600 whatever the umask or an older file's mode; certificates stay readable."""

    def setUp(self) -> None:
        """A permissive umask, so a key written with the default mode would be 0666."""
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        self.out = os.path.abspath(self.mktemp())

    def test_demo_command_keys_are_private(self) -> None:
        """`python -m flexgw.testing.certs --out DIR` writes server.key and client.key as 0600."""
        main(["--out", self.out])
        for name in ("server.key", "client.key"):
            self.assertEqual(_mode(os.path.join(self.out, name)), 0o600, name)
        self.assertEqual(_mode(os.path.join(self.out, "server.crt")) & 0o044, 0o044)

    def test_existing_wide_key_file_narrowed(self) -> None:
        """A key file that already exists with mode 0644 is rewritten as 0600."""
        os.makedirs(self.out)
        path = os.path.join(self.out, "leaf.key")
        with open(path, "wb") as handle:
            handle.write(b"old")
        os.chmod(path, 0o644)
        issued = CertificateAuthority().issue("localhost", dns=["localhost"])
        _, key = issued.write(self.out, "leaf")
        self.assertEqual(_mode(key), 0o600)
        with open(key, "rb") as handle:
            self.assertEqual(handle.read(), issued.key_pem)
