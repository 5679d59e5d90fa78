"""Instructions per keep-alive request in a real gateway process on loopback, under callgrind.

Unlike bench/hotpath.py (in memory), this goes through real sockets, so it counts what the
reactor does per request too (the part `send_now`, flexgw.compat.tcpwrite, saves). nginx is the
upstream; one client connection sends N GETs one after the other; callgrind instruments the
gateway only while those N run (after 200 warm-up requests), so start-up is not counted.

    .venv/bin/python bench/gateway_instructions.py 2000
    .venv/bin/python bench/gateway_instructions.py 2000 --no-send-now   # always transport.write
    .venv/bin/python bench/gateway_instructions.py 2000 --tls [--twisted-tls-flush]
    .venv/bin/python bench/gateway_instructions.py 2000 --h2 h1    # h2c client, HTTP/1.1 upstream
    .venv/bin/python bench/gateway_instructions.py 2000 --h2 h2c   # h2c client, h2c upstream
    .venv/bin/python bench/gateway_instructions.py 2000 --tracing 100   # or 0, or off
    .venv/bin/python bench/gateway_instructions.py 2000 --policies      # bench/run.py's 4-policy chain

`--tracing P` adds bench/run.py's tracing Configuration at P% sampling, exporting over OTLP/gRPC
to a receiver (flexgw.testing.otlp) started beside nginx; its batches are encoded and sent
while callgrind counts, so the export's cost is in the figure. The batches are full ones (512
spans, as under load: a long scheduleDelay keeps callgrind's slow pace from sending a few spans
at a time). `--tracing all` measures off, 0
and 100 one after the other and prints each as a ratio of off.

With `--h2`, the client speaks HTTP/2 with prior knowledge and sends `--streams` requests at a
time (as h2load -m does), waiting for all their answers; the figure is still per request.

`--policies` binds bench/run.py's --policies chain (basic auth, rate limiting, header injection,
message logging) to the API and sends its Authorization header; `--policies both` measures
without and with the chain one after the other and prints the ratio.

`--tls` makes the gateway's port a TLS port (bench/run.py's certificate); `--twisted-tls-flush`
then uses Twisted's own TLSMemoryBIOProtocol, whose encrypted bytes wait for the next reactor
turn, instead of flexgw.compat.tlswrite's SendNowTLSProtocol.

Needs valgrind (callgrind_control) and nginx (and grpcio for `--tracing`). Every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import glob
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQUEST = b"GET /items HTTP/1.1\r\nHost: gw\r\nUser-Agent: cg\r\nAccept: */*\r\n\r\n"
NGINX = """worker_processes 1; error_log {tmp}/e.log warn; pid {tmp}/n.pid; daemon off;
events {{ worker_connections 64; }}
http {{ access_log off; client_body_temp_path {tmp}/c; proxy_temp_path {tmp}/p;
fastcgi_temp_path {tmp}/f; uwsgi_temp_path {tmp}/u; scgi_temp_path {tmp}/s;
keepalive_requests 10000000; server {{ listen 127.0.0.1:{port};
location / {{ default_type text/plain; return 200 "hello\\n"; }} }}
server {{ listen 127.0.0.1:{h2c_port} http2;
location / {{ default_type text/plain; return 200 "hello\\n"; }} }} }}
"""
CONF = """apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata:
  name: bench
spec:
  address: http://127.0.0.1:{port}
  services:
    upstream:
      address: http://127.0.0.1:{upstream}
"""


def free_port() -> int:
    """An ephemeral loopback port free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def requests(sock: socket.socket | ssl.SSLSocket, n: int, request: bytes = REQUEST) -> None:
    """Send `n` GETs one after the other, each after the previous answer."""
    buffer = b""
    for _ in range(n):
        sock.sendall(request)
        while b"hello\n" not in buffer:
            data = sock.recv(65536)
            if not data:
                raise SystemExit("the gateway closed the connection")
            buffer += data
        buffer = buffer[buffer.index(b"hello\n") + 6 :]


H2_FIELDS = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"gw"), (b":path", b"/items"),
             (b"user-agent", b"cg"), (b"accept", b"*/*")]


