"""Kubernetes Ingress translation, in memory: hosts, path types, precedence, conflicts, classes,
listener binding, Service/port resolution, TLS Secrets and schema errors with their locations."""

from __future__ import annotations

import base64
import datetime
import io
import random
import textwrap

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from flexgw.cli import main
from flexgw.config.compile import compile_model
from flexgw.config.ingress import (
    IngressOptions,
    apply_ingress,
    ingress_options,
)
from flexgw.config.load import load_text
from flexgw.config.pipeline import load_config
from flexgw.config.resolve import ResolvedModel, resolve
from flexgw.config.validate import Resource, check_document
from flexgw.ingress.routing import RouteMatch, select_route
from flexgw.plan import Endpoint, Listener, Problem
from flexgw.tap import Options, worker_command
from flexgw.testing.certs import CertificateAuthority
from tests.conftools import update_conf, write_conf

FILE = "conf/ingress.yaml"


class Translated:
    """The outcome of translating one YAML text: model, listeners and every problem."""

    def __init__(self, text: str, options: IngressOptions | None = None) -> None:
        loaded = load_text(textwrap.dedent(text).lstrip("\n"), FILE)
        assert not loaded.failed, loaded.problems
        self.problems: list[Problem] = []
        resources: list[Resource] = []
        for document in loaded.documents:
            checked = check_document(document, {})
            self.problems.extend(checked.problems)
            if checked.resource is not None:
                resources.append(checked.resource)
        model = resolve(resources, {})
        self.model: ResolvedModel = apply_ingress(model, resources, options)
        compiled = compile_model(self.model)
        self.listeners = compiled.listeners
        self.problems.extend(compiled.problems)

    def listener(self, port: int) -> Listener:
        """The listener on `port`."""
        for listener in self.listeners:
            if listener.port == port:
                return listener
        raise AssertionError(f"no listener on {port}: {[(l.host, l.port) for l in self.listeners]}")

    def route(self, path: str, host: str = "example.com", port: int = 8080) -> RouteMatch | None:
        """Where a GET of `path` for `host` on `port` goes (None: 404)."""
        return select_route(self.listener(port), "GET", path, host, [], random.Random(0))

    def target(self, path: str, host: str = "example.com", port: int = 8080) -> str | None:
        """`upstream-key path` of the route a request takes, None for no route."""
        match = self.route(path, host, port)
        if match is None:
            return None
        return f"{match.destination.upstream.key} {match.upstream_path}"

    def messages(self, severity: str) -> list[str]:
        """The problems of one severity, as `validate` prints them."""
        return [str(p) for p in self.problems if p.severity == severity]


def ingress(
    name: str,
    rules: str = "",
    *,
    namespace: str = "default",
    klass: str | None = "flexgw",
    created: str | None = None,
    annotations: str = "",
    spec: str = "",
) -> str:
    """An Ingress document; `rules` are YAML lines under `spec.rules` (indented 2)."""
    meta = f"metadata:\n  name: {name}\n  namespace: {namespace}\n"
    if created:
        meta += f'  creationTimestamp: "{created}"\n'
    if annotations:
        meta += (
            "  annotations:\n"
            + textwrap.indent(textwrap.dedent(annotations).strip("\n"), "    ")
            + "\n"
        )
    body = "spec:\n"
    if klass:
        body += f"  ingressClassName: {klass}\n"
    if spec:
        body += textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ") + "\n"
    if rules:
        body += "  rules:\n" + textwrap.indent(textwrap.dedent(rules).strip("\n"), "  ") + "\n"
    return f"---\napiVersion: networking.k8s.io/v1\nkind: Ingress\n{meta}{body}"


def path_rule(
    path: str | None,
    path_type: str = "Prefix",
    service: str = "web",
    port: str = "number: 80",
    host: str | None = None,
) -> str:
    """One rule with one path (YAML, indented 0)."""
    out = f"- host: {host}\n  http:\n" if host else "- http:\n"
    out += "    paths:\n"
    out += f"    - pathType: {path_type}\n"
    if path is not None:
        out += f"      path: {path}\n"
    out += f"      backend:\n        service: {{name: {service}, port: {{{port}}}}}\n"
    return out


def kube_service(
    name: str = "web",
    ports: str = "- {name: http, port: 80, targetPort: 8080}",
    namespace: str = "default",
    extra: str = "clusterIP: 10.0.0.7",
) -> str:
    """A v1 Service document."""
    return (
        f"---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
        "spec:\n" + textwrap.indent(extra + "\nports:\n" + ports, "  ") + "\n"
    )


SERVICE = kube_service()
API = """\
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata: {name: ingress-http, namespace: edge}
spec:
  address: http://0.0.0.0:8081
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata: {name: tag, namespace: edge}
spec:
  targetRef: {kind: ApiInstance, name: ingress-http}
  policyRef: {name: header-injection-flex}
  config:
    inboundHeaders: [{key: x-edge, value: "yes"}]
"""
BOUND = 'flex-gateway.ingress.kubernetes.io/api-instance: "ingress-http.edge"'


