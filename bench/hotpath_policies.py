"""The --policies chain's hot path in memory, for callgrind instruction counts (see hotpath.py).

The same `bench` ApiInstance and four PolicyBindings as `bench/run.py --policies` (basic auth,
rate limiting, header injection, message logging), compiled by the config pipeline from a
temporary directory, then N keep-alive GETs (with the basic auth header) through one
IngressProtocol to one pooled upstream connection on StringTransports and a memory reactor.
It uses only APIs older trees have too, so two trees can be compared run for run:

    PYTHONHASHSEED=0 PYTHONPATH=<tree> valgrind --tool=callgrind --callgrind-out-file=/tmp/p \\
        .venv/bin/python bench/hotpath_policies.py 1000
    (same with 3000; per request = (Ir at 3000 - Ir at 1000) / 2000)
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.testing import MemoryReactorClock

from flexgw.config.pipeline import load_config
from flexgw.ingress.front import IngressFactory
from flexgw.policies import registry

try:
    from flexgw.upstream.manager import PoolManager
except ImportError:  # trees from before upstream/manager.py (to count them with this script)
    from flexgw.upstream.pool import PoolManager  # type: ignore[no-redef]


def _sibling(name: str) -> Any:
    """A module of bench/ by file name (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _sibling("run")
hotpath = _sibling("hotpath")


def main(n: int) -> None:
    """Proxy `n` requests through the policy chain (after one that opens the upstream)."""
    bindings, _, missing = run.policy_bindings(set(registry.names()))
    if missing:
        raise SystemExit(f"policy kinds not registered: {missing}")
    with tempfile.TemporaryDirectory() as root:
        api = run.GATEWAY_CONF.format(host="127.0.0.1", port=8000, upstream_port=9000)
        (Path(root) / "bench.yaml").write_text(api + bindings)
        plan = load_config([root], {}).plan
    request = (
        b"GET /items HTTP/1.1\r\nHost: example.test\r\nUser-Agent: bench\r\nAccept: */*\r\n"
        b"Authorization: " + run.basic_auth_header().encode("ascii") + b"\r\n\r\n"
    )
    reactor = MemoryReactorClock()
    pools = PoolManager(reactor, reactor)
    factory = IngressFactory(
        reactor, reactor, plan.listeners[0], plan.http, plan.timeouts, pools, None
    )
    if b"x-bench: injected" not in hotpath.drive(factory, request, n).lower():
        raise SystemExit("the policy chain did not run")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