class H2Client:
    """HTTP/2 with prior knowledge over a socket: batches of GETs, each batch's answers awaited."""

    def __init__(self, sock: socket.socket | ssl.SSLSocket) -> None:
        import hpack
        from hyperframe.frame import SettingsFrame, WindowUpdateFrame

        self.sock = sock
        self.encoder = hpack.Encoder()
        self.stream_id = 1
        self.buffer = b""
        sock.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + SettingsFrame(0, settings={4: 2**30}).serialize()
            + WindowUpdateFrame(0, window_increment=2**30).serialize()
        )

    def requests(self, n: int, streams: int) -> None:
        """`n` GETs, `streams` per write."""
        from hyperframe.frame import HeadersFrame, SettingsFrame

        done = 0
        while done < n:
            batch = min(streams, n - done)
            frames = []
            for _ in range(batch):
                block = self.encoder.encode(H2_FIELDS)
                frames.append(HeadersFrame(self.stream_id, block, flags=["END_HEADERS", "END_STREAM"]).serialize())
                self.stream_id += 2
            self.sock.sendall(b"".join(frames))
            ended = 0
            while ended < batch:
                while len(self.buffer) < 9 or len(self.buffer) < 9 + int.from_bytes(self.buffer[:3], "big"):
                    data = self.sock.recv(65536)
                    if not data:
                        raise SystemExit("the gateway closed the connection")
                    self.buffer += data
                length = int.from_bytes(self.buffer[:3], "big")
                kind, flags = self.buffer[3], self.buffer[4]
                if kind in (0, 1) and flags & 1:
                    ended += 1
                elif kind == 4 and not flags & 1:
                    self.sock.sendall(SettingsFrame(0, flags=["ACK"]).serialize())
                elif kind == 7:
                    raise SystemExit(f"GOAWAY from the gateway: {self.buffer[9 : 9 + length]!r}")
                self.buffer = self.buffer[9 + length :]
            done += batch


def connect(port: int, process: subprocess.Popen[bytes], log: Path) -> socket.socket:
    """A connection to the gateway once it listens (bounded: 10 minutes under valgrind)."""
    deadline = time.monotonic() + 600
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=120)
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(log.read_text()) from None
            time.sleep(1)


