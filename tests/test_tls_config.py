"""TLS configuration: the tls / tls-outbound / defaultTLS schemas and parsing, problems located at
file:line:column, per-port rules, client TLS of Services, XFCC formatting, watched cert files."""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from flexgw.config.pipeline import load_config
from flexgw.config.sources.files import ConfigWatcher
from flexgw.policies.base import PolicyConfigError
from flexgw.testing.certs import CertificateAuthority
from flexgw.tls.contexts import xfcc_value
from flexgw.tls.settings import DEFAULT_TLS12_CIPHERS, IANA_TO_OPENSSL, parse_tls
from tests.conftools import write_conf

HEADER = "apiVersion: gateway.mulesoft.com/v1alpha1\n"
CA = CertificateAuthority("config CA")
SERVER = CA.issue("api.test", dns=["api.test"])
OTHER = CA.issue("other.test", dns=["other.test"])


def indent(pem: bytes, spaces: int) -> str:
    """PEM text indented for a YAML block scalar."""
    return "".join(" " * spaces + line + "\n" for line in pem.decode().splitlines())


def api(name: str, address: str, labels: str = "") -> str:
    """An ApiInstance with an inline service."""
    meta = f"{{name: {name}{', labels: ' + labels if labels else ''}}}"
    return (
        f"{HEADER}kind: ApiInstance\nmetadata: {meta}\nspec:\n  address: {address}\n"
        "  services:\n    b: {address: 'http://127.0.0.1:9'}\n"
    )


def tls(name: str, target: str, issued: object = SERVER, extra: str = "") -> str:
    """A tls binding with an inline certificate."""
    return (
        f"{HEADER}kind: PolicyBinding\nmetadata: {{name: {name}}}\nspec:\n"
        f"  targetRef: {target}\n  policyRef: {{name: tls}}\n  config:\n"
        "    certificate:\n      crt: |\n"
        + indent(issued.cert_pem, 8)  # type: ignore[attr-defined]
        + "      key: |\n"
        + indent(issued.key_pem, 8)  # type: ignore[attr-defined]
        + extra
    )


def errors(state: object) -> list[str]:
    """The error problems as text."""
    return [str(p) for p in state.errors]  # type: ignore[attr-defined]


class ParseTests(SynchronousTestCase):
    """parse_tls: defaults, spellings, cipher names."""

    def test_defaults(self) -> None:
        """Flex's defaults: TLS 1.2–1.3, the six ECDHE AEAD suites, ALPN h2 + http/1.1."""
        settings = parse_tls({}, outbound=True)
        self.assertEqual((settings.min_version, settings.max_version), ((1, 2), (1, 3)))
        self.assertEqual(settings.alpn, ("h2", "http/1.1"))
        self.assertEqual(
            set(settings.openssl_ciphers.split(":")),
            {
                "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
                "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
                "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
            },
        )
        self.assertEqual(len(DEFAULT_TLS12_CIPHERS), 6)

    def test_version_spellings(self) -> None:
        """minVersion/maxVersion and minversion/maxversion, as strings or YAML numbers."""
        self.assertEqual(parse_tls({"minVersion": "1.3"}, True).min_version, (1, 3))
        self.assertEqual(parse_tls({"maxversion": 1.2}, True).max_version, (1, 2))
        self.assertEqual(parse_tls({"maxversion": "TLSv1.2"}, True).max_version, (1, 2))
        error = self.assertRaises(PolicyConfigError, parse_tls, {"minversion": "1.0"}, True)
        self.assertEqual(error.field, "minversion")
        error = self.assertRaises(
            PolicyConfigError, parse_tls, {"minversion": "1.3", "maxversion": "1.2"}, True
        )
        self.assertIn("above", error.message)

    def test_ciphers_mapped_and_replace_defaults(self) -> None:
        """IANA names map to OpenSSL names; TLS 1.3 suites are accepted (always on)."""
        settings = parse_tls(
            {"ciphers": ["TLS_RSA_WITH_AES_128_GCM_SHA256", "tls_aes_128_gcm_sha256"]}, True
        )
        self.assertEqual(settings.openssl_ciphers, "AES128-GCM-SHA256")
        self.assertEqual(IANA_TO_OPENSSL["TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA"], "ECDHE-RSA-AES256-SHA")

    def test_tls11_needs_ciphers(self) -> None:
        """TLS 1.1 has no default ciphers (Flex): minversion 1.1 without a list is an error."""
        error = self.assertRaises(PolicyConfigError, parse_tls, {"minversion": "1.1"}, True)
        self.assertIn("TLS 1.1", error.message)

    def test_mtls_needs_trusted_ca(self) -> None:
        """requireClientCertificate without trustedCA is an error."""
        config = {
            "certificate": {"crt": SERVER.cert_pem.decode(), "key": SERVER.key_pem.decode()},
            "requireClientCertificate": True,
        }
        error = self.assertRaises(PolicyConfigError, parse_tls, config, False)
        self.assertEqual(error.field, "trustedCA")

    def test_key_must_match(self) -> None:
        """A key that is not the certificate's is refused."""
        config = {"certificate": {"crt": SERVER.cert_pem.decode(), "key": OTHER.key_pem.decode()}}
        error = self.assertRaises(PolicyConfigError, parse_tls, config, False)
        self.assertEqual(error.field, "certificate.key")

    def test_file_reference(self) -> None:
        """`file://` references are read and recorded; a missing file names its path."""
        directory = os.path.abspath(self.mktemp())
        crt, key = SERVER.write(directory, "s")
        settings = parse_tls({"certificate": {"crt": f"file://{crt}", "key": f"file://{key}"}}, False)
        self.assertEqual(settings.files, (crt, key))
        self.assertEqual(settings.certificate.names, ("api.test",))  # type: ignore[union-attr]
        error = self.assertRaises(
            PolicyConfigError, parse_tls,
            {"certificate": {"crt": f"file://{directory}/nope.crt", "key": f"file://{key}"}}, False,
        )
        self.assertIn("nope.crt", error.message)
        self.assertEqual(error.field, "certificate.crt")


