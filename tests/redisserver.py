"""A real `redis-server` for tests (plain, TLS, or a sentinel): started on a free loopback port,
stopped by its PID."""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time

from twisted.trial.unittest import SkipTest

from tests.harness import free_port

REDIS_SERVER = shutil.which("redis-server")
#: Longest wait for the server to say it is ready (a bound, not a sleep).
READY_TIMEOUT = 10.0


class RedisServer:
    """One `redis-server --port N --save '' --appendonly no` process on 127.0.0.1.

    `extra` arguments are appended (e.g. `--replicaof`); with `tls` (server cert, key and CA
    file paths) it listens with TLS only (`--tls-port N --port 0`), requiring a client
    certificate when `client_certificates` is true. `signal` sends a signal to it (SIGSTOP,
    SIGCONT, SIGKILL: tests of Redis outages)."""

    ready = b"Ready to accept connections"
    persistence: tuple[str, ...] = ("--save", "", "--appendonly", "no")

    def __init__(
        self,
        extra: tuple[str, ...] = (),
        tls: tuple[str, str, str] | None = None,
        client_certificates: bool = False,
        port: int | None = None,
    ) -> None:
        if REDIS_SERVER is None:
            raise SkipTest("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port() if port is None else port  # a given port: a restarted server
        self.port_given = port is not None
        self.workdir = tempfile.mkdtemp(prefix="flexgw-redis-")
        self.process: subprocess.Popen[bytes] | None = None
        self.log = b""  # what the server printed, as far as read
        self.extra = extra
        self.tls = tls
        self.client_certificates = client_certificates

    def command(self) -> list[str]:
        """The command line."""
        assert REDIS_SERVER is not None
        ports = ["--port", str(self.port)]
        if self.tls is not None:
            cert, key, ca = self.tls
            ports = [
                "--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", ca,
                "--tls-auth-clients", "yes" if self.client_certificates else "no",
            ]
        return [
            REDIS_SERVER,
            *ports,
            "--bind", "127.0.0.1",
            *self.persistence,
            "--dir", self.workdir,
            "--loglevel", "notice",
            *self.extra,
        ]

    def start(self) -> RedisServer:
        """Spawn the server and wait (bounded) until its log says it accepts connections. A
        port free_port() picked that another process (another session's suite) took before
        the server bound it: again on another port, up to five times (redis-server cannot be
        told to bind a port of its own choice and say which)."""
        for _ in range(5):
            self.log = b""
            self.process = subprocess.Popen(
                self.command(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            try:
                self.wait_for(self.ready)
            except BaseException:
                taken = b"Address already in use" in self.log and not self.port_given
                self.stop(keep_workdir=taken)
                if not taken:
                    raise
                self.port = free_port()
                continue
            return self
        raise RuntimeError(f"redis-server found no free port: {self.log[-500:]!r}")

    def wait_for(self, marker: bytes, timeout: float = READY_TIMEOUT) -> bytes:
        """Read the server's log until `marker` is in it (for at most `timeout` seconds); the log."""
        assert self.process is not None and self.process.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while marker not in self.log:
                if not selector.select(max(deadline - time.monotonic(), 0)):
                    raise RuntimeError(f"no {marker!r} from redis-server: {self.log[-500:]!r}")
                chunk = os.read(self.process.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"redis-server exited: {self.log[-500:]!r}")
                self.log += chunk
        finally:
            selector.close()
        return self.log

    def signal(self, number: int) -> None:
        """Send signal `number` to the server, by its PID."""
        assert self.process is not None
        os.kill(self.process.pid, number)

    def stop(self, keep_workdir: bool = False) -> None:
        """Kill the server by its PID and reap it (and remove its directory unless told)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        if process is not None:
            process.wait(timeout=READY_TIMEOUT)
            if process.stdout is not None:
                process.stdout.close()
        if not keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class RedisSentinelServer(RedisServer):
    """A `redis-server --sentinel` on 127.0.0.1 monitoring `master_name` at 127.0.0.1:master_port
    (quorum 1), with `requirepass` when a password is given. Ready once it monitors the master."""

    ready = b"+monitor master"
    persistence = ()

    def __init__(
        self, master_name: str, master_port: int, password: str | None = None,
        tls: tuple[str, str, str] | None = None,
    ) -> None:
        super().__init__(tls=tls)
        self.master_name = master_name
        self.master_port = master_port
        self.password = password

    def command(self) -> list[str]:
        """The config file (sentinel rewrites it, so it lives in the workdir) and --sentinel."""
        lines = [f"sentinel monitor {self.master_name} 127.0.0.1 {self.master_port} 1"]
        if self.password is not None:
            lines.append(f"requirepass {self.password}")
        path = os.path.join(self.workdir, "sentinel.conf")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
        command = super().command()
        return [command[0], path, "--sentinel", *command[1:]]
