"""Tests for bench/run.py's pure parts: wrk output parsing, ratios and the generated configs."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import yaml
from twisted.trial import unittest

WRK_OUTPUT = """\
Running 2s test @ http://127.0.0.1:8082/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.23ms  643.97us   9.50ms   85.77%
    Req/Sec    22.52k     3.94k   31.10k    80.00%
  Latency Distribution
     50%  840.00us
     75%    2.50ms
     90%    2.61ms
     99%    1.20s
  67371 requests in 3.00s, 10.41MB read
  Socket errors: connect 1, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:  22419.83
Transfer/sec:      3.46MB
"""


def load_bench() -> ModuleType:
    """Import bench/run.py (bench/ is not a package)."""
    path = Path(__file__).resolve().parent.parent / "bench" / "run.py"
    spec = importlib.util.spec_from_file_location("flexgw_bench_run", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = load_bench()


class ParseWrkTests(unittest.TestCase):
    """parse_wrk reads req/s, percentiles in ms and error counts."""

    def test_parse(self) -> None:
        """Units us/ms/s convert to ms; socket errors are summed; non-2xx counted."""
        r = bench.parse_wrk(WRK_OUTPUT)
        self.assertEqual(r["rps"], 22419.83)
        self.assertAlmostEqual(r["p50_ms"], 0.84)
        self.assertAlmostEqual(r["p75_ms"], 2.5)
        self.assertAlmostEqual(r["p99_ms"], 1200.0)
        self.assertEqual((r["requests"], r["socket_errors"], r["non_2xx"]), (67371, 6, 7))

    def test_unparsable(self) -> None:
        """Output without Requests/sec is an error, not a zero."""
        self.assertRaises(bench.BenchError, bench.parse_wrk, "wrk: connection refused\n")


class SummaryTests(unittest.TestCase):
    """summarise computes the ratios the issue sets as goals."""

    def test_ratios(self) -> None:
        """req/s ratio and added-p50 ratio use the direct p50 at 1 connection as the base."""
        def run(rps: float, p50: float) -> dict[str, float]:
            return {"rps": rps, "p50_ms": p50, "non_2xx": 0, "socket_errors": 0}

        results = {
            "direct": {"c50": run(60000, 0.6), "c1": run(30000, 0.02)},
            "flexgw": {"c50": run(15000, 2.0), "c1": run(4000, 0.32)},
            "nginx-proxy": {"c50": run(50000, 1.0), "c1": run(5000, 0.22)},
        }
        summary = bench.summarise(results, 50)
        self.assertAlmostEqual(summary["rps_ratio_flexgw_over_nginx"], 0.3)
        self.assertAlmostEqual(summary["flexgw_added_p50_ms"], 0.30)
        self.assertAlmostEqual(summary["nginx-proxy_added_p50_ms"], 0.20)
        self.assertAlmostEqual(summary["added_p50_ratio_flexgw_over_nginx"], 1.5)
        self.assertEqual(summary["errors"], {"direct": 0, "flexgw": 0, "nginx-proxy": 0})
        self.assertNotIn("rps_ratio_policies_over_nginx", summary)

    def test_policies_over_nginx(self) -> None:
        """The 4-policy chain is also a req/s ratio of nginx's (issue 20's goal: >= 0.25)."""
        def run(rps: float) -> dict[str, float]:
            return {"rps": rps, "p50_ms": 1.0, "non_2xx": 0, "socket_errors": 0}

        results = {
            "flexgw": {"c50": run(8000), "c1": run(1000)},
            "flexgw+pol": {"c50": run(5000), "c1": run(1000)},
            "nginx-proxy": {"c50": run(25000), "c1": run(1000)},
        }
        summary = bench.summarise(results, 50)
        self.assertAlmostEqual(summary["rps_ratio_policies_over_nginx"], 0.2)
        self.assertAlmostEqual(summary["rps_ratio_policies_over_flexgw"], 0.625)


    def test_workers_ratio(self) -> None:
        """A flexgw-wN target is reported as a req/s ratio of the one-process flexgw."""
        def run(rps: float) -> dict[str, float]:
            return {"rps": rps, "p50_ms": 1.0, "non_2xx": 0, "socket_errors": 0}

        results = {
            "flexgw": {"c50": run(4000), "c1": run(1000)},
            "flexgw-w2": {"c50": run(7000), "c1": run(1000)},
        }
        summary = bench.summarise(results, 50)
        self.assertAlmostEqual(summary["rps_ratio_workers_over_flexgw"], 1.75)
        self.assertNotIn("rps_ratio_workers_over_flexgw", bench.summarise({"flexgw-w2": results["flexgw-w2"]}, 50))

    def test_cpu_ratios(self) -> None:
        """Policies and TLS are also reported as gateway CPU per request, plain over other;
        without CPU figures there is no such ratio."""
        def run(rps: float, cpu_us: float | None) -> dict[str, float | None]:
            return {"rps": rps, "p50_ms": 1.0, "non_2xx": 0, "socket_errors": 0,
                    "cpu_us_per_req": cpu_us}

        results = {
            "flexgw": {"c50": run(15000, 60.0), "c1": run(4000, None)},
            "flexgw+pol": {"c50": run(11000, 75.0), "c1": run(3900, None)},
            "flexgw-tls": {"c50": run(9000, 96.0), "c1": run(3800, None)},
        }
        summary = bench.summarise(results, 50)
        self.assertAlmostEqual(summary["cpu_ratio_policies_over_flexgw"], 0.8)
        self.assertAlmostEqual(summary["cpu_ratio_tls_over_flexgw"], 0.625)
        results["flexgw"]["c50"]["cpu_us_per_req"] = None
        self.assertNotIn("cpu_ratio_policies_over_flexgw", bench.summarise(results, 50))


    def test_tracing_rounds(self) -> None:
        """Interleaved tracing rounds: the median and range of the per-round req/s ratios, the
        median CPU ratio; a round without CPU figures counts for req/s only."""
        rounds = [
            {"flexgw": (1000, 100.0), "flexgw-tr100": (900, 110.0), "flexgw-tr0": (990, 101.0)},
            {"flexgw": (500, 200.0), "flexgw-tr100": (400, 250.0), "flexgw-tr0": (500, 200.0)},
            {"flexgw": (800, None), "flexgw-tr100": (760, None), "flexgw-tr0": (800, None)},
        ]
        summary = bench.tracing_round_ratios(rounds)
        self.assertEqual(summary["rounds_tracing100"], 3)
        self.assertAlmostEqual(summary["rounds_rps_ratio_tracing100"], 0.9)
        self.assertEqual(summary["rounds_rps_ratio_tracing100_range"], (0.8, 0.95))
        self.assertAlmostEqual(summary["rounds_cpu_ratio_tracing100"], (100 / 110 + 0.8) / 2)
        self.assertAlmostEqual(summary["rounds_rps_ratio_tracing0"], 1.0)
        self.assertEqual(bench.tracing_round_ratios([]), {})


class CpuTests(unittest.TestCase):
    """session_cpu_seconds sums the CPU time of a session's processes."""

    def test_own_session(self) -> None:
        """This process's session has used some CPU; it only grows; an unused session id none."""
        session = os.getsid(0)
        first = bench.session_cpu_seconds(session)
        sum(i * i for i in range(300_000))  # burn a little CPU
        second = bench.session_cpu_seconds(session)
        self.assertGreater(first, 0)
        self.assertGreaterEqual(second, first)
        self.assertEqual(bench.session_cpu_seconds(2**31 - 1), 0)