class CompileTests(SynchronousTestCase):
    """TLS bindings through the whole pipeline."""

    def load(self, *documents: str) -> object:
        """Load the documents as one file."""
        return load_config([write_conf(self, {"a.yaml": "---\n".join(documents)})], {})

    def test_unknown_cipher_located(self) -> None:
        """An unknown cipher is an error naming it at its file:line:column; the API is not served."""
        state = self.load(
            api("a", "https://127.0.0.1:8443"),
            tls("t", "{name: a}", extra="    ciphers:\n      - TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256\n      - TLS_NOPE\n"),
        )
        problems = [p for p in state.errors if "TLS_NOPE" in p.message]  # type: ignore[attr-defined]
        self.assertEqual(len(problems), 1)
        problem = problems[0]
        with open(problem.file) as handle:
            text = handle.read().splitlines()
        self.assertEqual(text[problem.line - 1][problem.column - 1 :], "TLS_NOPE")
        self.assertEqual(problem.field, "spec.config.ciphers[1]")
        self.assertEqual(state.plan.listeners, ())  # type: ignore[attr-defined]

    def test_schema_rejects_unknown_alpn(self) -> None:
        """`alpn` names are checked by the JSON Schema."""
        state = self.load(
            api("a", "https://127.0.0.1:8443"), tls("t", "{name: a}", extra="    alpn: [h3]\n")
        )
        self.assertTrue(any("spec.config.alpn[0]" in e for e in errors(state)), errors(state))

    def test_https_listener(self) -> None:
        """A tls binding makes the port an https listener with a ServerTLS."""
        state = self.load(api("a", "https://127.0.0.1:8443"), tls("t", "{name: a}"))
        self.assertEqual(errors(state), [])
        (listener,) = state.plan.listeners  # type: ignore[attr-defined]
        self.assertEqual(listener.scheme, "https")
        self.assertEqual(listener.tls.exact.keys(), {"api.test"})

    def test_selector_binding(self) -> None:
        """A Selector-bound tls binding applies to every matching ApiInstance; an API-bound one wins."""
        state = self.load(
            api("a", "https://127.0.0.1:8443", "{tier: gold}"),
            api("b", "https://127.0.0.1:9443", "{tier: gold}"),
            tls("all", "{kind: Selector, selector: {kind: ApiInstance, labels: {tier: gold}}}"),
            tls("b-own", "{name: b}", OTHER),
        )
        self.assertEqual(errors(state), [])
        names = {l.port: set(l.tls.exact) for l in state.plan.listeners}  # type: ignore[attr-defined]
        self.assertEqual(names, {8443: {"api.test"}, 9443: {"other.test"}})

    def test_port_cannot_mix_tls_and_plain(self) -> None:
        """A plain API on a TLS port is an error and not served."""
        state = self.load(
            api("a", "https://127.0.0.1:8443/a"),
            api("b", "http://127.0.0.1:8443/b"),
            tls("t", "{name: a}"),
        )
        self.assertTrue(any("cannot mix TLS and plain HTTP" in e for e in errors(state)))
        (listener,) = state.plan.listeners  # type: ignore[attr-defined]
        self.assertEqual([a.key for a in listener.apis], ["default/a"])

    def test_tls_on_service_is_error(self) -> None:
        """`tls` must target an ApiInstance or Selector."""
        state = self.load(api("a", "http://127.0.0.1:8080"), tls("t", "{kind: Service, name: s}"))
        self.assertTrue(any("tls must be bound to an ApiInstance" in e for e in errors(state)))

    def test_tls_outbound_serves(self) -> None:
        """tls-outbound on a Service no longer fails closed: the API is served and the
        upstream carries its client TLS; an https Service without a binding gets defaults."""
        state = self.load(
            api("a", "http://127.0.0.1:8080"),
            f"{HEADER}kind: Service\nmetadata: {{name: s}}\nspec: {{address: 'https://partner.test'}}\n",
            f"{HEADER}kind: PolicyBinding\nmetadata: {{name: r}}\nspec:\n  targetRef: {{name: a}}\n"
            "  policyRef: {name: route}\n  config: {destinationRef: {name: s}}\n",
            f"{HEADER}kind: PolicyBinding\nmetadata: {{name: o}}\nspec:\n"
            "  targetRef: {kind: Service, name: s}\n  policyRef: {name: tls-outbound}\n"
            "  config: {minVersion: '1.3', alpn: [http/1.1]}\n",
        )
        self.assertEqual(errors(state), [])
        (listener,) = state.plan.listeners  # type: ignore[attr-defined]
        upstreams = {d.upstream.key: d.upstream for r in listener.apis[0].routes for d in r.destinations}
        self.assertEqual(upstreams["default/s"].tls.settings.min_version, (1, 3))
        self.assertIsNone(upstreams["default/a-b"].tls)

    def test_default_tls_checked(self) -> None:
        """defaultTLS.outboundPolicyCalls has the tls-outbound schema; unknown keys warn."""
        state = self.load(
            api("a", "http://127.0.0.1:8080"),
            f"{HEADER}kind: Configuration\nmetadata: {{name: c}}\nspec:\n  defaultTLS:\n"
            "    other: 1\n    outboundPolicyCalls:\n      skipValidation: maybe\n",
        )
        problems = [str(p) for p in state.problems]  # type: ignore[attr-defined]
        self.assertTrue(any("spec.defaultTLS.outboundPolicyCalls.skipValidation" in p for p in problems), problems)
        self.assertTrue(any("unknown key 'other'" in p for p in problems), problems)


