"""The --policies chain's hot path in memory, for callgrind instruction counts (see hotpath.py).

The same `bench` ApiInstance and four PolicyBindings as `bench/run.py --policies` (basic auth,
rate limiting, header injection, message logging), compiled by the config pipeline from a
temporary directory, then N keep-alive GETs (with the basic auth header) through one
IngressProtocol to one pooled upstream connection on StringTransports and a memory reactor.
As in the gateway (`--message-log -`, the default), message-logging-flex writes to a
`MessageLog` (its lines kept in memory here), not to the Twisted log.
It uses only APIs older trees have too, so two trees can be compared run for run:

    .venv/bin/python bench/hotpath_policies.py 2000 --callgrind [--tree OTHER_TREE]
    .venv/bin/python bench/hotpath_policies.py 2000 --callgrind --breakdown

`--callgrind` prints instructions per request, counted by callgrind in a child process (only
the N requests: hotpath.instructions). `--only 1,3` binds only those members of the chain
(1-based, in bench/run.py's order; `--only none` binds none, the same API without policies);
`--breakdown` counts the chain without policies, each policy alone, and all four, and prints
each policy's share and the chain runner's own (all four minus the parts). `--profile` prints
cProfile's top functions instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.testing import MemoryReactorClock

from flexgw.config.pipeline import load_config
from flexgw.ingress.front import IngressFactory
from flexgw.policies import registry
from flexgw.policies.base import PolicyServices

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


def chain(only: str | None) -> tuple[tuple[str, str], ...]:
    """The members of bench/run.py's chain that `--only` names (all of them for None)."""
    if only is None:
        return run.POLICY_CHAIN
    if only == "none":
        return ()
    return tuple(run.POLICY_CHAIN[int(index) - 1] for index in only.split(","))


def main(n: int, only: str | None = None, profile: bool = False) -> None:
    """Proxy `n` requests through the policy chain (after one that opens the upstream)."""
    members = chain(only)
    saved, run.POLICY_CHAIN = run.POLICY_CHAIN, members
    try:
        bindings, _, missing = run.policy_bindings(set(registry.names()))
    finally:
        run.POLICY_CHAIN = saved
    if missing:
        raise SystemExit(f"policy kinds not registered: {missing}")
    reactor = MemoryReactorClock()
    services = PolicyServices(reactor=reactor, clock=reactor)
    try:
        from flexgw.service.accesslog import MessageLog
    except ImportError:  # a tree without it logs through Twisted's log, as its gateway did
        pass
    else:
        services.message_log = MessageLog(reactor, io.BytesIO())
    with tempfile.TemporaryDirectory() as root:
        api = run.GATEWAY_CONF.format(host="127.0.0.1", port=8000, upstream_port=9000)
        (Path(root) / "bench.yaml").write_text(api + bindings)
        state = load_config([root], {}, runtime=services)
    if state.problems and any(p.severity == "error" for p in state.problems):
        raise SystemExit("\n".join(str(p) for p in state.problems))
    plan = state.plan
    request = (
        b"GET /items HTTP/1.1\r\nHost: example.test\r\nUser-Agent: bench\r\nAccept: */*\r\n"
        b"Authorization: " + run.basic_auth_header().encode("ascii") + b"\r\n\r\n"
    )
    pools = PoolManager(reactor, reactor)
    factory = IngressFactory(
        reactor, reactor, plan.listeners[0], plan.http, plan.timeouts, pools, None
    )
    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
    first = hotpath.drive(factory, request, n)
    if profile:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    injecting = any(kind == "header-injection-flex" for kind, _ in members)
    if injecting and b"x-bench: injected" not in first.lower():
        raise SystemExit("the policy chain did not run")


def breakdown(n: int, tree: str | None) -> None:
    """Count the API without policies, each policy alone and the whole chain; print the shares."""
    script = Path(__file__).resolve()
    bare = hotpath.instructions(script, n, ["--only", "none"], tree)
    whole = hotpath.instructions(script, n, [], tree)
    print(f"no policies: {bare} instructions per request", flush=True)
    print(f"the 4-policy chain: {whole} ({whole - bare:+d}, {whole / bare:.3f}x)", flush=True)
    parts = 0
    for index, (kind, _) in enumerate(run.POLICY_CHAIN, start=1):
        alone = hotpath.instructions(script, n, ["--only", str(index)], tree) - bare
        parts += alone
        print(f"  {kind} alone: {alone:+d}", flush=True)
    print(f"  the chain's own cost (whole minus the policies alone): {whole - bare - parts:+d}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("n", type=int, nargs="?", default=1000)
    parser.add_argument("--only", help="chain members to bind: 1-based indexes (1,3) or 'none'")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions")
    parser.add_argument("--callgrind", action="store_true", help="print instructions per request")
    parser.add_argument("--breakdown", action="store_true", help="with --callgrind: per policy")
    parser.add_argument("--tree", help="with --callgrind: the flexgw tree to count (default: this)")
    args = parser.parse_args()
    if args.callgrind and args.breakdown:
        breakdown(args.n, args.tree)
    elif args.callgrind:
        extra = ["--only", args.only] if args.only else []
        count = hotpath.instructions(Path(__file__).resolve(), args.n, extra, args.tree)
        print(f"{count} instructions per request ({args.n} requests)")
    else:
        main(args.n, args.only, args.profile)
