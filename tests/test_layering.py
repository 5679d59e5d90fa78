"""The package layering (README "Layout"): imports point down the layers only, and no module import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
#: flexgw's packages and top modules by layer, bottom first: each imports only lower layers, not
#: the others of its own; `testing` (shipped test support) may import anything, only it imports it.
LAYERS = [("flexgw", "plan", "compat"), ("http",), ("tls", "storage"), ("upstream", "sidecalls"),
          ("policies",), ("config", "ingress"), ("egress",), ("service",), ("cli", "tap"), ("testing",)]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
#: (importing file, imported module) -> why that import is tolerated for now; keep it empty.
ALLOWED: dict[tuple[str, str], str] = {}


def _graph() -> dict[str, tuple[str, list[tuple[str, int]]]]:
    """module -> (its file, the flexgw modules it imports with their lines): function-level
    imports count, those under `if TYPE_CHECKING:` do not."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "flexgw").rglob("*.py")}
    graph = {}
    for module, path in files.items():
        tree, name = ast.parse(path.read_text()), path.relative_to(ROOT).as_posix()
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test) for s in node.body for n in ast.walk(s)}
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and id(node) not in typing_only:
                found |= {(alias.name, node.lineno) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and id(node) not in typing_only:
                found |= {(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module,
                           node.lineno) for a in node.names}
        graph[module] = (name, sorted((t, line) for t, line in found
                                      if t.split(".")[0] == "flexgw" and (name, t) not in ALLOWED))
    return graph


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else "flexgw"


class LayeringTests(SynchronousTestCase):
    """Every import of a flexgw module follows LAYERS, and the module graph has no cycle."""

    def test_imports_point_down(self) -> None:
        """No module imports a package of its own layer, a higher layer, or flexgw.testing."""
        wrong = [f"{name}:{line}: {_layer(m)} (layer {RANK[_layer(m)]}) imports {t} "
                 f"({_layer(t)}, layer {RANK[_layer(t)]}): imports must point down"
                 for m, (name, edges) in _graph().items() for t, line in edges
                 if _layer(m) not in (_layer(t), "testing") and RANK[_layer(t)] >= RANK[_layer(m)]]
        self.assertEqual(wrong, [], "\n" + "\n".join(wrong))

    def test_no_module_cycle(self) -> None:
        """No import edge lies on a cycle of flexgw modules (function-level imports count)."""
        graph = _graph()

        def reaches(start: str, goal: str) -> bool:
            seen, todo = set(), [start]
            while todo:
                module = todo.pop()
                if module == goal:
                    return True
                if module in graph and module not in seen:
                    seen.add(module)
                    todo += [target for target, _ in graph[module][1]]
            return False

        cycles = [f"{name}:{line}: {m} imports {t}, which imports {m} back"
                  for m, (name, edges) in graph.items() for t, line in edges if t != m and reaches(t, m)]
        self.assertEqual(cycles, [], "\n" + "\n".join(cycles))