class ConfigTests(unittest.TestCase):
    """The generated configs say what the benchmark claims."""

    def test_gateway_conf_is_flex_yaml(self) -> None:
        """The gateway conf is one ApiInstance on the gateway port with an inline upstream service."""
        doc = yaml.safe_load(bench.GATEWAY_CONF.format(host="127.0.0.1", port=1234, upstream_port=5678))
        self.assertEqual(doc["apiVersion"], "gateway.mulesoft.com/v1alpha1")
        self.assertEqual(doc["kind"], "ApiInstance")
        self.assertEqual(doc["spec"]["address"], "http://127.0.0.1:1234")
        self.assertEqual(doc["spec"]["services"]["upstream"]["address"], "http://127.0.0.1:5678")

    def test_nginx_proxy_conf(self) -> None:
        """The nginx proxy uses HTTP/1.1 upstream keep-alive and one worker."""
        text = bench.NGINX_PROXY_CONF.format(tmp="/t", host="127.0.0.1", port=1, upstream_port=2)
        for needle in ("worker_processes 1;", "proxy_http_version 1.1;", "keepalive 64;",
                       'proxy_set_header Connection "";', "server 127.0.0.1:2;", "listen 127.0.0.1:1 "):
            self.assertIn(needle, text)


class HotpathTests(unittest.TestCase):
    """bench/hotpath.py really proxies its requests over one reused upstream connection."""

    def test_requests_are_proxied(self) -> None:
        """Each request reaches the upstream transport and each response the client."""
        path = Path(__file__).resolve().parent.parent / "bench" / "hotpath.py"
        spec = importlib.util.spec_from_file_location("bench_hotpath", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sent: list[bytes] = []
        from twisted.internet.testing import StringTransport

        original = StringTransport.write

        def write(transport: StringTransport, data: bytes) -> None:
            sent.append(data)
            original(transport, data)

        self.patch(StringTransport, "write", write)
        module.main(5)
        upstream_heads = [d for d in sent if d.startswith(b"GET /items HTTP/1.1\r\n")]
        responses = [d for d in sent if d.startswith(b"HTTP/1.1 200 OK\r\n")]
        self.assertEqual((len(upstream_heads), len(responses)), (6, 6))

    def test_policy_chain_runs(self) -> None:
        """bench/hotpath_policies.py compiles the --policies chain and runs it per request (it
        exits if the header injection did not reach the upstream or no connection was reused)."""
        path = Path(__file__).resolve().parent.parent / "bench" / "hotpath_policies.py"
        spec = importlib.util.spec_from_file_location("bench_hotpath_policies", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main(3)
