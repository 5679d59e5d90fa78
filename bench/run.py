"""Load benchmark: upstream direct vs through flexgw vs through nginx as a proxy, measured with wrk.

Usage: python bench/run.py [--duration 10] [--json out.json] [--gateway-cmd TEMPLATE] [--policies] [--tls]
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

DEFAULT_GATEWAY_CMD = "{twistd} -n --pidfile= flexgw --conf {conf} --access-log /dev/null"

NGINX_UPSTREAM_CONF = """\
worker_processes 1;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "hello\\n";
        }}
    }}
}}
"""

#: With --h2, the nginx upstream also answers HTTP/2 with prior knowledge (h2c) on this server,
#: for the h2c->h2c target (a gateway whose Service is h2c://).
NGINX_H2C_SERVER = """\
    server {{
        listen {host}:{port} http2 backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "hello\\n";
        }}
    }}
}}
"""

NGINX_PROXY_CONF = """\
worker_processes 1;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    upstream backend {{
        server {host}:{upstream_port};
        keepalive 64;
        keepalive_requests 10000000;
    }}
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
        }}
    }}
}}
"""

API_CONF = """\
apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata:
  name: bench
spec:
  address: http://{host}:{port}
"""
GATEWAY_CONF = API_CONF + """\
  services:
    upstream:
      address: http://{host}:{upstream_port}
"""
#: The bench API with an h2c:// Service (the h2c->h2c target).
H2C_GATEWAY_CONF = GATEWAY_CONF.replace(
    "address: http://{host}:{upstream_port}", "address: h2c://{host}:{upstream_port}"
)

#: --multi: the same upstream reached as a Service of three addresses (127.0.0.1-3, which all
#: reach the loopback upstream), balanced round robin: the cost of balancing, not of more work.
MULTI_HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
MULTI_CONF = API_CONF + """\
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: Service
metadata:
  name: upstream
spec:
  address: http://{host}:{upstream_port}
  addresses: [{addresses}]
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata:
  name: bench-route
spec:
  targetRef: {{kind: ApiInstance, name: bench}}
  policyRef: {{name: route}}
  config: {{destinationRef: {{name: upstream}}}}
"""


#: The --policies chain, bound to the `bench` API in order: (policyRef name, config as YAML lines).
BENCH_USER, BENCH_PASSWORD = "bench", "bench-secret"
POLICY_CHAIN: tuple[tuple[str, str], ...] = (
    ("http-basic-authentication-flex", f"username: {BENCH_USER}\npassword: {BENCH_PASSWORD}"),
    (
        "rate-limiting-flex",
        "rateLimits:\n  - maximumRequests: 1000000000\n    timePeriodInMilliseconds: 60000",
    ),
    ("header-injection-flex", "inboundHeaders:\n  - key: x-bench\n    value: injected"),
    (
        "message-logging-flex",
        (
            "loggingConfiguration:\n  - itemName: bench\n    itemData:\n"
            "      message: \"#[attributes.method ++ ' ' ++ attributes.requestPath]\"\n"
            "      level: INFO"
        ),
    ),
)


#: --tracing: the Configuration that exports every sampled exchange to the bench's OTLP/gRPC receiver.
TRACING_CONF = """\
---
apiVersion: gateway.mulesoft.com/v1beta1
kind: Configuration
metadata:
  name: bench-tracing
spec:
  tracing:
    provider:
      type: opentelemetry
      properties:
        address: h2://{host}:{otlp_port}
        serviceName: bench
    sampling:
      client: 100
      random: 100
      overall: {overall}
"""


def tls_conf(tmp: Path) -> tuple[str, Path]:
    """For --tls: a certificate for 127.0.0.1 (made with flexgw.testing.certs) and the extra
    documents that turn the `bench` API's port into a TLS port; returns (yaml, CA path)."""
    sys.path.insert(0, str(REPO))
    from flexgw.testing.certs import CertificateAuthority

    ca = CertificateAuthority("flexgw bench CA")
    crt, key = ca.issue(HOST, dns=["localhost"], ips=[HOST]).write(str(tmp / "tls"), "server")
    ca_path = Path(ca.write(str(tmp / "tls")))
    docs = (
        "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
        "metadata:\n  name: bench-tls\n"
        "spec:\n  targetRef:\n    kind: ApiInstance\n    name: bench\n"
        f"  policyRef:\n    name: tls\n  config:\n    certificate:\n"
        f"      crt: file://{crt}\n      key: file://{key}\n"
    )
    return docs, ca_path


def policy_bindings(available: set[str]) -> tuple[str, list[str], list[str]]:
    """PolicyBinding documents for the --policies chain: (yaml, kinds used, kinds missing)."""
    docs, used, missing = [], [], []
    for order, (kind, config) in enumerate(POLICY_CHAIN, start=1):
        if kind not in available:
            missing.append(kind)
            continue
        used.append(kind)
        indented = "".join(f"    {line}\n" for line in config.splitlines())
        docs.append(
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
            f"metadata:\n  name: bench-{order}\n"
            "spec:\n  targetRef:\n    kind: ApiInstance\n    name: bench\n"
            f"  policyRef:\n    name: {kind}\n  order: {order}\n  config:\n{indented}"
        )
    return "".join(docs), used, missing


def available_policy_kinds(env: dict[str, str]) -> set[str]:
    """The policy kinds the gateway under test has registered (asked in a child process)."""
    code = "from flexgw.policies import registry; print(' '.join(registry.names()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=60, check=False)
    if out.returncode != 0:
        raise BenchError(f"cannot list the policy kinds:\n{out.stderr}")
    return set(out.stdout.split())