def dumped(out: Path) -> int:
    """The instruction total of callgrind's dump (waited for: at most 60 s)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for name in glob.glob(f"{out}*"):
            for line in Path(name).read_text(errors="replace").splitlines():
                if line.startswith("totals:"):
                    return int(line.split()[1])
        time.sleep(0.5)
    raise SystemExit("callgrind wrote no dump")


def measure(args: argparse.Namespace, tracing: str = "off", policies: bool = False) -> int:
    """Instructions per request of one gateway (`tracing`: "off", or a sampling percentage;
    `policies`: with bench/run.py's --policies chain)."""
    tmp = Path(tempfile.mkdtemp(prefix="flexgw-instructions-"))
    upstream, port, h2c_upstream = free_port(), free_port(), free_port()
    (tmp / "nginx.conf").write_text(NGINX.format(tmp=tmp, port=upstream, h2c_port=h2c_upstream))
    (tmp / "conf").mkdir()
    documents = CONF.format(port=port, upstream=upstream)
    if args.h2 == "h2c":
        documents = documents.replace(f"http://127.0.0.1:{upstream}", f"h2c://127.0.0.1:{h2c_upstream}")
    ca_path = None
    sys.path.insert(0, str(REPO / "bench"))
    if args.tls:
        from run import tls_conf

        extra, ca_path = tls_conf(tmp)
        documents += extra
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(REPO)}
    started = []
    if tracing != "off":
        from run import TRACING_CONF

        otlp = free_port()
        # Batches fill up (maxExportBatchSize, 512 spans) before they go, as they do under load:
        # at callgrind's pace the default half-second delay would send a few spans at a time.
        documents += TRACING_CONF.format(host="127.0.0.1", otlp_port=otlp, overall=tracing).replace(
            "        serviceName: bench\n", "        serviceName: bench\n        scheduleDelay: 60s\n"
        )
        started.append(subprocess.Popen(
            [sys.executable, "-m", "flexgw.testing.otlp", "--listen", f"127.0.0.1:{otlp}"],
            cwd=REPO, env=env, start_new_session=True,
        ))
    request = REQUEST
    if policies:
        from run import available_policy_kinds, basic_auth_header, policy_bindings

        bindings, _, missing = policy_bindings(available_policy_kinds(env))
        if missing:
            raise SystemExit(f"policy kinds not registered: {missing}")
        documents += bindings
        request = REQUEST.replace(b"\r\n\r\n", f"\r\nAuthorization: {basic_auth_header()}\r\n\r\n".encode())
    (tmp / "conf" / "api.yaml").write_text(documents)
    patch = "import flexgw.compat.tcpwrite as t; t._DIRECT = ();" if args.no_send_now else ""
    if args.twisted_tls_flush:
        patch += (
            "from twisted.protocols.tls import TLSMemoryBIOProtocol;"
            "import flexgw.tls.contexts as c; c.QuietTLSFactory.protocol = TLSMemoryBIOProtocol;"
        )
    out, log = tmp / "callgrind.out", tmp / "gateway.log"
    try:
        started.append(
            subprocess.Popen(
                ["nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp)], start_new_session=True
            )
        )
        gateway = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-c",
                patch + "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "flexgw",
                "--conf",
                str(tmp / "conf"),
                "--access-log",
                "/dev/null",
                "--admin",
                "off",
            ],
            cwd=REPO,
            env=env,
            start_new_session=True,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        started.append(gateway)
        sock: socket.socket | ssl.SSLSocket = connect(port, gateway, log)
        if ca_path is not None:
            sock = ssl.create_default_context(cafile=str(ca_path)).wrap_socket(
                sock, server_hostname="127.0.0.1"
            )
        if args.h2:
            client = H2Client(sock)
            client.requests(200, args.streams)  # warm: upstream connections pooled, paths run once
        else:
            requests(sock, 200, request)  # warm: the upstream connection pooled, the paths run once
        control = ["callgrind_control", "-i"]
        subprocess.run([*control, "on", str(gateway.pid)], check=True, capture_output=True)
        if args.h2:
            client.requests(args.n, args.streams)
        else:
            requests(sock, args.n, request)
        subprocess.run([*control, "off", str(gateway.pid)], check=True, capture_output=True)
        subprocess.run(
            ["callgrind_control", "-d", str(gateway.pid)], check=True, capture_output=True
        )
        return dumped(out) // args.n
    finally:
        for process in started:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def main() -> None:
    """Measure and print instructions per request."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("n", type=int, nargs="?", default=2000)
    parser.add_argument("--no-send-now", action="store_true", help="always transport.write")
    parser.add_argument("--tls", action="store_true", help="the gateway's port speaks TLS")
    parser.add_argument(
        "--h2", choices=("h1", "h2c"), help="an h2c client; the upstream speaks HTTP/1.1 or h2c"
    )
    parser.add_argument("--streams", type=int, default=10, help="with --h2: requests per write")
    parser.add_argument(
        "--twisted-tls-flush", action="store_true", help="Twisted's TLSMemoryBIOProtocol"
    )
    parser.add_argument(
        "--tracing", default="off", choices=("off", "0", "100", "all"),
        help="OpenTelemetry tracing at this sampling percentage (all: off, 0 and 100)",
    )
    parser.add_argument(
        "--policies", nargs="?", const="on", choices=("on", "both"),
        help="bench/run.py's 4-policy chain (both: without it, then with it, and the ratio)",
    )
    args = parser.parse_args()
    if args.policies:
        chains = (False, True) if args.policies == "both" else (True,)
        base = None
        for policies in chains:
            count = measure(args, args.tracing if args.tracing != "all" else "off", policies)
            label = "with the 4-policy chain" if policies else "without policies"
            ratio = f" = {count / base:.3f} x without" if base and policies else ""
            print(f"{label}: {count} instructions per request ({args.n} requests){ratio}", flush=True)
            base = count
        return
    variant = "transport.write only" if args.no_send_now else "send_now"
    if args.h2:
        variant = f"h2c->{args.h2} ({args.streams} streams per write), {variant}"
    if args.tls:
        tls = "Twisted's TLS flush" if args.twisted_tls_flush else "SendNowTLSProtocol"
        variant = f"TLS ({tls}), {variant}"
    modes = ("off", "0", "100") if args.tracing == "all" else (args.tracing,)
    counts: dict[str, int] = {}
    for mode in modes:
        counts[mode] = count = measure(args, mode)
        label = variant if mode == "off" else f"{variant}, tracing at {mode}%"
        ratio = f" = {count / counts['off']:.3f} x tracing off" if "off" in counts and mode != "off" else ""
        print(f"{label}: {count} instructions per request ({args.n} requests){ratio}", flush=True)


if __name__ == "__main__":
    main()
