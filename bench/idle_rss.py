"""Idle memory of the gateway on an example conf dir, as a ratio of a bare Twisted reactor.

Usage: python bench/idle_rss.py [--conf conf/sidecar] [--json out.json]

Starts `twistd flexgw` on a copy of the conf dir whose 127.0.0.1 ports are moved to free ones,
waits until it answers its readiness probe (the example must enable one), sends a few requests
through it (so pools and caches exist), waits for a quiet second, and reads VmRSS and VmHWM from
/proc. The reference is a Python process that imports Twisted and runs an empty reactor, started
in the same run, so the ratio is what flexgw adds over the smallest Twisted program.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import free_port  # bench/run.py

REPO = Path(__file__).resolve().parent.parent
BARE_REACTOR = (
    "import sys; from twisted.internet import reactor; "
    "reactor.callWhenRunning(lambda: (sys.stdout.write('up\\n'), sys.stdout.flush())); reactor.run()"
)


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {key: int(re.search(rf"^{key}:\s+(\d+) kB", status, re.MULTILINE).group(1))  # type: ignore[union-attr]
            for key in ("VmRSS", "VmHWM")}


def wait_http(port: int, path: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    """Poll until GET path answers (bounded); returns the status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the gateway exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            status = conn.getresponse().status
            conn.close()
            return status
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"no answer on port {port} within {timeout}s")


def copy_conf(source: Path, target: Path) -> dict[int, int]:
    """Copy the conf dir, moving every 127.0.0.1:PORT and `port: N` to a free port."""
    moved: dict[int, int] = {}

    def move(match: re.Match[str]) -> str:
        old = int(match.group(2))
        moved.setdefault(old, free_port())
        return f"{match.group(1)}{moved[old]}"

    target.mkdir()
    for path in sorted(source.iterdir()):
        text = path.read_text()
        text = re.sub(r"(127\.0\.0\.1:)(\d+)", move, text)
        text = re.sub(r"(port: )(\d+)", move, text)
        (target / path.name).write_text(text)
    return moved


def main(argv: list[str] | None = None) -> int:
    """Measure and print; exit 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conf", default=str(REPO / "conf" / "sidecar"))
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="flexgw-rss-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        moved = copy_conf(Path(args.conf), tmp / "conf")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        bare = subprocess.Popen([sys.executable, "-c", BARE_REACTOR], stdout=subprocess.PIPE)
        procs.append(bare)
        assert bare.stdout is not None
        bare.stdout.readline()
        upstream_port = next(new for old, new in moved.items() if old not in (8080, 3000, 3001))
        upstream = subprocess.Popen(
            [sys.executable, "-m", "flexgw.testing.upstream", "--listen",
             f"127.0.0.1:{upstream_port}", "--mode", "echo"], env=env)
        procs.append(upstream)
        gateway = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
             "--pidfile=", "flexgw", "--conf", str(tmp / "conf"), "--access-log", "/dev/null"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(gateway)
        probe_port = next(moved[p] for p in (3001, 3000) if p in moved)
        listen_port = moved[8080]
        wait_http(probe_port, "/probes/readiness", gateway)
        wait_http(upstream_port, "/", upstream)
        for _ in range(20):
            wait_http(listen_port, "/warm-up", gateway)
        time.sleep(1.0)  # let the process settle (a benchmark, not a test)
        flexgw, reference = rss_kib(gateway.pid), rss_kib(bare.pid)
        result = {
            "conf": args.conf,
            "flexgw_kib": flexgw,
            "bare_reactor_kib": reference,
            "rss_ratio_flexgw_over_bare": round(flexgw["VmRSS"] / reference["VmRSS"], 2),
        }
        print(f"idle RSS, {args.conf}: flexgw {flexgw['VmRSS'] / 1024:.1f} MiB "
              f"(peak {flexgw['VmHWM'] / 1024:.1f}), bare Twisted reactor "
              f"{reference['VmRSS'] / 1024:.1f} MiB: ratio {result['rss_ratio_flexgw_over_bare']}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
