"""Tests for flexgw.config.load: files, multi-document YAML, node locations, parse failures."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase, TestCase

from flexgw.config.load import load_text
from flexgw.config.sources.files import discover_files, load_file
from tests.conftools import KUBECTL_GET_LIST, write_conf


class LocationTests(SynchronousTestCase):
    """Every node's value and key keep their 1-based line and column."""

    def test_marks(self) -> None:
        """Values, keys and list items are located exactly."""
        text = "kind: ApiInstance\nmetadata:\n  name: x\nspec:\n  list:\n    - a\n    -  b\n"
        loaded = load_text(text, "f.yaml")
        self.assertFalse(loaded.failed)
        doc = loaded.documents[0]
        self.assertEqual(doc.marks[("metadata", "name")], (3, 9))
        self.assertEqual(doc.key_marks[("metadata", "name")], (3, 3))
        self.assertEqual(doc.marks[("spec", "list", 1)], (7, 8))
        self.assertEqual(doc.locate(("spec", "list", 1, "missing")), (7, 8))

    def test_multi_document(self) -> None:
        """Documents separated by `---` keep their own indexes and absolute line numbers."""
        loaded = load_text("a: 1\n---\nb: 2\n---\n---\nc: 3\n", "f.yaml")
        self.assertEqual([d.value for d in loaded.documents], [{"a": 1}, {"b": 2}, {"c": 3}])
        self.assertEqual(loaded.documents[2].marks[("c",)], (6, 4))

    def test_keys_stay_strings(self) -> None:
        """`on:` and `1:` keys stay strings (YAML 1.1 would make them bool / int)."""
        loaded = load_text("on: 1\n2: x\n", "f.yaml")
        self.assertEqual(loaded.documents[0].value, {"on": 1, "2": "x"})

    def test_plain_scalars_recorded(self) -> None:
        """Unquoted scalars are recorded as plain; quoted ones are not."""
        doc = load_text("a: 1\nb: '1'\n", "f.yaml").documents[0]
        self.assertIn(("a",), doc.plain)
        self.assertNotIn(("b",), doc.plain)

    def test_merge_keys(self) -> None:
        """`<<` merge keys are applied."""
        doc = load_text("base: &b {x: 1}\nother:\n  <<: *b\n  y: 2\n", "f.yaml").documents[0]
        self.assertEqual(doc.value["other"], {"x": 1, "y": 2})


class FailureTests(SynchronousTestCase):
    """Broken files become problems with file:line:column, never exceptions."""

    def test_syntax_error_location(self) -> None:
        """An unclosed flow mapping is reported at the line and column where parsing failed."""
        loaded = load_text("a: 1\nb: {c: 2\nd: 3\n", "bad.yaml")
        self.assertTrue(loaded.failed)
        (problem,) = loaded.problems
        self.assertEqual((problem.file, problem.severity), ("bad.yaml", "error"))
        self.assertEqual((problem.line, problem.column), (3, 2))
        self.assertIn("YAML syntax error", problem.message)

    def test_bad_indentation(self) -> None:
        """A mis-indented key is located on its line."""
        loaded = load_text("spec:\n  a: 1\n b: 2\n", "bad.yaml")
        self.assertTrue(loaded.failed)
        self.assertEqual(loaded.problems[0].line, 3)

    def test_duplicate_key(self) -> None:
        """A repeated key is an error located at the second occurrence."""
        loaded = load_text("a: 1\nb: 2\na: 3\n", "dup.yaml")
        self.assertTrue(loaded.failed)
        self.assertEqual((loaded.problems[0].line, loaded.problems[0].column), (3, 1))
        self.assertIn("duplicate key 'a'", loaded.problems[0].message)

    def test_recursive_alias(self) -> None:
        """A self-referencing alias is an error, not infinite recursion."""
        loaded = load_text("a: &x [*x]\n", "r.yaml")
        self.assertTrue(loaded.failed)
        self.assertIn("recursive", loaded.problems[0].message)

    def test_alias_bomb(self) -> None:
        """Exponential alias expansion is bounded."""
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
        for i in range(1, 9):
            prev = f"*a{i - 1}"
            lines.append(f"a{i}: &a{i} [{', '.join([prev] * 10)}]")
        loaded = load_text("\n".join(lines) + "\n", "bomb.yaml")
        self.assertTrue(loaded.failed)
        self.assertIn("more than", loaded.problems[0].message)

    def test_unknown_tag(self) -> None:
        """An application tag (`!Ref`) is an error, located."""
        loaded = load_text("a: 1\nb: !Ref x\n", "t.yaml")
        self.assertTrue(loaded.failed)
        self.assertEqual(loaded.problems[0].line, 2)

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=200))
    def test_never_raises_on_arbitrary_text(self, text: str) -> None:
        """load_text returns (documents or problems) for any input."""
        loaded = load_text(text, "any.yaml")
        self.assertTrue(loaded.failed or loaded.problems == ())

    @settings(max_examples=200, deadline=None)
    @given(st.text(alphabet="ab:-[]{}&*!|>'\"\n #,?%@`\t", max_size=120))
    def test_never_raises_on_yamlish_text(self, text: str) -> None:
        """load_text survives text made of YAML punctuation."""
        loaded = load_text(text, "any.yaml")
        self.assertTrue(loaded.failed or loaded.problems == ())


