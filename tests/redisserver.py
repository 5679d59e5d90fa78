"""A real `redis-server` for tests: started on a free loopback port, stopped by its PID."""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import tempfile

from twisted.trial.unittest import SkipTest

from tests.harness import free_port

REDIS_SERVER = shutil.which("redis-server")
#: Longest wait for the server to say it is ready (a bound, not a sleep).
READY_TIMEOUT = 10.0


class RedisServer:
    """One `redis-server --port N --save '' --appendonly no` process on 127.0.0.1."""

    def __init__(self) -> None:
        if REDIS_SERVER is None:
            raise SkipTest("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.workdir = tempfile.mkdtemp(prefix="flexgw-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        """Spawn the server and wait (bounded) until its log says it accepts connections."""
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self.workdir,
                "--loglevel", "notice",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.process.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        seen = b""
        try:
            while b"Ready to accept connections" not in seen:
                if not selector.select(READY_TIMEOUT):
                    raise RuntimeError(f"redis-server did not start: {seen[-500:]!r}")
                chunk = os.read(self.process.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"redis-server exited: {seen[-500:]!r}")
                seen += chunk
        except BaseException:
            self.stop()
            raise
        finally:
            selector.close()
        return self

    def stop(self) -> None:
        """Kill the server by its PID and reap it."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        if process is not None:
            process.wait(timeout=READY_TIMEOUT)
            if process.stdout is not None:
                process.stdout.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