def certificate(names: tuple[str, ...] = ("foo.com",)) -> tuple[bytes, bytes]:
    """A fresh self-signed (certificate, key) pair in PEM for `names`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def tls_secret(
    cert: bytes, key: bytes, name: str = "foo-tls", kind: str = "kubernetes.io/tls"
) -> str:
    """A Secret document holding `cert` and `key` base64-encoded in `data`."""
    return (
        f"---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}}}\ntype: {kind}\ndata:\n"
        f"  tls.crt: {base64.b64encode(cert).decode()}\n"
        f"  tls.key: {base64.b64encode(key).decode()}\n"
    )


class HostTests(SynchronousTestCase):
    """rules[].host: exact, `*.` one-label wildcard, absent."""

    def test_exact_host(self) -> None:
        """An exact host matches itself (any port, any case), nothing else."""
        t = Translated(SERVICE + ingress("a", path_rule("/", host="foo.com")))
        self.assertEqual(t.target("/x", "foo.com"), "default/web:80 /x")
        self.assertEqual(t.target("/x", "FOO.com:8080"), "default/web:80 /x")
        self.assertIsNone(t.target("/x", "bar.com"))
        self.assertIsNone(t.target("/x", "a.foo.com"))

    def test_wildcard_is_one_label(self) -> None:
        """`*.foo.com` matches bar.foo.com, not foo.com nor baz.bar.foo.com (Kubernetes' rule)."""
        t = Translated(SERVICE + ingress("a", path_rule("/", host="'*.foo.com'")))
        self.assertEqual(t.target("/", "bar.foo.com"), "default/web:80 /")
        self.assertIsNone(t.target("/", "foo.com"))
        self.assertIsNone(t.target("/", "baz.bar.foo.com"))
        self.assertIsNone(t.target("/", "barfoo.com"))

    def test_exact_host_before_wildcard(self) -> None:
        """An exact host's rule is tried before a wildcard's, whatever the order written."""
        rules = path_rule("/", host="'*.foo.com'", service="wild") + path_rule(
            "/", host="a.foo.com", service="web"
        )
        t = Translated(SERVICE + kube_service("wild") + ingress("a", rules))
        self.assertEqual(t.target("/", "a.foo.com"), "default/web:80 /")
        self.assertEqual(t.target("/", "b.foo.com"), "default/wild:80 /")

    @settings(max_examples=60, deadline=None)  # a whole translation per example
    @given(
        st.lists(st.sampled_from(["a", "b", "x-y", "foo"]), min_size=1, max_size=3),
        st.lists(st.sampled_from(["a", "b", "x-y", "foo", "A"]), min_size=0, max_size=4),
    )
    def test_wildcard_matches_exactly_one_more_label(
        self, suffix: list[str], labels: list[str]
    ) -> None:
        """`*.<suffix>` matches a host iff it is one label followed by the suffix (any case)."""
        t = Translated(SERVICE + ingress("a", path_rule("/", host=f"'*.{'.'.join(suffix)}'")))
        host = ".".join(labels)
        lowered = host.lower().split(".") if host else []
        expected = len(lowered) == len(suffix) + 1 and lowered[1:] == suffix
        self.assertEqual(t.route("/", host or "x") is not None, expected and bool(host), host)

    def test_no_host_matches_every_host(self) -> None:
        """A rule without host serves every Host, after the rules that name one."""
        rules = path_rule("/", service="wild") + path_rule("/", host="a.com")
        t = Translated(SERVICE + kube_service("wild") + ingress("a", rules))
        self.assertEqual(t.target("/", "a.com"), "default/web:80 /")
        self.assertEqual(t.target("/", "anything.example"), "default/wild:80 /")


class PathTypeTests(SynchronousTestCase):
    """pathType Exact, Prefix (element-wise) and ImplementationSpecific (Flex regex + rewrite)."""

    def test_exact(self) -> None:
        """Exact /foo matches /foo only; the path reaches the upstream unchanged."""
        t = Translated(SERVICE + ingress("a", path_rule("/foo", "Exact")))
        self.assertEqual(t.target("/foo"), "default/web:80 /foo")
        self.assertIsNone(t.target("/foo/"))
        self.assertIsNone(t.target("/foo/bar"))
        self.assertIsNone(t.target("/fo"))

    def test_prefix_is_element_wise(self) -> None:
        """Prefix /foo matches /foo, /foo/ and /foo/bar, not /foobar; a trailing slash is ignored."""
        for written in ("/foo", "/foo/"):
            t = Translated(SERVICE + ingress("a", path_rule(written)))
            self.assertEqual(t.target("/foo"), "default/web:80 /foo")
            self.assertEqual(t.target("/foo/"), "default/web:80 /foo/")
            self.assertEqual(t.target("/foo/bar/baz"), "default/web:80 /foo/bar/baz")
            self.assertIsNone(t.target("/foobar"))
            self.assertIsNone(t.target("/"))

    def test_prefix_root_matches_everything(self) -> None:
        """Prefix / matches every path."""
        t = Translated(SERVICE + ingress("a", path_rule("/")))
        self.assertEqual(t.target("/"), "default/web:80 /")
        self.assertEqual(t.target("/a/b"), "default/web:80 /a/b")

    def test_regex_special_characters_are_literal(self) -> None:
        """Exact and Prefix paths are literal: a dot matches only a dot."""
        t = Translated(SERVICE + ingress("a", path_rule("/v1.0") + path_rule("/a+b", "Exact")))
        self.assertEqual(t.target("/v1.0/x"), "default/web:80 /v1.0/x")
        self.assertIsNone(t.target("/v1x0/x"))
        self.assertEqual(t.target("/a+b"), "default/web:80 /a+b")
        self.assertIsNone(t.target("/aab"))

    def test_implementation_specific_rewrites_with_groups(self) -> None:
        """ImplementationSpecific is Flex's full-match regex; capture groups become the path."""
        rules = path_rule("'/api/orders(/.*)'", "ImplementationSpecific") + path_rule(
            "'/static/.*'", "ImplementationSpecific"
        )
        t = Translated(SERVICE + ingress("a", rules))
        self.assertEqual(t.target("/api/orders/7"), "default/web:80 /7")
        self.assertEqual(t.target("/static/app.js"), "default/web:80 /static/app.js")
        self.assertIsNone(t.target("/api/orders"))
        self.assertIsNone(t.target("/other"))

    @settings(max_examples=60, deadline=None)  # a whole translation per example
    @given(
        st.lists(st.sampled_from(["a", "b", "ab", "a.b"]), min_size=1, max_size=3),
        st.lists(st.sampled_from(["a", "b", "ab", "a.b", ""]), max_size=4),
    )
    def test_prefix_matches_iff_segments_are_a_prefix(
        self, prefix: list[str], request: list[str]
    ) -> None:
        """Prefix matching is exactly "the path's /-separated elements start with the prefix's"."""
        t = Translated(SERVICE + ingress("a", path_rule("/" + "/".join(prefix))))
        path = "/" + "/".join(request)
        elements = [e for e in path.split("/") if e]
        expected = elements[: len(prefix)] == prefix and "//" not in path
        if "//" in path:  # an empty element: Kubernetes splits on '/' too; skip the ambiguity
            return
        self.assertEqual(t.route(path) is not None, expected, (prefix, path))


class PrecedenceTests(SynchronousTestCase):
    """Kubernetes precedence: longest path, Exact over Prefix, then the oldest Ingress."""

    def test_longest_path_wins_whatever_the_order(self) -> None:
        """Across Ingresses and rules, the longest matching path is used."""
        text = (
            SERVICE
            + kube_service("deep")
            + ingress("short", path_rule("/a"), created="2020-01-01T00:00:00Z")
            + ingress("long", path_rule("/a/b", service="deep"), created="2024-01-01T00:00:00Z")
        )
        t = Translated(text)
        self.assertEqual(t.target("/a/b/c"), "default/deep:80 /a/b/c")
        self.assertEqual(t.target("/a/c"), "default/web:80 /a/c")
        self.assertEqual(t.messages("warning"), [])

    def test_exact_before_prefix_for_the_same_path(self) -> None:
        """At equal length an Exact path is preferred to a Prefix one; both are served."""
        rules = path_rule("/a", service="deep") + path_rule("/a", "Exact")
        t = Translated(SERVICE + kube_service("deep") + ingress("x", rules))
        self.assertEqual(t.target("/a"), "default/web:80 /a")
        self.assertEqual(t.target("/a/b"), "default/deep:80 /a/b")

    def test_conflict_oldest_wins_and_loser_is_reported(self) -> None:
        """The same host+path in two Ingresses: the older one serves it, the newer is a warning."""
        text = (
            SERVICE
            + kube_service("other")
            + ingress(
                "newer",
                path_rule("/a", host="h.com", service="other"),
                created="2024-05-01T00:00:00Z",
            )
            + ingress("older", path_rule("/a/", host="h.com"), created="2021-05-01T00:00:00+00:00")
        )
        t = Translated(text)
        self.assertEqual(t.target("/a/x", "h.com"), "default/web:80 /a/x")
        warnings = [p for p in t.problems if p.severity == "warning"]
        self.assertEqual(len(warnings), 1)
        line = text.splitlines().index("  - host: h.com") + 1  # the newer Ingress' rule
        self.assertEqual((warnings[0].file, warnings[0].resource), (FILE, "Ingress default/newer"))
        self.assertEqual(warnings[0].field, "spec.rules[0].http.paths[0]")
        self.assertEqual(warnings[0].line, line + 3)
        self.assertIn(
            "Prefix path '/a' for host h.com is already served by default/older",
            warnings[0].message,
        )

    def test_conflict_tie_broken_by_namespace_and_name(self) -> None:
        """Without timestamps (or equal ones), namespace/name decides; file order does not."""
        text = (
            SERVICE.replace("namespace: default", "namespace: b")
            + SERVICE.replace("namespace: default", "namespace: a")
            + ingress("z", path_rule("/", host="h.com"), namespace="b")
            + ingress("y", path_rule("/", host="h.com"), namespace="a")
        )
        t = Translated(text)
        self.assertEqual(t.target("/", "h.com"), "a/web:80 /")
        self.assertEqual(
            [p.resource for p in t.problems if p.severity == "warning"], ["Ingress b/z"]
        )

    def test_timestamped_beats_untimestamped(self) -> None:
        """An Ingress without creationTimestamp counts as the newest."""
        text = (
            SERVICE
            + kube_service("other")
            + ingress("a", path_rule("/", service="other"))
            + ingress("b", path_rule("/"), created="2030-01-01T00:00:00Z")
        )
        self.assertEqual(Translated(text).target("/"), "default/web:80 /")

    def test_default_backend_is_last_and_unique(self) -> None:
        """defaultBackend catches what no rule matches; a second one (newer) is a warning."""
        text = (
            SERVICE
            + kube_service("fallback")
            + ingress(
                "a",
                path_rule("/api"),
                spec="defaultBackend: {service: {name: fallback, port: {number: 80}}}",
                created="2020-01-01T00:00:00Z",
            )
            + ingress("b", spec="defaultBackend: {service: {name: web, port: {number: 80}}}")
        )
        t = Translated(text)
        self.assertEqual(t.target("/api/x"), "default/web:80 /api/x")
        self.assertEqual(t.target("/other"), "default/fallback:80 /other")
        warnings = [p for p in t.problems if p.severity == "warning"]
        self.assertEqual(
            [(w.resource, w.field) for w in warnings],
            [("Ingress default/b", "spec.defaultBackend")],
        )
        self.assertIn(
            "default backend is already served by default/a:spec.defaultBackend",
            warnings[0].message,
        )

    def test_host_without_paths_uses_the_default_backend(self) -> None:
        """A rule with a host and no http sends that host's requests to the default backend."""
        text = SERVICE + ingress(
            "a",
            "- host: only.com\n",
            spec="defaultBackend: {service: {name: web, port: {number: 80}}}",
        )
        t = Translated(text)
        self.assertEqual(t.target("/x", "only.com"), "default/web:80 /x")
        self.assertEqual(t.messages("warning"), [])


class ClassTests(SynchronousTestCase):
    """Which Ingresses flexgw serves: its class, or none when it is the default class."""

    def test_other_class_is_an_info_note(self) -> None:
        """An Ingress of another class is ignored with an info note at ingressClassName."""
        t = Translated(SERVICE + ingress("a", path_rule("/"), klass="nginx"))
        self.assertEqual(t.listeners, ())
        [note] = [p for p in t.problems if p.severity == "info"]
        self.assertEqual(note.field, "spec.ingressClassName")
        self.assertIn(
            "ingress class 'nginx' is not served by flexgw ('flexgw'); ignored", note.message
        )
        self.assertEqual([p for p in t.problems if p.severity != "info"], [])

    def test_configured_class(self) -> None:
        """--ingress-class names the class flexgw serves."""
        text = SERVICE + ingress("a", path_rule("/"), klass="edge")
        self.assertEqual(Translated(text).listeners, ())
        t = Translated(text, ingress_options("edge", False, "http://0.0.0.0:8080"))
        self.assertEqual(t.target("/"), "default/web:80 /")

    def test_no_class_needs_default(self) -> None:
        """Without a class the Ingress is served only when flexgw is the default class."""
        text = SERVICE + ingress("a", path_rule("/"), klass=None)
        t = Translated(text)
        self.assertEqual(t.listeners, ())
        self.assertIn(
            "has no ingress class and flexgw is not the default class", t.messages("info")[0]
        )
        t = Translated(text, ingress_options("flexgw", True, "http://0.0.0.0:8080"))
        self.assertEqual(t.target("/"), "default/web:80 /")

    def test_default_ingress_class_document(self) -> None:
        """An IngressClass for controller flexgw marked default makes flexgw the default class."""
        klass = (
            "---\napiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata:\n  name: gw\n"
            '  annotations:\n    ingressclass.kubernetes.io/is-default-class: "true"\n'
            "spec:\n  controller: {controller}\n"
        )
        text = (
            SERVICE
            + ingress("a", path_rule("/"), klass=None)
            + ingress("b", path_rule("/b"), klass="gw")
        )
        t = Translated(text + klass.format(controller="flexgw"))
        self.assertEqual(t.target("/x"), "default/web:80 /x")
        self.assertEqual(t.target("/b"), "default/web:80 /b")  # its name is served too
        t = Translated(text + klass.format(controller="k8s.io/ingress-nginx"))
        self.assertEqual(t.listeners, ())
        self.assertEqual(len(t.messages("info")), 2)

    def test_legacy_class_annotation(self) -> None:
        """The kubernetes.io/ingress.class annotation counts when ingressClassName is absent."""
        text = SERVICE + ingress(
            "a", path_rule("/"), klass=None, annotations="kubernetes.io/ingress.class: other"
        )
        t = Translated(text, ingress_options("flexgw", True, "http://0.0.0.0:8080"))
        self.assertEqual(t.listeners, ())
        self.assertEqual(t.problems[0].field, "metadata.annotations.kubernetes.io/ingress.class")


class BindingTests(SynchronousTestCase):
    """The api-instance annotation binds an Ingress to an ApiInstance; else the default listener."""

    def test_annotation_binds_listener_and_policies(self) -> None:
        """Routes join the ApiInstance: its port, and its policies in every destination's chain."""
        t = Translated(API + SERVICE + ingress("a", path_rule("/"), annotations=BOUND))
        self.assertEqual([listener.port for listener in t.listeners], [8081])
        match = t.route("/x", port=8081)
        assert match is not None
        self.assertEqual(match.api.key, "edge/ingress-http")
        self.assertEqual(match.destination.upstream.key, "default/web:80")
        self.assertEqual([p.kind for p in match.destination.chain], ["header-injection-flex"])

    def test_bare_name_means_the_ingress_namespace(self) -> None:
        """An annotation without `.<namespace>` names an ApiInstance of the Ingress' namespace."""
        text = (
            API
            + SERVICE.replace("namespace: default", "namespace: edge")
            + ingress(
                "a",
                path_rule("/"),
                namespace="edge",
                annotations="flex-gateway.ingress.kubernetes.io/api-instance: ingress-http",
            )
        )
        t = Translated(text)
        self.assertEqual(t.target("/", port=8081), "edge/web:80 /")
        t = Translated(
            text.replace("namespace: edge\n  annotations", "namespace: other\n  annotations")
        )
        self.assertIn("ApiInstance other/ingress-http does not exist", t.messages("error")[0])

    def test_missing_api_instance_is_an_error(self) -> None:
        """An annotation naming no ApiInstance is an error located at the annotation."""
        bad = BOUND.replace("ingress-http.edge", "nope.edge")
        t = Translated(API + SERVICE + ingress("a", path_rule("/"), annotations=bad))
        [error] = t.messages("error")
        self.assertIn("metadata.annotations.flex-gateway.ingress.kubernetes.io/api-instance", error)
        self.assertIn("ApiInstance edge/nope does not exist; this Ingress is not served", error)
        self.assertEqual(t.listener(8081).apis[0].routes, ())

    def test_default_listener(self) -> None:
        """Without the annotation the Ingress is served on --ingress-listener."""
        options = ingress_options("flexgw", False, "http://127.0.0.1:9444")
        t = Translated(SERVICE + ingress("a", path_rule("/")), options)
        self.assertEqual([(l.host, l.port) for l in t.listeners], [("127.0.0.1", 9444)])
        self.assertEqual(t.target("/", port=9444), "default/web:80 /")

    def test_default_listener_on_an_api_instance_port(self) -> None:
        """--ingress-listener on an ApiInstance's port: the ApiInstance keeps it, and each
        unannotated Ingress gets an error saying what to do; annotated ones still serve."""
        options = ingress_options("flexgw", False, "http://0.0.0.0:8081")
        text = (
            API
            + SERVICE
            + ingress("a", path_rule("/a"), annotations=BOUND)
            + ingress("b", path_rule("/b"))
        )
        t = Translated(text, options)
        [error] = [p for p in t.problems if p.severity == "error"]
        self.assertEqual(error.resource, "Ingress default/b")
        self.assertIn(
            "--ingress-listener http://0.0.0.0:8081 is on the port of ApiInstance edge/ingress-http; "
            "not served there (annotate the Ingress, or choose another --ingress-listener)",
            error.message,
        )
        self.assertEqual([api.key for api in t.listener(8081).apis], ["edge/ingress-http"])
        self.assertEqual(t.target("/a", port=8081), "default/web:80 /a")
        self.assertIsNone(t.target("/b", port=8081))

    def test_same_path_on_two_listeners_is_no_conflict(self) -> None:
        """Conflicts are per listener: the same path bound elsewhere is served on both."""
        text = (
            API
            + SERVICE
            + ingress("a", path_rule("/"), annotations=BOUND)
            + ingress("b", path_rule("/"))
        )
        t = Translated(text)
        self.assertEqual(t.target("/", port=8081), "default/web:80 /")
        self.assertEqual(t.target("/", port=8080), "default/web:80 /")
        self.assertEqual(t.messages("warning"), [])

    def test_bad_options(self) -> None:
        """Option values are checked: listener schemes, malformed or equal listeners, empty class."""
        plain, tls = "http://0.0.0.0:8080", "https://0.0.0.0:8443"
        for args in (
            ("flexgw", False, tls),
            ("flexgw", False, "0.0.0.0"),
            (" ", False, plain),
            ("flexgw", False, plain, plain),
            ("flexgw", False, plain, "https://0.0.0.0:8080"),
        ):
            self.assertRaises(ValueError, ingress_options, *args)
        options = ingress_options("flexgw", False, plain, "https://127.0.0.1:9443")
        self.assertEqual(
            (options.tls_listener.host, options.tls_listener.port), ("127.0.0.1", 9443)
        )


class BackendTests(SynchronousTestCase):
    """backend.service resolved through a v1 Service (and its endpoints) or a flexgw Service."""

    def upstreams(self, text: str) -> list[tuple[str, str, int, int]]:
        """(scheme, host, port, weight) of the destinations of the route for `/`."""
        t = Translated(text)
        match = t.route("/")
        assert match is not None, t.problems
        return [
            (d.upstream.scheme, d.upstream.host, d.upstream.port, d.weight)
            for d in match.route.destinations
        ]

    def test_cluster_ip_by_number_and_name(self) -> None:
        """port.number and port.name find the same Service port; clusterIP is the host."""
        for port in ("number: 80", "name: http"):
            text = SERVICE + ingress("a", path_rule("/", port=port))
            self.assertEqual(self.upstreams(text), [("http", "10.0.0.7", 80, 100)])

    def test_cluster_dns_by_default(self) -> None:
        """Without clusterIP the upstream is the cluster DNS name at the Service port."""
        text = kube_service(namespace="shop", extra="type: ClusterIP") + ingress(
            "a", path_rule("/"), namespace="shop"
        )
        self.assertEqual(self.upstreams(text), [("http", "web.shop.svc.cluster.local", 80, 100)])

    def test_headless_uses_target_port(self) -> None:
        """A headless Service's DNS name resolves to pods: the target port is used."""
        text = kube_service(extra="clusterIP: None") + ingress("a", path_rule("/"))
        self.assertEqual(
            self.upstreams(text), [("http", "web.default.svc.cluster.local", 8080, 100)]
        )

    def test_external_name(self) -> None:
        """An ExternalName Service routes to its external name."""
        text = kube_service(
            extra="type: ExternalName\nexternalName: api.partner.example"
        ) + ingress("a", path_rule("/"))
        self.assertEqual(self.upstreams(text), [("http", "api.partner.example", 80, 100)])

    def test_scheme_from_port_name_and_app_protocol(self) -> None:
        """appProtocol, else the port name `<protocol>[-suffix]`, selects the upstream scheme."""
        cases = {
            "- {name: https-web, port: 443}": "https",
            "- {name: web, port: 443, appProtocol: https}": "https",
            "- {name: HTTP-alt, port: 443}": "http",
            "- {port: 443}": "http",
            "- {name: h2, port: 443}": "h2",
            "- {name: h2c-grpc, port: 443}": "h2c",
            "- {name: grpc, port: 443}": "h2c",
            "- {name: web, port: 443, appProtocol: kubernetes.io/h2c}": "h2c",
        }
        for ports, scheme in cases.items():
            text = kube_service(ports=ports) + ingress("a", path_rule("/", port="number: 443"))
            t = Translated(text)
            self.assertEqual(t.messages("error"), [], ports)
            self.assertEqual(self.upstreams(text)[0][0], scheme, ports)

    def test_endpoints(self) -> None:
        """An Endpoints document gives one upstream whose balanced addresses are the ready
        ones (flexgw.upstream.cluster: one pool each, round robin), named by the Service's
        cluster DNS name at the Service port (the Host and TLS name of every address)."""
        endpoints = (
            "---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: web}\nsubsets:\n"
            "- addresses: [{ip: 10.1.0.1}, {ip: 10.1.0.2}]\n"
            "  notReadyAddresses: [{ip: 10.1.0.9}]\n"
            "  ports: [{name: http, port: 8080}, {name: admin, port: 9000}]\n"
        )
        text = SERVICE + endpoints + ingress("a", path_rule("/"))
        self.assertEqual(self.upstreams(text), [("http", "web.default.svc.cluster.local", 80, 100)])
        match = Translated(text).route("/")
        assert match is not None
        balancing = match.route.destinations[0].upstream.balancing
        self.assertEqual(
            balancing.endpoints, (Endpoint("10.1.0.1", 8080), Endpoint("10.1.0.2", 8080))
        )
        self.assertEqual(balancing.algorithm, "roundRobin")

    def test_endpoint_slices(self) -> None:
        """EndpointSlices of the Service are used (ready endpoints only), before Endpoints;
        one ready address is a set of one (the Host stays the Service's name)."""
        slice_ = (
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
            "metadata: {name: web-abc, labels: {kubernetes.io/service-name: web}}\n"
            "addressType: IPv4\nports: [{name: http, port: 8081}]\nendpoints:\n"
            "- addresses: [10.2.0.1]\n  conditions: {ready: true}\n"
            "- addresses: [10.2.0.2]\n  conditions: {ready: false}\n"
        )
        text = SERVICE + slice_ + ingress("a", path_rule("/"))
        self.assertEqual(self.upstreams(text), [("http", "web.default.svc.cluster.local", 80, 100)])
        match = Translated(text).route("/")
        assert match is not None
        balancing = match.route.destinations[0].upstream.balancing
        self.assertEqual(balancing.endpoints, (Endpoint("10.2.0.1", 8081),))

    def test_no_ready_endpoint_is_an_error(self) -> None:
        """Endpoints with no ready address: the path is not served, and the error says why."""
        endpoints = "---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: web}\nsubsets: []\n"
        t = Translated(SERVICE + endpoints + ingress("a", path_rule("/")))
        self.assertIsNone(t.route("/"))
        self.assertIn("has no ready address for this port in its Endpoints", t.messages("error")[0])

    def test_flex_service_fallback(self) -> None:
        """Without a v1 Service, a flexgw Service of the same name (and namespace) is used."""
        flex = (
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: Service\nmetadata: {name: web}\n"
            "spec: {address: 'https://backend.internal:9443/base'}\n"
        )
        t = Translated(flex + ingress("a", path_rule("/")))
        self.assertEqual(t.target("/x"), "default/web /base/x")

    def test_unknown_service_and_port_are_located_errors(self) -> None:
        """A missing Service, or a port it lacks, is an error at the backend; the path is dropped."""
        text = SERVICE + ingress(
            "a", path_rule("/a", service="ghost") + path_rule("/b", port="number: 81")
        )
        t = Translated(text)
        errors = [p for p in t.problems if p.severity == "error"]
        self.assertEqual(
            [e.field for e in errors],
            [
                "spec.rules[0].http.paths[0].backend.service.name",
                "spec.rules[1].http.paths[0].backend.service.port",
            ],
        )
        self.assertIn("Service default/ghost not found", errors[0].message)
        self.assertIn("Service default/web has no port 81", errors[1].message)
        lines = text.splitlines()
        self.assertEqual(
            errors[0].line, lines.index("          service: {name: ghost, port: {number: 80}}") + 1
        )
        self.assertIsNone(t.route("/a"))
        self.assertIsNone(t.route("/b"))


class TlsSecretTests(SynchronousTestCase):
    """spec.tls[] with kubernetes.io/tls Secrets: decoded, checked, and served by SNI."""

    def tls_listener(self, t: Translated, port: int = 8443) -> Listener:
        """The TLS listener on `port`, checked to be one."""
        listener = t.listener(port)
        self.assertEqual(listener.scheme, "https")
        assert listener.tls is not None
        return listener

    def test_default_tls_listener_picks_certificates_by_sni(self) -> None:
        """Unannotated Ingresses with spec.tls get --ingress-tls-listener; SNI picks the host's."""
        foo_cert, foo_key = certificate(("foo.com", "www.foo.com"))
        bar_cert, bar_key = certificate(("bar.com",))
        text = (
            SERVICE
            + tls_secret(foo_cert, foo_key)
            + tls_secret(bar_cert, bar_key, name="bar-tls")
            + ingress(
                "a",
                path_rule("/", host="foo.com"),
                spec="tls: [{hosts: [foo.com], secretName: foo-tls}]",
                created="2020-01-01T00:00:00Z",
            )
            + ingress("b", path_rule("/b", host="bar.com"), spec="tls: [{secretName: bar-tls}]")
        )
        t = Translated(text)
        self.assertEqual(t.messages("error") + t.messages("warning"), [])
        listener = self.tls_listener(t)
        tls = listener.tls
        self.assertEqual([c.names for c in tls.certificates], [("foo.com",), ("bar.com",)])
        self.assertEqual(tls.certificates[0].chain_pem, (foo_cert,))  # the oldest is the default
        self.assertIsNotNone(tls.context_for(b"bar.com"))
        self.assertIsNone(tls.context_for(b"www.foo.com"))  # not in the Ingress' hosts: default
        self.assertEqual(t.target("/x", "foo.com", port=8443), "default/web:80 /x")
        self.assertEqual(t.target("/b", "bar.com", port=8443), "default/web:80 /b")
        self.assertEqual(t.listener(8080).scheme, "http")  # the plain listener stays
        self.assertEqual(t.target("/x", "foo.com", port=8080), "default/web:80 /x")

    def test_chain_and_traditional_key_format(self) -> None:
        """tls.crt may hold the chain (leaf first); a SEC1/PKCS#1 key is read and normalised."""
        ca = CertificateAuthority()
        leaf = ca.issue("foo.com", dns=["foo.com"])
        key = serialization.load_pem_private_key(leaf.key_pem, None)
        traditional = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        text = (
            SERVICE
            + tls_secret(leaf.cert_pem + ca.pem, traditional)
            + ingress("a", path_rule("/"), spec="tls: [{secretName: foo-tls}]")
        )
        t = Translated(text)
        self.assertEqual(t.messages("error"), [])
        [served] = self.tls_listener(t).tls.certificates
        self.assertEqual(served.chain_pem, (leaf.cert_pem, ca.pem))
        self.assertEqual(served.key_pem, leaf.key_pem)  # PKCS#8, as a tls binding's
        self.assertEqual(served.names, ("foo.com",))  # no hosts: the certificate's names

    def test_tls_listener_on_an_api_instance_port(self) -> None:
        """A taken --ingress-tls-listener port is an error; the plain listener still serves."""
        cert, key = certificate(("foo.com",))
        options = ingress_options("flexgw", False, "http://0.0.0.0:8080", "https://0.0.0.0:8081")
        text = (
            API
            + SERVICE
            + tls_secret(cert, key)
            + ingress("a", path_rule("/"), spec="tls: [{secretName: foo-tls}]")
        )
        t = Translated(text, options)
        [error] = t.messages("error")
        self.assertIn(
            "--ingress-tls-listener https://0.0.0.0:8081 is on the port of ApiInstance", error
        )
        self.assertEqual(t.target("/", port=8080), "default/web:80 /")
        self.assertEqual(t.listener(8081).scheme, "http")

    def test_no_tls_no_tls_listener(self) -> None:
        """Without spec.tls there is no TLS listener."""
        t = Translated(SERVICE + ingress("a", path_rule("/")))
        self.assertEqual([listener.port for listener in t.listeners], [8080])

    def test_https_api_instance_serves_ingress_certificates(self) -> None:
        """An https:// ApiInstance without a tls binding serves with its Ingresses' certificates."""
        cert, key = certificate(("foo.com",))
        api = API.replace("http://0.0.0.0:8081", "https://0.0.0.0:8443")
        text = (
            api
            + SERVICE
            + tls_secret(cert, key)
            + ingress(
                "a",
                path_rule("/", host="foo.com"),
                annotations=BOUND,
                spec="tls: [{hosts: [foo.com], secretName: foo-tls}]",
            )
        )
        t = Translated(text)
        self.assertEqual(t.messages("error") + t.messages("warning"), [])
        listener = self.tls_listener(t)
        self.assertEqual(listener.apis[0].key, "edge/ingress-http")
        self.assertIsNotNone(listener.tls.context_for(b"foo.com"))

    def test_tls_binding_keeps_its_settings_and_adds_ingress_certificates(self) -> None:
        """With a tls binding, its certificate is the default and its settings apply; the
        Ingress certificate is added for its host."""
        bound_cert, bound_key = certificate(("edge.example",))
        cert, key = certificate(("foo.com",))
        binding = (
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
            "metadata: {name: edge-tls, namespace: edge}\nspec:\n"
            "  targetRef: {kind: ApiInstance, name: ingress-http}\n  policyRef: {name: tls}\n"
            "  config:\n    minversion: '1.3'\n    certificate:\n      crt: |\n"
            + textwrap.indent(bound_cert.decode(), " " * 8)
            + "      key: |\n"
            + textwrap.indent(bound_key.decode(), " " * 8)
        )
        api = API.replace("http://0.0.0.0:8081", "https://0.0.0.0:8443")
        text = (
            api
            + binding
            + SERVICE
            + tls_secret(cert, key)
            + ingress(
                "a",
                path_rule("/", host="foo.com"),
                annotations=BOUND,
                spec="tls: [{hosts: [foo.com], secretName: foo-tls}]",
            )
        )
        t = Translated(text)
        self.assertEqual(t.messages("error") + t.messages("warning"), [])
        tls = self.tls_listener(t).tls
        self.assertEqual([c.names for c in tls.certificates], [("edge.example",), ("foo.com",)])
        self.assertEqual(tls.settings.min_version, (1, 3))
        self.assertIsNotNone(tls.context_for(b"foo.com"))

    def test_https_api_instance_without_certificates_is_not_served(self) -> None:
        """An https:// ApiInstance with neither a tls binding nor Ingress certificates: an error."""
        api = API.replace("http://0.0.0.0:8081", "https://0.0.0.0:8443")
        t = Translated(api + SERVICE + ingress("a", path_rule("/"), annotations=BOUND))
        self.assertIn("an https:// address needs a tls binding", t.messages("error")[0])
        self.assertEqual(t.listeners, ())

    def test_plain_api_instance_does_not_use_certificates(self) -> None:
        """Bound to a plain-HTTP ApiInstance, the certificate is unused, and a warning says so."""
        cert, key = certificate(("foo.com",))
        text = (
            API
            + SERVICE
            + tls_secret(cert, key)
            + ingress(
                "a",
                path_rule("/", host="foo.com"),
                annotations=BOUND,
                spec="tls: [{hosts: [foo.com], secretName: foo-tls}]",
            )
        )
        t = Translated(text)
        [warning] = t.messages("warning")
        self.assertIn(
            "spec.tls[0]: the certificate is not used: ApiInstance edge/ingress-http serves plain HTTP",
            warning,
        )
        self.assertEqual([(l.scheme, l.port) for l in t.listeners], [("http", 8081)])
        self.assertEqual(t.target("/", "foo.com", port=8081), "default/web:80 /")

    def test_host_not_covered_is_a_warning(self) -> None:
        """A tls host the certificate does not name (wildcards count for one label) is a warning."""
        cert, key = certificate(("*.foo.com",))
        text = (
            SERVICE
            + tls_secret(cert, key)
            + ingress(
                "a",
                path_rule("/"),
                spec="tls: [{hosts: [a.foo.com, a.b.foo.com], secretName: foo-tls}]",
            )
        )
        t = Translated(text)
        [warning] = [p for p in t.problems if p.severity == "warning"]
        self.assertEqual(warning.field, "spec.tls[0].hosts[1]")
        self.assertIn("does not cover a.b.foo.com (its names: *.foo.com)", warning.message)

    def test_string_data(self) -> None:
        """stringData holds the PEM text directly."""
        cert, key = certificate()
        secret = (
            "---\napiVersion: v1\nkind: Secret\nmetadata: {name: foo-tls}\ntype: kubernetes.io/tls\n"
            "stringData:\n  tls.crt: |\n"
            + textwrap.indent(cert.decode(), "    ")
            + "  tls.key: |\n"
            + textwrap.indent(key.decode(), "    ")
        )
        t = Translated(
            SERVICE + secret + ingress("a", path_rule("/"), spec="tls: [{secretName: foo-tls}]")
        )
        self.assertEqual(t.messages("error"), [])
        self.assertEqual(self.tls_listener(t).tls.certificates[0].key_pem, key)

    def test_bad_secret_material_is_located(self) -> None:
        """Bad base64, a key of another certificate, no PEM: errors at the field, no secret shown."""
        cert, key = certificate()
        _, other_key = certificate()
        bad_b64 = tls_secret(cert, key).replace("tls.crt: ", "tls.crt: '!!'\n  x: ")
        t = Translated(bad_b64.replace("\n  x: ", "\n  other: "))
        [error] = t.messages("error")
        self.assertIn(
            "conf/ingress.yaml:7:12: error: Secret default/foo-tls: data.tls.crt: tls.crt is not valid base64",
            error,
        )
        t = Translated(tls_secret(cert, other_key))
        [error] = t.messages("error")
        self.assertIn("data.tls.key: tls.key does not match the certificate in tls.crt", error)
        self.assertNotIn(base64.b64encode(other_key).decode()[:40], error)
        t = Translated(tls_secret(b"hello", key))
        self.assertIn("tls.crt holds no PEM certificate", t.messages("error")[0])

    def test_missing_or_wrong_type_secret(self) -> None:
        """An Ingress naming a missing Secret, or one of another type, gets an error; no TLS."""
        cert, key = certificate()
        tls = "tls: [{hosts: [foo.com], secretName: foo-tls}]"
        t = Translated(SERVICE + ingress("a", path_rule("/"), spec=tls))
        self.assertIn(
            "Secret default/foo-tls not found (or invalid); no certificate for foo.com",
            t.messages("error")[0],
        )
        t = Translated(
            SERVICE + tls_secret(cert, key, kind="Opaque") + ingress("a", path_rule("/"), spec=tls)
        )
        self.assertIn(
            "Secret default/foo-tls is not of type kubernetes.io/tls", t.messages("error")[0]
        )
        self.assertEqual([listener.port for listener in t.listeners], [8080])


class SchemaTests(SynchronousTestCase):
    """The Ingress subset's schema and checks: errors with file:line:column."""

    def test_unknown_spec_field_is_an_error_metadata_is_not(self) -> None:
        """Unknown keys under spec are errors (they would change routing); metadata stays open."""
        text = ingress("a", path_rule("/"), spec="ingressClass: x").replace(
            "  namespace: default\n", "  namespace: default\n  uid: 1234\n  managedFields: []\n"
        )
        t = Translated(SERVICE + text)
        [error] = t.messages("error")
        line = (SERVICE + text).splitlines().index("  ingressClass: x") + 1
        self.assertEqual(
            error,
            f"{FILE}:{line}:3: error: Ingress default/a: spec.ingressClass: unknown key 'ingressClass'",
        )
        self.assertEqual(t.listeners, ())

    def test_path_type_and_path_checks(self) -> None:
        """A bad pathType, a relative Prefix path, a bad regex (its column), a resource backend."""
        rules = (
            path_rule("/a", "Regex")
            + path_rule("a/b", "Prefix")
            + path_rule("'/x(/.*'", "ImplementationSpecific")
            + "- http:\n    paths:\n    - pathType: Exact\n      path: /r\n"
            "      backend: {resource: {kind: Bucket, name: b}}\n"
        )
        text = ingress("a", rules)
        lines = text.splitlines()
        t = Translated(text)
        errors = {
            p.field: (p.line, p.column, p.message) for p in t.problems if p.severity == "error"
        }
        self.assertEqual(
            errors["spec.rules[0].http.paths[0].pathType"],
            (
                lines.index("      - pathType: Regex") + 1,
                19,
                "'Regex' is not one of 'Exact', 'Prefix', 'ImplementationSpecific'",
            ),
        )
        self.assertEqual(
            errors["spec.rules[1].http.paths[0].path"][:2],
            (lines.index("        path: a/b") + 1, 15),
        )
        line, column, message = errors["spec.rules[2].http.paths[0].path"]
        self.assertEqual((line, column), (lines.index("        path: '/x(/.*'") + 1, 15))
        self.assertIn("invalid regex at position 3", message)
        self.assertIn(
            "resource backends are not supported",
            errors["spec.rules[3].http.paths[0].backend.resource"][2],
        )

    def test_bad_host_and_timestamp_and_annotation(self) -> None:
        """An upper-case or IP host, a bad creationTimestamp, an unknown flexgw annotation."""
        text = ingress(
            "a",
            path_rule("/", host="Foo.com") + path_rule("/", host="10.0.0.1:80"),
            created="yesterday",
            annotations="flex-gateway.ingress.kubernetes.io/rewrite: x",
        )
        fields = sorted(p.field or "" for p in Translated(text).problems if p.severity == "error")
        self.assertEqual(
            fields,
            [
                "metadata.annotations.flex-gateway.ingress.kubernetes.io/rewrite",
                "metadata.creationTimestamp",
                "spec.rules[0].host",
                "spec.rules[1].host",
            ],
        )

    def test_unsupported_api_version(self) -> None:
        """An Ingress of an old apiVersion is an error naming the one flexgw reads."""
        text = ingress("a", path_rule("/")).replace("networking.k8s.io/v1", "extensions/v1beta1")
        [error] = Translated(text).messages("error")
        self.assertIn(
            "unsupported apiVersion 'extensions/v1beta1' for Ingress (expected networking.k8s.io/v1)",
            error,
        )

    def test_other_kubernetes_kinds_are_ignored(self) -> None:
        """A Deployment beside the Ingress is an ignored kind, as before (a warning)."""
        text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {}\n"
        [warning] = Translated(text).messages("warning")
        self.assertIn("unknown kind 'Deployment'; ignored", warning)

    def test_flex_and_kubernetes_service_of_one_name_coexist(self) -> None:
        """A v1 Service and a flexgw Service may share a name; the v1 Service serves the Ingress."""
        flex = (
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: Service\nmetadata: {name: web}\n"
            "spec: {address: 'http://flex.internal:9000'}\n"
        )
        t = Translated(flex + SERVICE + ingress("a", path_rule("/")))
        self.assertEqual(t.messages("error") + t.messages("warning"), [])
        self.assertEqual(t.target("/"), "default/web:80 /")


class CommandLineTests(TestCase):
    """`flexgw validate` and `twistd flexgw` options for Ingress resources."""

    def validate(self, *args: str) -> tuple[int, str]:
        """Run `flexgw validate` on a conf dir holding one Ingress of class flexgw, one of nginx."""
        root = write_conf(
            self,
            {
                "k8s.yaml": SERVICE
                + ingress("a", path_rule("/"), klass=None)
                + ingress("b", path_rule("/b"), klass="nginx")
            },
        )
        out = io.StringIO()
        status = main(["validate", *args, root], stdout=out, environ={})
        return status, out.getvalue()

    def test_validate_prints_info_notes(self) -> None:
        """Ignored Ingresses are info notes, counted apart from warnings; exit status 0."""
        status, out = self.validate()
        self.assertEqual(status, 0)
        self.assertIn("info: Ingress default/b: spec.ingressClassName: ingress class 'nginx'", out)
        self.assertIn("0 error(s), 0 warning(s), 2 note(s), 0 API(s) served", out)

    def test_validate_options(self) -> None:
        """--ingress-default-class and --ingress-listener change what is served, and where."""
        status, out = self.validate(
            "--ingress-default-class", "--ingress-listener", "http://127.0.0.1:9555"
        )
        self.assertEqual(status, 0)
        self.assertIn("0 error(s), 0 warning(s), 1 note(s), 1 API(s) served", out)
        status, out = self.validate("--ingress-class", "nginx")
        self.assertIn("1 API(s) served", out)
        status, out = self.validate("--ingress-listener", "https://0.0.0.0:1")
        self.assertEqual(status, 2)
        self.assertIn("--ingress-listener https://0.0.0.0:1: must be an http:// address", out)

    def test_twistd_options(self) -> None:
        """The twistd plugin's options build IngressOptions, and refuse a bad listener."""
        conf = write_conf(self, {})
        options = Options()
        options.parseOptions(
            [
                "--conf",
                conf,
                "--ingress-class",
                "edge",
                "--ingress-default-class",
                "--ingress-listener",
                "http://127.0.0.1:9556",
                "--ingress-tls-listener",
                "https://127.0.0.1:9557",
            ]
        )
        self.assertEqual(
            options["ingress"],
            ingress_options("edge", True, "http://127.0.0.1:9556", "https://127.0.0.1:9557"),
        )
        worker = worker_command(options)  # --workers: every worker gets the same options
        self.assertIn("--ingress-default-class", worker)
        for flag, value in (
            ("--ingress-class", "edge"),
            ("--ingress-listener", "http://127.0.0.1:9556"),
            ("--ingress-tls-listener", "https://127.0.0.1:9557"),
        ):
            self.assertEqual(worker[worker.index(flag) + 1], value)
        options = Options()
        options.parseOptions(["--conf", conf])
        self.assertEqual(options["ingress"], IngressOptions())
        self.assertRaises(
            UsageError, Options().parseOptions, ["--conf", conf, "--ingress-listener", "nope"]
        )


class ReloadTests(TestCase):
    """Ingress files through load_config: last good versions, YAML timestamps."""

    def test_broken_ingress_keeps_its_last_good_version(self) -> None:
        """A reload with an invalid Ingress keeps serving the previous version of it."""
        root = write_conf(self, {"k8s.yaml": SERVICE + ingress("a", path_rule("/v1"))})
        first = load_config([root], {})
        self.assertTrue(first.ok)
        update_conf(root, {"k8s.yaml": SERVICE + ingress("a", path_rule("/v2"), spec="bogus: 1")})
        second = load_config([root], {}, previous=first)
        self.assertIn("spec.bogus: unknown key 'bogus'", " ".join(str(p) for p in second.errors))
        self.assertIn(
            "invalid; the last good version keeps serving",
            " ".join(p.message for p in second.problems if p.resource == "Ingress default/a"),
        )
        [listener] = second.plan.listeners
        match = select_route(listener, "GET", "/v1/x", "h", [], random.Random(0))
        assert match is not None
        self.assertEqual(match.upstream_path, "/v1/x")
        self.assertIsNone(select_route(listener, "GET", "/v2", "h", [], random.Random(0)))

    def test_unquoted_timestamps(self) -> None:
        """An unquoted YAML timestamp is read as written and decides precedence."""
        text = (
            SERVICE
            + kube_service("other")
            + ingress("b", path_rule("/", service="other")).replace(
                "  namespace: default\n",
                "  namespace: default\n  creationTimestamp: 2024-06-01T00:00:00Z\n",
            )
            + ingress("c", path_rule("/")).replace(
                "  namespace: default\n",
                "  namespace: default\n  creationTimestamp: 2023-06-01 10:00:00\n",
            )
        )
        t = Translated(text)
        self.assertEqual(t.messages("error"), [])
        self.assertEqual(t.target("/"), "default/web:80 /")  # c is older
        self.assertEqual(
            [p.resource for p in t.problems if p.severity == "warning"], ["Ingress default/b"]
        )