def basic_auth_header() -> str:
    """The Authorization header value the --policies chain's basic auth accepts."""
    import base64

    return "Basic " + base64.b64encode(f"{BENCH_USER}:{BENCH_PASSWORD}".encode()).decode()


class BenchError(Exception):
    """A setup step failed (process died, port never opened, sanity request failed)."""


def free_port() -> int:
    """An unused loopback TCP port (bound to 0, then released)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Processes:
    """Starts child processes (each in its own process group) and terminates exactly those."""

    def __init__(self, tmp: Path, use_taskset: bool) -> None:
        """Logs go under ``tmp``; ``use_taskset`` pins processes to CPUs."""
        self.tmp = tmp
        self.use_taskset = use_taskset
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], cpu: int | None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` pinned to ``cpu`` (when taskset is available); output to a log file."""
        if cpu is not None and self.use_taskset:
            argv = ["taskset", "-c", str(cpu), *argv]
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        self.children.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 20) -> str:
        """The last lines of a child's log."""
        path = self.tmp / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
        """SIGTERM the child's own process group (pgid = its PID), then SIGKILL if it lingers."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        else:
            # the leader is gone; make sure nothing it started in its group survives (nginx workers)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        """Stop every child started, newest first."""
        while self.children:
            _, proc = self.children.pop()
            self.stop(proc)


def wait_port(port: int, proc: subprocess.Popen[bytes], procs: Processes, name: str, timeout: float = 20.0,
              host: str = HOST) -> None:
    """Poll until ``host:port`` accepts connections; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with {proc.returncode}:\n{procs.log_tail(name)}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"{name} did not listen on {host}:{port} within {timeout}s:\n{procs.log_tail(name)}")


