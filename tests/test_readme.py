"""README.md: its shell blocks run as written (tools/readme_commands.py), and every file the
shipped Markdown points at is in the repository."""

from __future__ import annotations

import importlib.util
import io
import os
import re
import sys
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import SkipTest, TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ("README.md", "bench/README.md", "docs/design.md", "docs/flex-reference.md")
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
_MARKDOWN_NAME = re.compile(r"`([\w./-]+\.md)`")


def _load_tool() -> Any:
    """tools/readme_commands.py as a module (tools/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(
        "readme_commands", os.path.join(ROOT, "tools", "readme_commands.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


readme_commands = _load_tool()


def read(name: str) -> str:
    """A shipped document's text."""
    with open(os.path.join(ROOT, name), encoding="utf-8") as handle:
        return handle.read()


class ReferencesTests(TestCase):
    """Links and Markdown file names in the shipped documents resolve inside the repository."""

    def test_links_resolve(self) -> None:
        """Every relative link target exists; no link leaves the repository."""
        for name in DOCUMENTS:
            base = os.path.dirname(os.path.join(ROOT, name))
            for target in _LINK.findall(read(name)):
                if target.startswith(("http://", "https://")):
                    continue
                path = os.path.normpath(os.path.join(base, target))
                self.assertTrue(path.startswith(ROOT + os.sep), f"{name}: {target} is outside")
                self.assertTrue(os.path.exists(path), f"{name}: {target} does not exist")

    def test_markdown_names_exist(self) -> None:
        """A `something.md` a document names is a file of the repository (from its root or
        from the document's own folder), never a file of the developers' machine."""
        for name in DOCUMENTS:
            base = os.path.dirname(os.path.join(ROOT, name))
            for target in _MARKDOWN_NAME.findall(read(name)):
                candidates = (os.path.join(ROOT, target), os.path.join(base, target))
                self.assertTrue(
                    any(os.path.exists(path) for path in candidates), f"{name}: {target}"
                )
            self.assertNotIn("shared/reference", read(name), name)
            self.assertNotIn("DESIGN.md", read(name), name)


class MarkerTests(TestCase):
    """The runner's convention, on small READMEs of the tests' own (no ports, no namespace)."""

    def run_text(self, text: str) -> tuple[int, str]:
        """Run the blocks of `text` as README.md's are run; (status, report)."""
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        out = io.StringIO()
        return readme_commands.run_readme(path, out), out.getvalue()

    def test_failing_command_fails(self) -> None:
        """A block whose command fails (exit status, or missing expected output) fails the run."""
        status, report = self.run_text("<!-- test: run -->\n```sh\ntrue\nfalse\n```\n")
        self.assertEqual(status, 1)
        self.assertIn("exit status 1", report)
        status, report = self.run_text('<!-- test: run expect="bye" -->\n```sh\necho hi\n```\n')
        self.assertEqual(status, 1)
        self.assertIn("lacks 'bye'", report)
        status, report = self.run_text('<!-- test: run expect="hi" -->\n```sh\necho hi\n```\n')
        self.assertEqual((status, report.count(" ok (")), (0, 1), report)

    def test_started_command_that_exits_fails(self) -> None:
        """A `start` block that exits before its address accepts connections fails the run."""
        status, report = self.run_text(
            "<!-- test: start 127.0.0.1:1 -->\n```sh\necho starting; exit 3\n```\n"
        )
        self.assertEqual(status, 1)
        self.assertIn("exited (3) before ('127.0.0.1', 1) accepted connections", report)
        self.assertIn("starting", report)

    def test_unmarked_and_hidden_commands_refused(self) -> None:
        """A sh block without a marker, and commands in a non-sh block, are errors; skip and
        start markers need their reason and addresses."""
        status, report = self.run_text(
            "```sh\ncurl http://127.0.0.1:1/\n```\n\n```\nflexgw validate conf\n```\n"
            "<!-- test: skip -->\n```sh\nmake run\n```\n"
            "<!-- test: start -->\n```sh\nmake run\n```\n"
        )
        self.assertEqual(status, 1)
        self.assertIn("line 1: curl http://127.0.0.1:1/: ```sh block without", report)
        self.assertIn("line 5: flexgw validate conf: commands in a ``` block", report)
        self.assertIn("a skip marker says why", report)
        self.assertIn("a start marker lists the HOST:PORTs", report)

    def test_activation_puts_flexgw_on_the_path(self) -> None:
        """Before a block sources .venv/bin/activate, the venv's commands are not on PATH."""
        venv_python = os.path.join(readme_commands.VENV_BIN, "python")
        if not os.path.exists(venv_python):
            raise SkipTest("no .venv in the repository (make install makes it)")
        status, report = self.run_text(
            "<!-- test: run -->\n```sh\n! command -v flexgw\n```\n"
            "<!-- test: run -->\n```sh\n. .venv/bin/activate\n```\n"
            '<!-- test: run expect="flexgw " -->\n```sh\nflexgw version\n```\n'
        )
        self.assertEqual(status, 0, report)


class Runner(protocol.ProcessProtocol):
    """tools/readme_commands.py as a child process; `ended` fires with (exit code, output)."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred[tuple[int, str]] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        """Keep the report."""
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        """Done: its exit code and what it printed."""
        code = getattr(reason.value, "exitCode", None)
        self.ended.callback((-1 if code is None else code, self.output.decode(errors="replace")))


class ReadmeCommandsTests(TestCase):
    """Every sh block of README.md, run as written against real gateways (fixed ports, in a
    private network namespace)."""

    timeout = 600

    async def test_readme_blocks_run(self) -> None:
        """tools/readme_commands.py README.md exits 0: every block did what its marker says."""
        runner = Runner()
        tool = os.path.join(ROOT, "tools", "readme_commands.py")
        env = {k: v for k, v in os.environ.items() if k != readme_commands.ISOLATED}
        transport = reactor.spawnProcess(
            runner, sys.executable, [sys.executable, tool, os.path.join(ROOT, "README.md")],
            env=env, path=ROOT,
        )

        def cleanup() -> Any:
            if not runner.ended.called:
                transport.signalProcess("KILL")
            return runner.ended

        self.addCleanup(cleanup)
        code, report = await runner.ended
        if code == 77:  # no private network namespace, and the README's ports are taken
            raise SkipTest(report)
        self.assertEqual(code, 0, report)
        self.assertNotIn("FAILED", report)
