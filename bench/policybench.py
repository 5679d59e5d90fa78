"""What the policy benchmarks (bench/content_policies.py, bench/identity_policies.py) share: their
command line, the processes and the upstream (as bench/run.py), and a binding on the bench API.
A script loads it by file name (bench/ is no package) and reaches bench/run.py as its `run`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def sibling(name: str) -> Any:
    """A module of bench/ by file name (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = sibling("run")


def binding(kind: str, config: str, name: str | None = None) -> str:
    """A PolicyBinding of `kind` on the bench API, `config` as YAML lines (indented 4)."""
    return (
        "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
        f"metadata: {{name: {name or 'bench-' + kind}}}\n"
        "spec:\n  targetRef: {name: bench}\n"
        f"  policyRef: {{name: {kind}}}\n  config:\n{config}"
    )


def arguments(doc: str | None, argv: list[str] | None, only_help: str) -> argparse.Namespace:
    """The policy benchmarks' command line."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--only", default="", help=only_help)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--twistd", default=run.default_twistd())
    parser.add_argument("--gateway-cmd", default=run.DEFAULT_GATEWAY_CMD)
    parser.add_argument("--gateway-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    return parser.parse_args(argv)


class Bench:
    """One benchmark run: its temporary directory, processes (pinned with taskset when there
    are CPUs to pin), the gateways' environment, and the upstream (nginx, else flexgw's)."""

    def __init__(self, args: argparse.Namespace, prefix: str) -> None:
        self.args = args
        self.only = {k for k in args.only.split(",") if k}
        self.use_taskset = shutil.which("taskset") is not None and (os.cpu_count() or 1) > 1
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        self.procs = run.Processes(self.tmp, self.use_taskset)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(run.REPO), env.get("PYTHONPATH", "")) if p)
        self.env = env
        self.upstream_port = 0

    def start_upstream(self) -> int:
        """The upstream every gateway proxies to; its port."""
        port = self.upstream_port = run.free_port()
        procs, cpu = self.procs, self.args.load_cpu
        if shutil.which("nginx"):
            conf = run.write_nginx(self.tmp, "upstream-nginx", run.NGINX_UPSTREAM_CONF, port=port)
            proc = procs.start("upstream", run.nginx_argv(conf), cpu)
        else:
            proc = procs.start("upstream", [sys.executable, "-m", "flexgw.testing.upstream", "--listen",
                                            f"{run.HOST}:{port}", "--mode", "hello"], cpu, self.env)
        run.wait_port(port, proc, procs, "upstream")
        return port

    def gateway(self, name: str, conf: str) -> tuple[int, Any]:
        """A gateway serving the bench API with `conf` (bindings); (port, process)."""
        port, _ = run.start_gateway(self.args, self.procs, self.tmp, name, f"conf-{name}", conf,
                                    self.upstream_port, self.args.gateway_cpu, self.env)
        return port, self.procs.children[-1][1]

    def stop_gateway(self, proc: Any) -> None:
        """Stop a gateway started by `gateway`."""
        self.procs.stop(proc)
        self.procs.children.pop()

    def close(self) -> None:
        """Stop every process; remove the directory."""
        self.procs.stop_all()
        shutil.rmtree(self.tmp, ignore_errors=True)


def require_wrk() -> bool:
    """Whether wrk is installed (said on stderr when not)."""
    if shutil.which("wrk"):
        return True
    print("wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
    return False