def sanity_get(port: int, expect_body: bytes | None = b"hello\n", headers: dict[str, str] | None = None,
               ca: Path | None = None) -> None:
    """One GET through ``port`` (over TLS, verified against ``ca``, when given) must answer 200
    (and ``hello``) before it is measured."""
    if ca is not None:
        import ssl

        context = ssl.create_default_context(cafile=str(ca))
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(HOST, port, timeout=10, context=context)
    else:
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", "/", headers={"Host": f"{HOST}:{port}", **(headers or {})})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200 or (expect_body is not None and body != expect_body):
        raise BenchError(f"sanity GET on port {port}: {resp.status} {body[:200]!r}")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def wait_ready(admin_port: int, procs: Processes, name: str, timeout: float = 30.0) -> None:
    """Poll the admin listener's /probes/readiness until 200 (every worker serves), bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(HOST, admin_port, timeout=2)
            conn.request("GET", "/probes/readiness")
            if conn.getresponse().status == 200:
                conn.close()
                return
            conn.close()
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"{name}: not ready after {timeout:g}s\n{procs.log_tail(name)}")


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", value.strip())
    if not m:
        raise ValueError(value)
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests/s, latency percentiles (ms) and error counts from ``wrk --latency`` output."""
    result: dict[str, Any] = {"non_2xx": 0, "socket_errors": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not m:
        raise BenchError(f"unparsable wrk output:\n{output}")
    result["rps"] = float(m.group(1))
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", output, re.MULTILINE)
        if m:
            result[f"p{pct}_ms"] = _ms(m.group(1))
    m = re.search(r"(\d+) requests in", output)
    result["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if m:
        result["non_2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if m:
        result["socket_errors"] = sum(int(x) for x in m.groups())
    return result


def session_cpu_seconds(session: int) -> float:
    """User + system CPU seconds used so far by the live processes of session `session` (a
    started gateway and, with --workers, its workers), from /proc/<pid>/stat."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                stat = handle.read()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[3]) == session:  # state ppid pgrp session ... utime(11) stime(12)
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def run_wrk(port: int, connections: int, duration: float, cpu: int | None, use_taskset: bool,
            headers: dict[str, str] | None = None, scheme: str = "http") -> dict[str, Any]:
    """Run wrk (1 thread) against ``port`` (with extra request ``headers``) and parse it."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", f"{scheme}://{HOST}:{port}/"]
    for name, value in (headers or {}).items():
        argv[1:1] = ["-H", f"{name}: {value}"]
    if cpu is not None and use_taskset:
        argv = ["taskset", "-c", str(cpu), *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    if out.returncode != 0:
        raise BenchError(f"wrk failed ({out.returncode}): {out.stderr}")
    return parse_wrk(out.stdout)


def parse_h2load(output: str) -> dict[str, Any]:
    """Requests/s, mean request time (ms) and failures from h2load output."""
    finished = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", output)
    requests = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", output)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output)
    if finished is None or requests is None or codes is None:
        raise BenchError(f"unparsable h2load output:\n{output}")
    result: dict[str, Any] = {
        "rps": float(finished.group(1)),
        "requests": int(requests.group(2)),
        "failed": int(requests.group(4)),
        "non_2xx": sum(int(codes.group(i)) for i in (2, 3, 4)),
    }
    timing = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", output)
    if timing is not None:
        result["mean_ms"] = _ms(timing.group(3))
    return result


def run_h2load(port: int, connections: int, streams: int, duration: float, cpu: int | None,
               use_taskset: bool) -> dict[str, Any]:
    """Run h2load (1 thread, HTTP/2 with prior knowledge) against ``port`` and parse it."""
    argv = ["h2load", "-t1", f"-c{connections}", f"-m{streams}", f"-D{max(1, round(duration))}",
            f"http://{HOST}:{port}/"]
    if use_taskset and cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    if out.returncode != 0:
        raise BenchError(f"h2load failed ({out.returncode}): {out.stderr}{out.stdout}")
    return parse_h2load(out.stdout)


def median_result(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each numeric field across repeats (errors summed)."""
    merged: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs if key in r]
        if key in ("non_2xx", "socket_errors", "requests"):
            merged[key] = sum(values)
        else:
            merged[key] = statistics.median(values)
    merged["runs"] = runs
    return merged


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (and SIGINT) into KeyboardInterrupt so children are cleaned up either way."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, handler)
    # a background job may inherit SIGINT ignored; Ctrl-C must always clean up
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)


def default_twistd() -> str:
    """``twistd`` next to the running interpreter (the venv), else on PATH."""
    candidate = Path(sys.executable).parent / "twistd"
    if candidate.exists():
        return str(candidate)
    return shutil.which("twistd") or "twistd"


def write_nginx(tmp: Path, name: str, template: str, **values: Any) -> Path:
    """Write an nginx prefix dir with its config; return the config path."""
    prefix = tmp / name
    prefix.mkdir(parents=True, exist_ok=True)
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / sub).mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(template.format(tmp=prefix, host=HOST, **values))
    return conf


def nginx_argv(conf: Path) -> list[str]:
    """Run an nginx instance in the foreground with its own prefix and config."""
    return ["nginx", "-p", str(conf.parent), "-c", str(conf), "-g", "daemon off;"]


def cpu_busy(interval: float = 1.0) -> dict[str, float]:
    """Per-CPU busy percentage over ``interval`` from /proc/stat (empty where unavailable)."""

    def sample() -> dict[str, tuple[int, int]]:
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0].startswith("cpu") and parts[0] != "cpu":
                    values = [int(x) for x in parts[1:]]
                    out[parts[0]] = (sum(values), values[3] + (values[4] if len(values) > 4 else 0))
        return out

    try:
        before = sample()
        time.sleep(interval)
        after = sample()
    except OSError:
        return {}
    busy = {}
    for cpu, (total, idle) in after.items():
        t0, i0 = before.get(cpu, (total, idle))
        dt = total - t0
        busy[cpu] = 100.0 * (dt - (idle - i0)) / dt if dt else 0.0
    return busy


def fmt(value: float | None, spec: str) -> str:
    """Format or dash."""
    return "-" if value is None else format(value, spec)


def start_gateway(
    args: argparse.Namespace, procs: Processes, tmp: Path, name: str, conf_name: str,
    extra_conf: str, upstream_port: int, cpu: int | None, env: dict[str, str],
    extra_args: str = "", base: str = GATEWAY_CONF,
) -> tuple[int, str]:
    """Write a gateway conf dir (`base`, GATEWAY_CONF by default, + `extra_conf`), start the
    gateway command on a free port and wait for it; returns (port, the command line)."""
    port = free_port()
    conf_dir = tmp / conf_name
    conf_dir.mkdir()
    addresses = ", ".join(f"'{h}:{upstream_port}'" for h in MULTI_HOSTS)
    (conf_dir / "bench.yaml").write_text(
        base.format(host=HOST, port=port, upstream_port=upstream_port, addresses=addresses)
        + extra_conf
    )
    nginx_conf = write_nginx(tmp, f"{name}-nginx", NGINX_PROXY_CONF, port=port, upstream_port=upstream_port)
    cmd = args.gateway_cmd.format(
        twistd=shlex.quote(args.twistd),
        python=shlex.quote(sys.executable),
        conf=shlex.quote(str(conf_dir)),
        port=port,
        upstream_port=upstream_port,
        tmp=shlex.quote(str(tmp)),
        nginx_gateway_conf=shlex.quote(str(nginx_conf)),
    )
    if extra_args:
        cmd += " " + extra_args
    proc = procs.start(name, shlex.split(cmd), cpu, env)
    wait_port(port, proc, procs, name)
    return port, cmd


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default %(default)s)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per target (0 to skip)")
    parser.add_argument("--connections", type=int, default=50, help="connections for the throughput run")
    parser.add_argument("--repeat", type=int, default=1, help="repeat each run and report the median")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--upstream", choices=("auto", "nginx", "builtin"), default="auto",
                        help="fast upstream: nginx if installed (auto), or flexgw.testing.upstream hello")
    parser.add_argument("--no-nginx-proxy", action="store_true", help="skip the nginx reverse-proxy target")
    parser.add_argument("--no-gateway", action="store_true", help="skip the flexgw target")
    parser.add_argument("--twistd", default=default_twistd(), help="twistd executable (default: the venv's)")
    parser.add_argument(
        "--gateway-cmd",
        default=DEFAULT_GATEWAY_CMD,
        help="gateway command template; placeholders {twistd} {python} {conf} {port} {upstream_port} "
        "{tmp} {nginx_gateway_conf} (an nginx proxy config listening on {port}, for a stand-in run)",
    )
    parser.add_argument("--gateway-cpu", type=int, default=0, help="CPU for the proxies (default 0)")
    parser.add_argument("--load-cpu", type=int, default=1, help="CPU for wrk and the upstream (default 1)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    parser.add_argument("--h2", action="store_true",
                        help="also measure flexgw over HTTP/2 (h2c, h2load -c N -m 1 and -m 10) as a ratio "
                        "of its HTTP/1.1 figure (needs h2load: apt-get install -y nghttp2-client)")
    parser.add_argument("--policies", action="store_true",
                        help="also measure flexgw with a 4-policy chain (basic auth, rate limit, header "
                        "injection, message logging; the kinds that exist) as a ratio of plain flexgw")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="also measure flexgw --workers N (not pinned to a CPU) as a ratio of the "
                        "one-process flexgw of the same run")
    parser.add_argument("--tracing", action="store_true",
                        help="also measure flexgw with OpenTelemetry tracing to an OTLP/gRPC receiver, at "
                        "100%% and at 0%% sampling, as ratios of flexgw without tracing in the same run")
    parser.add_argument("--tracing-rounds", type=int, default=7, metavar="N",
                        help="with --tracing: also N interleaved rounds of plain / 100%% / 0%% runs whose "
                        "per-round ratios give the reported median (default %(default)s; 0: off)")
    parser.add_argument("--tracing-duration", type=float, default=5.0, metavar="S",
                        help="seconds per run in those rounds (default %(default)s)")
    parser.add_argument("--multi", action="store_true",
                        help="also a Service of three addresses (127.0.0.1-3, one upstream listening "
                             "on all), balanced round robin; reported as a ratio of flexgw's req/s")
    parser.add_argument("--tls", action="store_true",
                        help="also measure flexgw terminating TLS (a `tls` binding, wrk over https, "
                        "keep-alive connections) as a ratio of plain-HTTP flexgw in the same run")
    args = parser.parse_args(argv)

    if not shutil.which("wrk"):
        print("wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    if args.h2 and not shutil.which("h2load"):
        print("h2load is not installed (apt-get install -y nghttp2-client)", file=sys.stderr)
        return 2
    have_nginx = shutil.which("nginx") is not None
    if args.upstream == "nginx" and not have_nginx:
        print("nginx is not installed", file=sys.stderr)
        return 2
    use_taskset = shutil.which("taskset") is not None and (os.cpu_count() or 1) > max(args.gateway_cpu, args.load_cpu)
    gw_cpu, load_cpu = args.gateway_cpu, args.load_cpu

    tmp = Path(tempfile.mkdtemp(prefix="flexgw-bench-"))
    procs = Processes(tmp, use_taskset)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    results: dict[str, dict[str, Any]] = {}
    h2_results: dict[str, dict[str, Any]] = {}
    info: dict[str, Any] = {
        "duration_s": args.duration,
        "connections": args.connections,
        "repeat": args.repeat,
        "taskset": use_taskset,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "tmp": str(tmp),
    }
    status = 0
    try:
        with sigterm_as_interrupt():
            # others' load on the machine skews everything: measure it before starting
            info["cpu_busy_before_pct"] = busy = cpu_busy()
            if any(v > 15 for v in busy.values()):
                print(
                    "WARNING: the machine is not idle before the run ("
                    + ", ".join(f"{k} {v:.0f}%" for k, v in sorted(busy.items()))
                    + " busy); absolute figures will be low",
                    file=sys.stderr,
                )
            # upstream
            upstream_port = free_port()
            use_nginx_upstream = args.upstream == "nginx" or (args.upstream == "auto" and have_nginx)
            h2c_upstream_port = 0
            if use_nginx_upstream:
                template = NGINX_UPSTREAM_CONF
                if args.h2:
                    # one more server block in the same nginx: h2c on its own port
                    h2c_upstream_port = free_port()
                    template = template.rstrip()[:-2] + NGINX_H2C_SERVER.replace(
                        "{port}", str(h2c_upstream_port)
                    ).replace("{host}", HOST)
                if args.multi:  # the same server on every --multi address
                    listen = "        listen {host}:{port} backlog=4096;\n"
                    template = template.replace(listen, listen + "".join(
                        listen.replace("{host}", h) for h in MULTI_HOSTS[1:]
                    ))
                conf = write_nginx(tmp, "upstream-nginx", template, port=upstream_port)
                proc = procs.start("upstream", nginx_argv(conf), load_cpu)
                info["upstream"] = "nginx"
            else:
                for n, extra_host in enumerate(MULTI_HOSTS[1:] if args.multi else ()):
                    extra = procs.start(
                        f"upstream-{n + 2}",
                        [sys.executable, "-m", "flexgw.testing.upstream", "--listen",
                         f"{extra_host}:{upstream_port}", "--mode", "hello"],
                        load_cpu,
                        env,
                    )
                    wait_port(upstream_port, extra, procs, f"upstream-{n + 2}", host=extra_host)
                proc = procs.start(
                    "upstream",
                    [sys.executable, "-m", "flexgw.testing.upstream", "--listen", f"{HOST}:{upstream_port}", "--mode", "hello"],
                    load_cpu,
                    env,
                )
                info["upstream"] = "flexgw.testing.upstream (hello)"
            wait_port(upstream_port, proc, procs, "upstream")
            sanity_get(upstream_port)

            targets: list[tuple[str, int]] = [("direct", upstream_port)]
            target_headers: dict[str, dict[str, str]] = {}
            target_scheme: dict[str, str] = {}

            if not args.no_gateway:
                gw_port, cmd = start_gateway(
                    args, procs, tmp, "gateway", "conf", "", upstream_port, gw_cpu, env
                )
                info["gateway_cmd"] = cmd
                sanity_get(gw_port)
                targets.append(("flexgw", gw_port))

                if args.policies:
                    # the same gateway config plus the policy chain, on its own port
                    bindings, used, missing = policy_bindings(available_policy_kinds(env))
                    info["policies"], info["policies_missing"] = used, missing
                    pol_port, pol_cmd = start_gateway(
                        args, procs, tmp, "gateway-policies", "conf-policies", bindings, upstream_port,
                        gw_cpu, env,
                    )
                    info["gateway_policies_cmd"] = pol_cmd
                    auth = {"Authorization": basic_auth_header()}
                    sanity_get(pol_port, headers=auth)
                    targets.append(("flexgw+pol", pol_port))
                    target_headers["flexgw+pol"] = auth
                    if missing:
                        print(f"  --policies: kinds not available, skipped: {', '.join(missing)}",
                              file=sys.stderr)

                if args.workers > 1:
                    # the same conf, N worker processes, on every CPU (wrk and the upstream share them)
                    admin_port = free_port()
                    wk_port, wk_cmd = start_gateway(
                        args, procs, tmp, "gateway-workers", "conf-workers", "", upstream_port, None,
                        env, extra_args=f"--workers {args.workers} --admin tcp:{admin_port}:interface={HOST}",
                    )
                    wait_ready(admin_port, procs, "gateway-workers")
                    info["gateway_workers_cmd"] = wk_cmd
                    info["workers"] = args.workers
                    sanity_get(wk_port)
                    targets.append((f"flexgw-w{args.workers}", wk_port))
                if args.h2 and h2c_upstream_port:
                    # the same API whose Service is h2c:// (nginx speaking HTTP/2): h2c->h2c
                    h2c_port, h2c_cmd = start_gateway(
                        args, procs, tmp, "gateway-h2c", "conf-h2c", "", h2c_upstream_port, gw_cpu,
                        env, base=H2C_GATEWAY_CONF,
                    )
                    info["gateway_h2c_cmd"] = h2c_cmd
                    sanity_get(h2c_port)
                if args.multi:
                    multi_port, multi_cmd = start_gateway(
                        args, procs, tmp, "gateway-multi", "conf-multi", "", upstream_port, gw_cpu,
                        env, base=MULTI_CONF,
                    )
                    info["gateway_multi_cmd"] = multi_cmd
                    sanity_get(multi_port)
                    targets.append(("flexgw-3addr", multi_port))
                if args.tls:
                    # the same gateway config on a TLS port (plain HTTP to the upstream)
                    docs, ca_path = tls_conf(tmp)
                    tls_port, tls_cmd = start_gateway(
                        args, procs, tmp, "gateway-tls", "conf-tls", docs, upstream_port, gw_cpu, env
                    )
                    info["gateway_tls_cmd"] = tls_cmd
                    sanity_get(tls_port, ca=ca_path)
                    targets.append(("flexgw-tls", tls_port))
                    target_scheme["flexgw-tls"] = "https"

                if args.tracing:
                    # a grpcio OTLP receiver beside the upstream, and the same conf with tracing on
                    otlp_port = free_port()
                    proc = procs.start(
                        "otlp", [sys.executable, "-m", "flexgw.testing.otlp", "--listen", f"{HOST}:{otlp_port}"],
                        load_cpu, env,
                    )
                    wait_port(otlp_port, proc, procs, "otlp")
                    for name, overall in (("flexgw-tr100", 100), ("flexgw-tr0", 0)):
                        tr_port, tr_cmd = start_gateway(
                            args, procs, tmp, f"gateway-{name}", f"conf-{name}",
                            TRACING_CONF.format(host=HOST, otlp_port=otlp_port, overall=overall),
                            upstream_port, gw_cpu, env,
                        )
                        info[f"gateway_{name}_cmd"] = tr_cmd
                        sanity_get(tr_port)
                        targets.append((name, tr_port))

            if have_nginx and not args.no_nginx_proxy:
                proxy_port = free_port()
                conf = write_nginx(tmp, "proxy-nginx", NGINX_PROXY_CONF, port=proxy_port, upstream_port=upstream_port)
                proc = procs.start("nginx-proxy", nginx_argv(conf), gw_cpu)
                wait_port(proxy_port, proc, procs, "nginx-proxy")
                sanity_get(proxy_port)
                targets.append(("nginx-proxy", proxy_port))

            sessions = {
                "flexgw": dict(procs.children).get("gateway"),
                "flexgw+pol": dict(procs.children).get("gateway-policies"),
                "flexgw-tls": dict(procs.children).get("gateway-tls"),
                "flexgw-tr100": dict(procs.children).get("gateway-flexgw-tr100"),
                "flexgw-tr0": dict(procs.children).get("gateway-flexgw-tr0"),
                "flexgw-3addr": dict(procs.children).get("gateway-multi"),
                f"flexgw-w{args.workers}": dict(procs.children).get("gateway-workers"),
            }
            for name, port in targets:
                extra = target_headers.get(name)
                scheme = target_scheme.get(name, "http")
                if args.warmup > 0:
                    run_wrk(port, args.connections, args.warmup, load_cpu, use_taskset, extra, scheme)
                session = sessions.get(name)
                cpu_before = session_cpu_seconds(session.pid) if session is not None else 0.0
                wall_before = time.monotonic()
                many = [run_wrk(port, args.connections, args.duration, load_cpu, use_taskset, extra, scheme)
                        for _ in range(args.repeat)]
                if session is not None:
                    # gateway CPU per request: comparable across targets whatever else loads the CPUs
                    cpu_used = session_cpu_seconds(session.pid) - cpu_before
                    wall = time.monotonic() - wall_before
                    served = sum(run.get("requests") or run["rps"] * args.duration for run in many)
                    many_cpu = {"cpu_s": cpu_used, "cpu_share": cpu_used / wall if wall else None,
                                "cpu_us_per_req": cpu_used / served * 1e6 if served else None}
                one = [run_wrk(port, 1, args.duration, load_cpu, use_taskset, extra, scheme)
                       for _ in range(args.repeat)]
                results[name] = {"c50": median_result(many), "c1": median_result(one)}
                if session is not None:
                    results[name]["c50"].update(many_cpu)
                print(
                    f"  {name}: {results[name]['c50']['rps']:.0f} req/s, "
                    f"p50@1 {results[name]['c1'].get('p50_ms', 0):.3f} ms",
                    file=sys.stderr,
                    flush=True,
                )
                if args.h2 and name == "flexgw":
                    # the same gateway over h2c, right after its HTTP/1.1 runs; then h2c->h2c
                    h2_targets = [("", port, session)]
                    h2c_gateway = dict(procs.children).get("gateway-h2c")
                    if h2c_gateway is not None:
                        h2_targets.append(("h2c_", h2c_port, h2c_gateway))
                    for prefix, h2_port, h2_session in h2_targets:
                        if args.warmup > 0:
                            run_h2load(h2_port, args.connections, 1, args.warmup, load_cpu, use_taskset)
                        for streams in (1, 10):
                            before = session_cpu_seconds(h2_session.pid) if h2_session else 0.0
                            runs = [run_h2load(h2_port, args.connections, streams, args.duration, load_cpu,
                                               use_taskset) for _ in range(args.repeat)]
                            used = session_cpu_seconds(h2_session.pid) - before if h2_session else 0.0
                            served = sum(r["requests"] for r in runs)
                            runs.sort(key=lambda r: r["rps"])
                            key = f"{prefix}m{streams}"
                            h2_results[key] = dict(runs[len(runs) // 2])
                            h2_results[key]["cpu_us_per_req"] = used / served * 1e6 if served else None
                            path = "h2c->h2c" if prefix else "h2c->h1"
                            print(f"  flexgw {path} (-m{streams}): "
                                  f"{h2_results[key]['rps']:.0f} req/s", file=sys.stderr, flush=True)
            if args.tracing and args.tracing_rounds > 0:
                # Interleaved rounds: plain, 100% and 0% one after the other, round after round,
                # so that the machine's other load drifts over the three alike; the ratios are
                # taken per round and their median reported.
                trio = [(n, p) for n, p in targets if n in ("flexgw", "flexgw-tr100", "flexgw-tr0")]
                rounds: list[dict[str, tuple[float, float | None]]] = []
                for number in range(args.tracing_rounds):
                    row: dict[str, tuple[float, float | None]] = {}
                    for name, port in trio:
                        session = sessions.get(name)
                        before = session_cpu_seconds(session.pid) if session is not None else 0.0
                        run = run_wrk(port, args.connections, args.tracing_duration, load_cpu, use_taskset)
                        served = run.get("requests") or run["rps"] * args.tracing_duration
                        used = session_cpu_seconds(session.pid) - before if session is not None else 0.0
                        row[name] = (run["rps"], used / served * 1e6 if served and used else None)
                    rounds.append(row)
                    print(f"  tracing round {number + 1}: "
                          + ", ".join(f"{n} {r[0]:.0f} req/s" for n, r in row.items()), file=sys.stderr, flush=True)
                info["tracing_rounds"] = rounds
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        status = 130
    except BenchError as exc:
        print(f"benchmark setup failed: {exc}", file=sys.stderr)
        status = 1
    finally:
        procs.stop_all()
        if not args.keep_tmp and status == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        elif status != 0 or args.keep_tmp:
            print(f"configs and logs kept in {tmp}", file=sys.stderr)

    if not results:
        return status or 1
    summary = summarise(results, args.connections)
    summary.update(tracing_round_ratios(info.get("tracing_rounds") or []))
    if h2_results and "flexgw" in results:
        h1_rps = results["flexgw"]["c50"]["rps"]
        h1_cpu = results["flexgw"]["c50"].get("cpu_us_per_req")
        for key, r in h2_results.items():
            summary[f"h2_{key}_rps"] = r["rps"]
            summary[f"rps_ratio_h2_{key}_over_h1"] = r["rps"] / h1_rps if h1_rps else None
            if r.get("cpu_us_per_req") and h1_cpu:
                summary[f"h2_{key}_cpu_us_per_req"] = r["cpu_us_per_req"]
                summary[f"cpu_ratio_h1_over_h2_{key}"] = h1_cpu / r["cpu_us_per_req"]
        summary["errors"]["flexgw-h2"] = sum(r["failed"] + r["non_2xx"] for r in h2_results.values())
    print_table(results, summary, info, args.connections)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"info": info, "results": results, "h2": h2_results, "summary": summary}, indent=2
        ))
    return status


def tracing_round_ratios(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """From interleaved rounds of {target: (req/s, CPU µs per request)}: per tracing mode the
    median, lowest and highest per-round req/s ratio to plain flexgw, and the median CPU ratio
    (plain / traced), under `rounds_<key>_...` keys."""
    out: dict[str, Any] = {}
    for name, key in (("flexgw-tr100", "tracing100"), ("flexgw-tr0", "tracing0")):
        rps = sorted(r[name][0] / r["flexgw"][0] for r in rounds
                     if name in r and "flexgw" in r and r["flexgw"][0])
        cpu = sorted(r["flexgw"][1] / r[name][1] for r in rounds
                     if name in r and "flexgw" in r and r[name][1] and r["flexgw"][1])
        if rps:
            out[f"rounds_{key}"] = len(rps)
            out[f"rounds_rps_ratio_{key}"] = statistics.median(rps)
            out[f"rounds_rps_ratio_{key}_range"] = (rps[0], rps[-1])
        if cpu:
            out[f"rounds_cpu_ratio_{key}"] = statistics.median(cpu)
    return out


def summarise(results: dict[str, dict[str, Any]], connections: int) -> dict[str, Any]:
    """Ratios measured in this run: flexgw/nginx req/s, and added p50 latency at 1 connection."""
    summary: dict[str, Any] = {}
    direct = results.get("direct")
    for name in ("flexgw", "nginx-proxy"):
        if direct and name in results and "p50_ms" in results[name]["c1"] and "p50_ms" in direct["c1"]:
            summary[f"{name}_added_p50_ms"] = results[name]["c1"]["p50_ms"] - direct["c1"]["p50_ms"]
    if "flexgw" in results and "flexgw-tls" in results:
        summary["rps_ratio_tls_over_flexgw"] = results["flexgw-tls"]["c50"]["rps"] / results["flexgw"]["c50"]["rps"]
    if "flexgw" in results and "flexgw-3addr" in results:
        summary["rps_ratio_multi_over_flexgw"] = results["flexgw-3addr"]["c50"]["rps"] / results["flexgw"]["c50"]["rps"]
    if "flexgw" in results and "flexgw+pol" in results:
        summary["rps_ratio_policies_over_flexgw"] = results["flexgw+pol"]["c50"]["rps"] / results["flexgw"]["c50"]["rps"]
    if "flexgw+pol" in results and "nginx-proxy" in results:
        summary["rps_ratio_policies_over_nginx"] = (
            results["flexgw+pol"]["c50"]["rps"] / results["nginx-proxy"]["c50"]["rps"]
        )
    # The same costs as gateway CPU time per request (plain / other): the process's own CPU
    # seconds, so less sensitive than req/s to other tenants' load between the runs.
    for name, key in (("flexgw-tr100", "tracing100"), ("flexgw-tr0", "tracing0")):
        if "flexgw" in results and name in results:
            summary[f"rps_ratio_{key}_over_flexgw"] = results[name]["c50"]["rps"] / results["flexgw"]["c50"]["rps"]
    for name, key in (("flexgw+pol", "policies"), ("flexgw-tls", "tls"), ("flexgw-3addr", "multi"),
                      ("flexgw-tr100", "tracing100"), ("flexgw-tr0", "tracing0")):
        plain = results.get("flexgw", {}).get("c50", {}).get("cpu_us_per_req")
        other = results.get(name, {}).get("c50", {}).get("cpu_us_per_req")
        if plain and other:
            summary[f"cpu_ratio_{key}_over_flexgw"] = plain / other
    for name in results:
        if name.startswith("flexgw-w") and "flexgw" in results:
            summary["rps_ratio_workers_over_flexgw"] = results[name]["c50"]["rps"] / results["flexgw"]["c50"]["rps"]
    if "flexgw" in results and "nginx-proxy" in results:
        summary["rps_ratio_flexgw_over_nginx"] = results["flexgw"]["c50"]["rps"] / results["nginx-proxy"]["c50"]["rps"]
        ng = summary.get("nginx-proxy_added_p50_ms")
        fg = summary.get("flexgw_added_p50_ms")
        if ng is not None and fg is not None and ng > 0:
            summary["added_p50_ratio_flexgw_over_nginx"] = fg / ng
    errors = {
        name: r["c50"]["non_2xx"] + r["c50"]["socket_errors"] + r["c1"]["non_2xx"] + r["c1"]["socket_errors"]
        for name, r in results.items()
    }
    summary["errors"] = errors
    return summary


def print_table(results: dict[str, dict[str, Any]], summary: dict[str, Any], info: dict[str, Any], connections: int) -> None:
    """Print the results table and the ratios."""
    print()
    print(f"upstream: {info.get('upstream')}; {info['duration_s']:g}s per run x{info['repeat']}; "
          f"taskset: {'yes (proxy CPU0, wrk+upstream CPU1)' if info['taskset'] else 'no'}; "
          f"{info['implementation']} {info['python']}")
    header = f"{'target':<12} {'req/s@' + str(connections):>11} {'p50@' + str(connections):>9} {'p99@' + str(connections):>9} " \
             f"{'req/s@1':>9} {'p50@1':>8} {'p99@1':>8} {'errors':>7}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        many, one = r["c50"], r["c1"]
        print(
            f"{name:<12} {many['rps']:>11.0f} {fmt(many.get('p50_ms'), '.3f'):>9} {fmt(many.get('p99_ms'), '.3f'):>9} "
            f"{one['rps']:>9.0f} {fmt(one.get('p50_ms'), '.3f'):>8} {fmt(one.get('p99_ms'), '.3f'):>8} "
            f"{summary['errors'][name]:>7}"
        )
    print("(latencies in ms)")
    for name in ("flexgw", "nginx-proxy"):
        key = f"{name}_added_p50_ms"
        if key in summary:
            print(f"{name} added p50 at 1 connection: {summary[key]:.3f} ms")
    if "rps_ratio_flexgw_over_nginx" in summary:
        ratio = summary["rps_ratio_flexgw_over_nginx"]
        print(f"flexgw / nginx req/s at {connections} connections: {ratio:.3f}  (target >= 0.35)")
    if "added_p50_ratio_flexgw_over_nginx" in summary:
        ratio = summary["added_p50_ratio_flexgw_over_nginx"]
        print(f"flexgw / nginx added p50 at 1 connection: {ratio:.2f}  (target <= 1.5)")
    if "rps_ratio_policies_over_flexgw" in summary:
        ratio = summary["rps_ratio_policies_over_flexgw"]
        used = ", ".join(info.get("policies", []))
        print(f"flexgw with policies ({used}) / flexgw req/s at {connections} connections: "
              f"{ratio:.3f}  (target >= 0.7)")
        if "cpu_ratio_policies_over_flexgw" in summary:
            print(f"  as gateway CPU per request (flexgw / with policies): "
                  f"{summary['cpu_ratio_policies_over_flexgw']:.3f}")
        if "rps_ratio_policies_over_nginx" in summary:
            print(f"flexgw with policies / nginx req/s at {connections} connections: "
                  f"{summary['rps_ratio_policies_over_nginx']:.3f}  (target >= 0.25)")
        if info.get("policies_missing"):
            print("NOTE: policy kinds not available, left out: " + ", ".join(info["policies_missing"]))
    h1_cpu = results.get("flexgw", {}).get("c50", {}).get("cpu_us_per_req")
    for key in ("m1", "m10", "h2c_m1", "h2c_m10"):
        ratio = summary.get(f"rps_ratio_h2_{key}_over_h1")
        if ratio is not None:
            streams = key.rsplit("m", 1)[1]
            path = "h2c->h2c" if key.startswith("h2c_") else "h2c->h1"
            target = "0.6" if key.startswith("h2c_") else "0.7"
            print(f"flexgw {path} ({connections} connections, {streams} stream(s) each) / flexgw HTTP/1.1 "
                  f"req/s: {summary[f'h2_{key}_rps']:.0f} / {results['flexgw']['c50']['rps']:.0f} = {ratio:.3f}"
                  f"  (target >= {target} at -m10)")
            cpu = summary.get(f"h2_{key}_cpu_us_per_req")
            if cpu and h1_cpu:
                print(f"  gateway CPU per request: {cpu:.0f} µs (HTTP/1.1: {h1_cpu:.0f} µs; "
                      f"HTTP/1.1 / h2 = {summary[f'cpu_ratio_h1_over_h2_{key}']:.3f})")
    if "rps_ratio_workers_over_flexgw" in summary:
        ratio = summary["rps_ratio_workers_over_flexgw"]
        print(f"flexgw --workers {info.get('workers')} / flexgw (one process) req/s at {connections} "
              f"connections: {ratio:.3f}  (target >= 1.8; the workers share the CPUs with wrk and the "
              f"upstream, the one process has CPU0 to itself)")
        for name, r in results.items():
            if name == "flexgw" or name.startswith("flexgw-w"):
                c50 = r["c50"]
                if c50.get("cpu_us_per_req") is not None:
                    print(f"  {name}: {c50['cpu_us_per_req']:.0f} us of gateway CPU per request, "
                          f"{c50['cpu_share']:.2f} CPUs busy on average during the run")
    if "rps_ratio_multi_over_flexgw" in summary:
        ratio = summary["rps_ratio_multi_over_flexgw"]
        print(f"flexgw with a Service of 3 addresses / one address req/s at {connections} connections: "
              f"{ratio:.3f}  (target >= 0.97)")
        if "cpu_ratio_multi_over_flexgw" in summary:
            print(f"  as gateway CPU per request (one address / three): "
                  f"{summary['cpu_ratio_multi_over_flexgw']:.3f}")
    if "rps_ratio_tls_over_flexgw" in summary:
        ratio = summary["rps_ratio_tls_over_flexgw"]
        print(f"flexgw over TLS / flexgw plain HTTP req/s at {connections} connections: {ratio:.3f}")
        if "cpu_ratio_tls_over_flexgw" in summary:
            print(f"  as gateway CPU per request (plain / TLS): {summary['cpu_ratio_tls_over_flexgw']:.3f}")
    for key, label, goal in (("tracing100", "100% sampling", 0.85), ("tracing0", "0% sampling", 0.97)):
        ratio = summary.get(f"rps_ratio_{key}_over_flexgw")
        if ratio is not None:
            print(f"flexgw tracing at {label} / flexgw without tracing req/s at {connections} connections: "
                  f"{ratio:.3f}  (goal >= {goal})")
            cpu = summary.get(f"cpu_ratio_{key}_over_flexgw")
            if cpu is not None:
                print(f"  as gateway CPU per request (without / with tracing): {cpu:.3f}")
        median = summary.get(f"rounds_rps_ratio_{key}")
        if median is not None:
            low, high = summary[f"rounds_rps_ratio_{key}_range"]
            print(f"  median of {summary[f'rounds_{key}']} interleaved rounds: {median:.3f} "
                  f"(rounds {low:.3f}-{high:.3f})  (goal >= {goal})")
            cpu = summary.get(f"rounds_cpu_ratio_{key}")
            if cpu is not None:
                print(f"  as gateway CPU per request (without / with tracing), median: {cpu:.3f}")
    busy = info.get("cpu_busy_before_pct") or {}
    if any(v > 15 for v in busy.values()):
        print("NOTE: CPUs were busy before the run: "
              + ", ".join(f"{k} {v:.0f}%" for k, v in sorted(busy.items())))
    if any(summary["errors"].values()):
        print("WARNING: some runs had non-2xx responses or socket errors (see errors column)")


if __name__ == "__main__":
    sys.exit(main())
