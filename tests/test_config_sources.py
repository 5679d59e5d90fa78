"""Config sources: the pipeline takes resources from any ConfigSource, each carrying its origin."""

from __future__ import annotations

import attrs
import yaml
from twisted.trial.unittest import SynchronousTestCase

from flexgw.config.pipeline import load_config
from flexgw.config.sources import Document, Snapshot, Unit
from flexgw.config.sources.files import FileSource
from tests.conftools import api, route, service, write_conf


@attrs.frozen
class MemorySource:
    """A source holding documents without positions, as a Kubernetes API or etcd source would."""

    units: tuple[Unit, ...]

    def read(self) -> Snapshot:
        """The units, as they are."""
        return Snapshot(self.units)

    def watcher(self, *args: object, **kwargs: object) -> None:  # pragma: no cover - not watched
        """Never asked in these tests."""


def _object(origin: str, text: str) -> Unit:
    """One unit holding the resource `text` describes as one position-less document (like an
    API object's JSON), named by `origin`."""
    return Unit(origin, (Document(origin=origin, index=0, value=yaml.safe_load(text)),), (), False)


class SourceTests(SynchronousTestCase):
    """load_config reads any source; problems name the origin, with line:column when known."""

    def test_other_source_compiles(self) -> None:
        """Resources from a non-file source compile into the same plan as from files."""
        docs = {"api": api("a", "http://0.0.0.0:8080"), "svc": service("s", "http://one:80"),
                "route": route("r", "a", "s")}
        source = MemorySource(tuple(_object(f"etcd:/flexgw/{k}", v) for k, v in docs.items()))
        state = load_config(source, {})
        self.assertEqual(state.errors, ())
        [listener] = state.plan.listeners
        self.assertEqual(listener.apis[0].routes[0].destinations[0].upstream.host, "one")
        self.assertEqual(state.origins["etcd:/flexgw/svc"], tuple(r for r in state.resources if r.name == "s"))

    def test_error_names_origin_without_position(self) -> None:
        """A bad resource from a position-less source is reported as "<origin>: error: ...", its
        name said once when the origin is the resource itself (an API object)."""
        source = MemorySource((_object("Service default/s", service("s", "ftp://two:80")),))
        state = load_config(source, {})
        [error] = state.errors
        self.assertEqual((error.file, error.line, error.column), ("Service default/s", None, None))
        self.assertEqual(str(error), "Service default/s: error: spec.address: unsupported scheme 'ftp'"
                         " (expected http, https, h2c or h2)")

    def test_file_source_keeps_file_line_column(self) -> None:
        """The file source is one source: its problems still read file:line:column."""
        root = write_conf(self, {"svc.yaml": service("s", "ftp://two:80")})
        via_dirs = load_config([root], {})
        via_source = load_config(FileSource([root]), {})
        self.assertEqual([str(p) for p in via_dirs.errors], [str(p) for p in via_source.errors])
        [error] = via_source.errors
        self.assertTrue(str(error).startswith(f"{root}/svc.yaml:"), str(error))
        self.assertIsNotNone(error.line)
