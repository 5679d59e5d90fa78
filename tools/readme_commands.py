"""Run README.md's shell blocks as a reader would: each one verbatim, in order, in a fresh bash.

Every ```sh block of the README is preceded by a marker comment (invisible once rendered) that
says what to do with it:

    <!-- test: run [expect="TEXT" ...] -->   run it (bash -e -o pipefail): it must exit 0 and
                                               print every TEXT
    <!-- test: start HOST:PORT ... -->         a command that keeps running (`make run`, twistd):
                                               stop what earlier `start` blocks started, start it,
                                               and go on once every HOST:PORT accepts connections
    <!-- test: start-also HOST:PORT ... -->    the same, next to what is already running
    <!-- test: skip REASON -->                 not run (a synopsis, a real partner host, ...)

A ```sh block without a marker is an error, and so is a block in another fence whose lines run
`curl`, `flexgw`, `twistd`, `make` or `python` (write it as ```sh, with a marker). Blocks run with
the reader's PATH: `flexgw` and `twistd` are found only once a block has sourced
`.venv/bin/activate`, as the README tells the reader to.

The README's commands use fixed ports (8081, 8443, 3128, ...) and /tmp/flexgw-tls, so the run
happens in a private network namespace (its own loopback) with its own /tmp (`unshare --net
--mount`, plus `--map-root-user` when not root): other gateways on the machine are neither
disturbed nor in the way. `make install` runs first, outside it (the namespace has no network).
Where namespaces are not allowed, the blocks run on the machine's own loopback if none of the
ports the start markers list is in use, else not at all (exit status 77).

    python tools/readme_commands.py [README.md]      exit 0: every block ran as written
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(ROOT, ".venv", "bin")
ISOLATED = "FLEXGW_README_ISOLATED"
_MARKER = re.compile(r"<!--\s*test:\s*(.*?)\s*-->")
_FENCE = re.compile(r"```(\S*)\s*")
_COMMAND = re.compile(r"\s*(curl|flexgw|twistd|make|python3?|\.)(\s|$)")
RUN_TIMEOUT = 120.0  # one `run` block
START_TIMEOUT = 120.0  # a `start` block until its addresses accept connections
STOP_TIMEOUT = 30.0  # a started block after SIGTERM (an idle gateway exits at once)


@dataclass
class Block:
    """A fenced block of the README: where it starts, its language, text and marker."""

    line: int
    lang: str
    text: str
    marker: str | None
    action: str = ""
    args: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """`README.md:LINE` and the block's first line."""
        first = self.text.strip().splitlines()[0] if self.text.strip() else ""
        return f"line {self.line}: {first}"


def blocks(text: str) -> Iterator[Block]:
    """The fenced blocks of a Markdown text, each with the marker just above it (if any)."""
    lines = text.splitlines()
    pending: str | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        marker = _MARKER.fullmatch(line.strip())
        fence = _FENCE.fullmatch(line)
        if marker:
            pending = marker.group(1)
        elif fence:
            start, body = index, []
            index += 1
            while index < len(lines) and not lines[index].startswith("```"):
                body.append(lines[index])
                index += 1
            yield Block(start + 1, fence.group(1), "\n".join(body) + "\n", pending)
            pending = None
        elif line.strip():
            pending = None  # a marker belongs to the block right below it
        index += 1


def runs_commands(block: Block) -> bool:
    """True when a line of the block starts with one of the commands readers run."""
    return any(_COMMAND.match(line) for line in block.text.splitlines())


