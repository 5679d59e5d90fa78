"""Every flexgw module imports on its own in a fresh interpreter (no import-order dependence)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent

#: Lists the third-party and standard modules the whole package loads.
_LIBRARIES = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(" ".join(m for m in sys.modules if m.partition(".")[0] not in ("flexgw", "__main__")))
"""
#: Loads those libraries (never a flexgw module), then forks one child per flexgw module that
#: imports it alone: `python -c "import flexgw.x.y"` each, without paying for Twisted every time.
_CHILDREN = """
import os, sys, traceback, importlib
names, libraries = sys.argv[1:], sys.stdin.read().split()
for library in libraries:
    try:
        importlib.import_module(library)
    except BaseException:
        pass
assert not [m for m in sys.modules if m.startswith("flexgw")], "a library imported flexgw"
failed = []
for name in names:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("\\n".join(failed))
"""


def _module_names() -> list[str]:
    names = []
    for path in sorted((ROOT / "flexgw").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


class ImportAloneTests(SynchronousTestCase):
    """`python -c "import flexgw.x.y"` works for each module."""

    def test_each_module_imports_alone(self) -> None:
        """Each flexgw module, imported first and alone in a fresh process, imports cleanly."""
        names = _module_names()
        command = [sys.executable, "-W", "ignore::DeprecationWarning", "-c"]
        libraries = subprocess.run(
            [*command, _LIBRARIES, *names], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        result = subprocess.run(
            [*command, _CHILDREN, *names], input=libraries, cwd=ROOT, capture_output=True,
            text=True, check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.split(), [], result.stderr)
        self.assertGreater(len(names), 50)