class XfccTests(SynchronousTestCase):
    """Envoy's x-forwarded-client-cert value."""

    def test_quotes_escaped(self) -> None:
        """A quote in the subject is escaped inside the quoted Subject."""
        issued = CA.issue('ev"il', client=True)
        value = xfcc_value(issued.certificate)
        self.assertIn(b'Subject="CN=ev\\"il"', value)
        self.assertTrue(value.startswith(b"Hash="))


class WatchTests(SynchronousTestCase):
    """The watcher polls certificate files named by the plan, wherever they are."""

    def test_extra_file_change_reloads(self) -> None:
        """A changed certificate file triggers one debounced reload."""
        directory = os.path.abspath(self.mktemp())
        crt, _ = SERVER.write(directory, "s")
        clock, calls = Clock(), []
        watcher = ConfigWatcher(
            clock, [write_conf(self, {"a.yaml": "a: 1\n"})], lambda: calls.append(1),
            debounce_seconds=5.0, poll_interval=1.0, use_inotify=False, extra_files=lambda: [crt],
        )
        watcher.start()
        self.addCleanup(watcher.stop)
        clock.advance(10)
        self.assertEqual(calls, [])
        OTHER.write(directory, "s")
        stat = os.stat(crt)
        os.utime(crt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        clock.advance(1)
        clock.advance(5)
        self.assertEqual(calls, [1])


class DumpTests(SynchronousTestCase):
    """`flexgw dump` shows TLS settings (never key material)."""

    def test_dump_tls(self) -> None:
        """The https listener and an https Service carry a `tls` summary."""
        import io
        import json

        from flexgw.cli import main

        conf = write_conf(
            self,
            {
                "a.yaml": "---\n".join(
                    [
                        (
                            f"{HEADER}kind: ApiInstance\nmetadata: {{name: a}}\nspec:\n"
                            "  address: https://127.0.0.1:8443\n"
                            "  services: {b: {address: 'https://partner.test'}}\n"
                        ),
                        tls("t", "{name: a}"),
                    ]
                )
            },
        )
        out = io.StringIO()
        self.assertEqual(main(["dump", conf], stdout=out, environ={}), 0)
        data = json.loads(out.getvalue())
        listener_tls = data["listeners"][0]["tls"]
        self.assertEqual(listener_tls["certificateNames"], [["api.test"]])
        self.assertEqual((listener_tls["minVersion"], listener_tls["maxVersion"]), ("1.2", "1.3"))
        self.assertEqual(data["upstreams"]["default/a-b"]["tls"]["trustedCA"], "system")
        self.assertNotIn("PRIVATE KEY", out.getvalue())


class InlineTests(SynchronousTestCase):
    """A `tls` policy inline in the ApiInstance (`spec.policies`)."""

    def test_inline_tls_policy(self) -> None:
        """It configures the port like a binding, and is not a chain member."""
        text = (
            f"{HEADER}kind: ApiInstance\nmetadata: {{name: a}}\nspec:\n"
            "  address: https://127.0.0.1:8443\n"
            "  services: {b: {address: 'http://127.0.0.1:9'}}\n"
            "  policies:\n    - policyRef: {name: tls}\n      config:\n"
            "        certificate:\n          crt: |\n" + indent(SERVER.cert_pem, 12)
            + "          key: |\n" + indent(SERVER.key_pem, 12)
            + "        ciphers: [TLS_WRONG]\n"
        )
        state = load_config([write_conf(self, {"a.yaml": text})], {})
        (error,) = [e for e in errors(state) if "TLS_WRONG" in e]
        self.assertIn("spec.policies[0].config.ciphers[0]", error)
        fixed = load_config(
            [write_conf(self, {"a.yaml": text.replace("        ciphers: [TLS_WRONG]\n", "")})], {}
        )
        self.assertEqual(errors(fixed), [])
        (listener,) = fixed.plan.listeners
        self.assertEqual((listener.scheme, listener.apis[0].policies), ("https", ()))


class WarningTests(SynchronousTestCase):
    """Bindings that do less than they say are warned about."""

    def test_alpn_without_served_protocol_and_missing_service(self) -> None:
        """`alpn: [h2]` while only http/1.1 is served (inbound) or spoken (outbound) warns; a
        tls-outbound on a Service that does not exist warns."""
        from flexgw.http.alpn import SERVED_ALPN

        state = load_config(
            [
                write_conf(
                    self,
                    {
                        "a.yaml": "---\n".join(
                            [
                                api("a", "https://127.0.0.1:8443"),
                                tls("t", "{name: a}", extra="    alpn: [h2]\n"),
                                (
                                    f"{HEADER}kind: PolicyBinding\nmetadata: {{name: o}}\nspec:\n"
                                    "  targetRef: {kind: Service, name: ghost}\n"
                                    "  policyRef: {name: tls-outbound}\n  config: {}\n"
                                ),
                            ]
                        )
                    },
                )
            ],
            {},
        )
        warnings = [str(p) for p in state.problems if p.severity == "warning"]
        self.assertEqual(
            any("no ALPN is advertised" in w for w in warnings), b"h2" not in SERVED_ALPN
        )
        self.assertTrue(any("Service default/ghost does not exist" in w for w in warnings), warnings)


class ConfiguredFilesTests(SynchronousTestCase):
    """The --workers supervisor lists a configuration's TLS files without a plan of its own."""

    def test_refresh_lists_and_follows_the_configuration(self) -> None:
        """refresh() compiles the configuration aside: the binding's files are listed, and
        they leave the list when the binding does."""
        from flexgw.config.pipeline import ConfiguredFiles

        directory = os.path.abspath(self.mktemp())
        crt, key = SERVER.write(directory, "s")
        binding = (
            f"{HEADER}kind: PolicyBinding\nmetadata: {{name: t}}\nspec:\n  targetRef: {{name: a}}\n"
            f"  policyRef: {{name: tls}}\n  config:\n"
            f"    certificate: {{crt: 'file://{crt}', key: 'file://{key}'}}\n"
        )
        conf = write_conf(self, {"a.yaml": api("a", "https://127.0.0.1:8443") + "---\n" + binding})
        files = ConfiguredFiles([conf], {})
        self.assertEqual(files(), ())
        files.refresh()
        self.assertEqual(files(), (crt, key))
        with open(os.path.join(conf, "a.yaml"), "w") as handle:
            handle.write(api("a", "http://127.0.0.1:8443"))
        files.refresh()
        self.assertEqual(files(), ())