def check(found: list[Block]) -> list[str]:
    """Problems with the markers: sh blocks without one, commands outside sh blocks, bad ones."""
    problems = []
    for block in found:
        if block.lang != "sh":
            if runs_commands(block):
                problems.append(f"{block.describe()}: commands in a ```{block.lang} block"
                                " (write it as ```sh, with a test marker)")
            continue
        if block.marker is None:
            problems.append(f"{block.describe()}: ```sh block without a <!-- test: ... --> marker")
            continue
        words = shlex.split(block.marker)
        block.action, block.args = words[0], words[1:]
        if block.action not in ("run", "start", "start-also", "skip"):
            problems.append(f"{block.describe()}: unknown marker action {block.action!r}")
        elif block.action == "skip" and not block.args:
            problems.append(f"{block.describe()}: a skip marker says why")
        elif block.action.startswith("start") and not block.args:
            problems.append(f"{block.describe()}: a start marker lists the HOST:PORTs it opens")
        elif block.action == "run" and any(not a.startswith("expect=") for a in block.args):
            problems.append(f"{block.describe()}: run takes only expect=\"TEXT\"")
    return problems


class Reader:
    """The reader's terminals: blocks run one after another; started ones keep running."""

    def __init__(self) -> None:
        path = [p for p in os.environ.get("PATH", "").split(os.pathsep)
                if os.path.abspath(p) not in (VENV_BIN, os.path.dirname(sys.executable))]
        self.env = {k: v for k, v in os.environ.items() if k not in (ISOLATED, "VIRTUAL_ENV")}
        self.env["PATH"] = os.pathsep.join(path)
        self.running: list[tuple[Block, subprocess.Popen[bytes], str]] = []

    def _activated(self, block: Block) -> None:
        """A block that sourced .venv/bin/activate: later blocks find flexgw and twistd."""
        if ".venv/bin/activate" in block.text:
            self.env["VIRTUAL_ENV"] = os.path.join(ROOT, ".venv")
            self.env["PATH"] = VENV_BIN + os.pathsep + self.env["PATH"]

    def run(self, block: Block) -> str | None:
        """Run a block to its end; a failure's description, or None."""
        try:
            done = subprocess.run(
                ["bash", "-e", "-o", "pipefail", "-c", block.text], cwd=ROOT, env=self.env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            return f"did not finish within {RUN_TIMEOUT:g}s:\n{_text(exc.output)}"
        output = _text(done.stdout)
        if done.returncode != 0:
            return f"exit status {done.returncode}:\n{output}"
        for arg in block.args:
            expected = arg.removeprefix("expect=")
            if expected not in output:
                return f"the output lacks {expected!r}:\n{output}"
        self._activated(block)
        return None

    def start(self, block: Block) -> str | None:
        """Start a long-running block and wait until its addresses accept connections."""
        if block.action == "start":
            self.stop_all()
        handle, log = tempfile.mkstemp(prefix="readme-block-", suffix=".log")
        process = subprocess.Popen(
            ["bash", "-e", "-c", block.text], cwd=ROOT, env=self.env, stdout=handle,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        os.close(handle)
        self.running.append((block, process, log))
        waiting = [_address(arg) for arg in block.args]
        deadline = time.monotonic() + START_TIMEOUT
        while waiting:
            if _accepts(waiting[0]):
                waiting.pop(0)
                continue
            try:  # the wait between attempts ends early if the command exits
                status = process.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    return f"{waiting[0]} not open within {START_TIMEOUT:g}s:\n{_read(log)}"
                continue
            return f"exited ({status}) before {waiting[0]} accepted connections:\n{_read(log)}"
        self._activated(block)
        return None

    def stop_all(self) -> list[str]:
        """SIGTERM each started block's process group; the logs of those that were gone."""
        gone = []
        for block, process, log in self.running:
            if process.poll() is not None:
                gone.append(f"{block.describe()} had exited ({process.returncode}):\n{_read(log)}")
            else:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            os.unlink(log)
        self.running = []
        return gone

    def logs(self) -> str:
        """What the running blocks printed so far (for a failure report)."""
        return "".join(f"--- {b.describe()}\n{_read(log)}" for b, _, log in self.running)


def _text(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", "replace")[-6000:]


def _read(path: str) -> str:
    with open(path, "rb") as handle:
        return _text(handle.read())


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _accepts(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=1.0):
            return True
    except OSError:
        return False


def run_readme(path: str, out: TextIO = sys.stdout) -> int:
    """Check the markers, then run the blocks; 0 when every one did what its marker says."""
    with open(path, encoding="utf-8") as handle:
        found = list(blocks(handle.read()))
    problems = check(found)
    if problems:
        for problem in problems:
            print(f"{path}: {problem}", file=out)
        return 1
    reader = Reader()
    status = 0
    try:
        for block in found:
            if block.lang != "sh" or block.action == "skip":
                continue
            began = time.monotonic()
            failure = reader.run(block) if block.action == "run" else reader.start(block)
            verdict = "ok" if failure is None else "FAILED"
            took = time.monotonic() - began
            print(f"{path}:{block.describe()} [{block.action}] {verdict} ({took:.1f}s)", file=out)
            if failure is not None:
                print(failure, file=out)
                print(reader.logs(), file=out)
                status = 1
                break
    finally:
        for gone in reader.stop_all():
            if status == 0:
                print(f"{path}: a started block ended on its own: {gone}", file=out)
                status = 1
    return status


def _loopback_up() -> None:
    """Bring `lo` up in the new network namespace (it starts down)."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(sock, siocgifflags, request))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))


def _private_tmp(keep: set[str]) -> None:
    """Mount a fresh tmpfs on /tmp (in this private mount namespace), with each directory of
    `keep` that lived under the old /tmp (a checkout cloned there, as CI may) bound back at its
    own path: through a descriptor opened before the mount (a path through the old /tmp would
    lead into the new tmpfs, and `mount` must not resolve the descriptor link back to that path),
    so the run still sees the checkout."""
    kept: list[tuple[str, int]] = []
    for path in sorted(os.path.realpath(p) for p in keep):
        if path.startswith("/tmp/") and not any(path.startswith(k + "/") for k, _ in kept):
            kept.append((path, os.open(path, os.O_RDONLY | os.O_DIRECTORY)))
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", "/tmp"], check=True)
        for path, descriptor in kept:
            os.makedirs(path, exist_ok=True)
            subprocess.run(
                ["mount", "--no-canonicalize", "--bind", f"/proc/{os.getpid()}/fd/{descriptor}", path],
                check=True,
            )
    finally:
        for _, descriptor in kept:
            os.close(descriptor)


def unshare_command() -> list[str] | None:
    """The `unshare` prefix giving a private network and mount namespace, or None without one."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    command = [unshare, "--net", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    try:
        probe = subprocess.run([*command, "true"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return command if probe.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    """Install (outside), then run the README's blocks inside private namespaces."""
    args = sys.argv[1:] if argv is None else argv
    readme = os.path.abspath(args[0] if args else os.path.join(ROOT, "README.md"))
    if os.environ.get(ISOLATED) == "1":
        _loopback_up()
        _private_tmp({ROOT, os.path.dirname(readme), sys.prefix})
        return run_readme(readme)
    command = unshare_command()
    subprocess.run(["make", "--no-print-directory", "install"], cwd=ROOT, check=True)
    if command is None:
        # No namespaces (a container without the privilege): run on the machine's own
        # loopback, but only when nothing holds the README's ports (a CI machine, not a busy one).
        with open(readme, encoding="utf-8") as handle:
            found = list(blocks(handle.read()))
        check(found)
        busy = sorted({arg for b in found if b.action.startswith("start") for arg in b.args
                       if _accepts(_address(arg))})
        if busy:
            print("readme_commands: no private network namespace (`unshare --net --mount`) and"
                  f" {', '.join(busy)} in use: not run", file=sys.stderr)
            return 77
        print("readme_commands: no private network namespace; running on this machine's"
              " loopback and /tmp", file=sys.stderr)
        return run_readme(readme)
    env = dict(os.environ, **{ISOLATED: "1"})
    return subprocess.run(
        [*command, sys.executable, os.path.abspath(__file__), readme], env=env, check=False
    ).returncode


if __name__ == "__main__":
    raise SystemExit(main())