class FileTests(TestCase):
    """Discovery and reading of files."""

    def test_recursive_sorted(self) -> None:
        """*.yaml and *.yml below the directory, recursively and sorted; other files ignored."""
        root = write_conf(
            self,
            {
                "b.yaml": "a: 1\n",
                "a/z.yml": "a: 1\n",
                "a/b.txt": "x",
                "c.yaml.bak": "x",
                ".h.yaml": "",
            },
        )
        files, problems = discover_files([root])
        self.assertEqual(problems, [])
        self.assertEqual(
            [os.path.relpath(f, root) for f in files], [os.path.join("a", "z.yml"), "b.yaml"]
        )

    def test_missing_directory(self) -> None:
        """A missing directory is an error, not an exception."""
        files, problems = discover_files([os.path.join(self.mktemp(), "nope")])
        self.assertEqual(files, [])
        self.assertEqual(problems[0].message, "configuration directory not found")

    def test_not_utf8(self) -> None:
        """A non-UTF-8 file is a problem."""
        root = write_conf(self, {})
        path = os.path.join(root, "x.yaml")
        with open(path, "wb") as handle:
            handle.write(b"a: \xff\xfe\n")
        loaded = load_file(path)
        self.assertTrue(loaded.failed)
        self.assertIn("UTF-8", loaded.problems[0].message)


class KubernetesListTests(SynchronousTestCase):
    """`kind: List` and typed `<Kind>List` documents unwrap into one document per item."""

    def test_kubectl_list_items_located(self) -> None:
        """Each item of kubectl's List is a document located where it is written in the file."""
        loaded = load_text(KUBECTL_GET_LIST.format(path_type="Prefix"), "cluster.yaml")
        self.assertFalse(loaded.failed)
        self.assertEqual(loaded.problems, ())
        kinds = [d.value["kind"] for d in loaded.documents]
        self.assertEqual(kinds, ["Ingress", "Service", "Endpoints", "Secret"])
        ingress, service = loaded.documents[0], loaded.documents[1]
        self.assertEqual(ingress.origin, "cluster.yaml")
        self.assertEqual(ingress.locate(()), (3, 3))
        self.assertEqual(ingress.marks[("kind",)], (4, 9))
        self.assertEqual(ingress.key_marks[("spec", "ingressClassName")], (13, 5))
        self.assertEqual(ingress.marks[("spec", "rules", 0, "http", "paths", 0, "pathType")], (24, 21))
        self.assertIn(("spec", "ingressClassName"), ingress.plain)
        self.assertEqual(service.marks[("spec", "clusterIP")], (38, 16))
        self.assertNotIn(("items",), ingress.marks)

    def test_typed_list_items_take_kind_and_api_version(self) -> None:
        """Items of an `IngressList` (the API omits their kind) are Ingresses of the list's group."""
        text = (
            "apiVersion: networking.k8s.io/v1\nkind: IngressList\nmetadata: {resourceVersion: '7'}\n"
            "items:\n- metadata: {name: a}\n- kind: Ingress\n  apiVersion: v1\n  metadata: {name: b}\n"
        )
        documents = load_text(text, "l.yaml").documents
        self.assertEqual(
            [(d.value["apiVersion"], d.value["kind"]) for d in documents],
            [("networking.k8s.io/v1", "Ingress"), ("v1", "Ingress")],
        )
        self.assertEqual(documents[0].locate(("kind",)), (5, 3))

    def test_items_not_a_sequence(self) -> None:
        """`items` that is not a sequence is an error located at it; nothing is read."""
        loaded = load_text("apiVersion: v1\nkind: List\nitems: {a: 1}\n", "l.yaml")
        self.assertEqual(loaded.documents, ())
        [problem] = loaded.problems
        self.assertEqual((problem.severity, problem.line, problem.column), ("error", 3, 1))
        self.assertIn("'items' of a List must be a sequence", problem.message)

    def test_empty_lists_and_other_documents(self) -> None:
        """An empty or item-less List holds nothing; documents around a List are kept in order."""
        text = "kind: List\nitems: []\n---\nkind: List\n---\na: 1\n---\nkind: List\nitems: [{b: 2}]\n"
        loaded = load_text(text, "l.yaml")
        self.assertEqual([d.value for d in loaded.documents], [{"a": 1}, {"b": 2}])
        self.assertEqual(loaded.documents[1].marks[()], (9, 9))
