"""A real OpenLDAP `slapd` for tests: a generated slapd.conf and LDIF (loaded with slapadd), on
free loopback ports (ldap://, and ldaps:// with StartTLS when given a certificate), stopped by
its PID."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from twisted.trial.unittest import SkipTest

from tests.harness import free_port

SLAPD = shutil.which("slapd") or ("/usr/sbin/slapd" if os.path.exists("/usr/sbin/slapd") else None)
SLAPADD = shutil.which("slapadd") or (
    "/usr/sbin/slapadd" if os.path.exists("/usr/sbin/slapadd") else None
)
SCHEMA_DIR = "/etc/ldap/schema"
MODULE_DIR = "/usr/lib/ldap"
#: Longest wait for slapd to accept connections (a bound, not a sleep).
READY_TIMEOUT = 10.0

BASE = "dc=example,dc=com"
SERVICE_DN = f"cn=service,{BASE}"
SERVICE_PASSWORD = "service-secret"
#: uid -> password of the people under ou=people (the last two share a mail: ambiguous).
PEOPLE = {
    "alice": "alice-pw",
    "bob": "bob-pw",
    "*)(uid=*": "star-pw",  # a uid that looks like a filter injection: found only literally
    "twin1": "twin-pw",
    "twin2": "twin-pw",
}


def ldif() -> str:
    """The directory: the base, the service user, ou=people with PEOPLE, and ou=deep/ou=staff
    with `carol` (only found by a subtree search from the base)."""
    entries = [
        f"dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n",
        (f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\n"
         f"objectClass: simpleSecurityObject\ncn: service\nuserPassword: {SERVICE_PASSWORD}\n"),
        f"dn: ou=people,{BASE}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: ou=deep,{BASE}\nobjectClass: organizationalUnit\nou: deep\n",
        f"dn: ou=staff,ou=deep,{BASE}\nobjectClass: organizationalUnit\nou: staff\n",
        (f"dn: uid=carol,ou=staff,ou=deep,{BASE}\nobjectClass: inetOrgPerson\nuid: carol\n"
         "cn: carol\nsn: carol\nuserPassword: carol-pw\n"),
    ]
    for uid, password in PEOPLE.items():
        rdn = uid.replace("\\", "\\5c").replace("*", "\\2a").replace(")", "\\29").replace("(", "\\28")
        rdn = rdn.replace(",", "\\,").replace("=", "\\=")
        mail = "twins@example.com" if uid.startswith("twin") else f"{uid}@example.com"
        entries.append(
            f"dn: uid={rdn},ou=people,{BASE}\nobjectClass: inetOrgPerson\nuid: {uid}\n"
            f"cn: {uid}\nsn: {uid}\nmail: {mail}\nuserPassword: {password}\n"
        )
    return "\n".join(entries)


class SlapdServer:
    """One slapd with an mdb database holding `ldif()`; anonymous users may only bind (so the
    policy's searches need the service user). With `tls` (cert, key, CA paths) it also listens
    with ldaps:// on `tls_port` and offers StartTLS on the plain port."""

    def __init__(self, tls: tuple[str, str, str] | None = None) -> None:
        if SLAPD is None or SLAPADD is None or not os.path.isdir(SCHEMA_DIR):
            raise SkipTest("slapd is not installed (apt-get install slapd ldap-utils)")
        self.port = free_port()
        self.tls_port = free_port() if tls is not None else None
        self.tls = tls
        self.workdir = tempfile.mkdtemp(prefix="flexgw-slapd-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The ldap:// URL."""
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        """The ldaps:// URL (the certificate names `localhost` and 127.0.0.1)."""
        return f"ldaps://127.0.0.1:{self.tls_port}"

    def _config(self) -> str:
        data = os.path.join(self.workdir, "data")
        os.makedirs(data, exist_ok=True)
        tls = ""
        if self.tls is not None:
            cert, key, ca = self.tls
            tls = f"TLSCertificateFile {cert}\nTLSCertificateKeyFile {key}\nTLSCACertificateFile {ca}\n"
        return (
            "".join(f"include {SCHEMA_DIR}/{name}.schema\n"
                    for name in ("core", "cosine", "inetorgperson"))
            + f"pidfile {self.workdir}/slapd.pid\n"
            + f"modulepath {MODULE_DIR}\nmoduleload back_mdb\n"
            + tls
            + "access to attrs=userPassword by anonymous auth by * none\n"
            + "access to * by users read by * none\n"
            + f"database mdb\nmaxsize 10485760\nsuffix \"{BASE}\"\n"
            + f"directory {data}\n"
        )

    def start(self) -> SlapdServer:
        """Write the config, load the LDIF, spawn slapd, wait (bounded) until it accepts."""
        conf = os.path.join(self.workdir, "slapd.conf")
        with open(conf, "w") as f:
            f.write(self._config())
        source = os.path.join(self.workdir, "data.ldif")
        with open(source, "w") as f:
            f.write(ldif())
        loaded = subprocess.run(
            [SLAPADD, "-f", conf, "-l", source], capture_output=True, timeout=READY_TIMEOUT,
            check=False,
        )
        if loaded.returncode != 0:
            raise RuntimeError(f"slapadd failed: {loaded.stderr[-800:]!r}")
        urls = [f"ldap://127.0.0.1:{self.port}/"]
        if self.tls_port is not None:
            urls.append(f"ldaps://127.0.0.1:{self.tls_port}/")
        log = open(os.path.join(self.workdir, "slapd.log"), "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [SLAPD, "-f", conf, "-h", " ".join(urls), "-d", "0"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Wait (bounded) until slapd wrote its pid file, which it does only once it has bound
        every listener (so a port another process took makes it exit instead), then connect to
        each port. Each check is a system call; the loop ends at READY_TIMEOUT at the latest."""
        assert self.process is not None
        deadline = time.monotonic() + READY_TIMEOUT
        pidfile = os.path.join(self.workdir, "slapd.pid")
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"slapd exited: {self.log()[-800:]!r}")
            try:
                with open(pidfile) as f:
                    if f.read().strip() == str(self.process.pid):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"slapd did not start: {self.log()[-800:]!r}")
            select.select([], [], [], 0.005)  # a bounded wait between checks of the pid file
        for port in filter(None, (self.port, self.tls_port)):  # bound by slapd: wait for listen()
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=READY_TIMEOUT).close()
                    break
                except OSError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"slapd not listening: {self.log()[-800:]!r}") from None
                    select.select([], [], [], 0.005)

    def log(self) -> bytes:
        """What slapd printed."""
        try:
            with open(os.path.join(self.workdir, "slapd.log"), "rb") as f:
                return f.read()
        except OSError:
            return b""

    def signal(self, number: int) -> None:
        """Send signal `number` (SIGSTOP/SIGCONT: a stalled directory) to slapd, by its PID.
        SIGSTOP returns once slapd has stopped: kill() only queues the signal, and until one of
        its threads takes it the others keep answering (on a loaded machine a request sent
        right after kill() was answered in 1 ms)."""
        assert self.process is not None
        pid = self.process.pid
        os.kill(pid, number)
        if number != signal.SIGSTOP:
            return
        deadline = time.monotonic() + 10
        # (WNOWAIT: the stop stays reportable; slapd is this process's child)
        while os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOWAIT | os.WNOHANG) is None:
            if time.monotonic() > deadline:
                raise RuntimeError("slapd did not stop within 10 s of SIGSTOP")
            select.select([], [], [], 0.001)  # a bounded wait between checks

    def stop(self) -> None:
        """Kill slapd by its PID and reap it."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            os.kill(process.pid, signal.SIGKILL)
        if process is not None:
            process.wait(timeout=READY_TIMEOUT)
        shutil.rmtree(self.workdir, ignore_errors=True)
