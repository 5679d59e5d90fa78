"""README.md and the other shipped Markdown: every file they point at is in the repository."""

from __future__ import annotations

import os
import re

from twisted.trial.unittest import TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ("README.md", "bench/README.md", "docs/design.md", "docs/flex-reference.md")
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
_MARKDOWN_NAME = re.compile(r"`([\w./-]+\.md)`")


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
