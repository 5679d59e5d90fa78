"""Tests for per-document checks: schemas, locations, spelling variants, regexes, env expansion."""

from __future__ import annotations

import textwrap

from twisted.trial.unittest import SynchronousTestCase

from flexgw.config.load import load_text
from flexgw.config.validate import Checked, check_document, load_schema
from flexgw.plan import Problem


def check(text: str, environ: dict[str, str] | None = None, strict: bool = False) -> Checked:
    """Check the single document in `text` (dedented)."""
    loaded = load_text(textwrap.dedent(text).lstrip("\n"), "conf.yaml")
    assert not loaded.failed, loaded.problems
    return check_document(loaded.documents[0], environ or {}, strict)


def only(checked: Checked, severity: str = "error") -> Problem:
    """The single problem of `severity`."""
    found = [p for p in checked.problems if p.severity == severity]
    assert len(found) == 1, [str(p) for p in checked.problems]
    return found[0]


class SchemaTests(SynchronousTestCase):
    """JSON Schema errors name file:line:column, the resource and the field."""

    def test_wrong_type_located(self) -> None:
        """A number where a string is expected is reported at the value."""
        checked = check(
            """
            apiVersion: gateway.mulesoft.com/v1alpha1
            kind: Service
            metadata:
              name: s
            spec:
              address: 8080
            """
        )
        self.assertIsNone(checked.resource)
        self.assertEqual(
            str(only(checked)),
            "conf.yaml:6:12: error: Service default/s: spec.address: expected string, got number",
        )

    def test_missing_required(self) -> None:
        """A missing required field is reported at its parent."""
        checked = check(
            """
            apiVersion: gateway.mulesoft.com/v1alpha1
            kind: ApiInstance
            metadata: {name: a, namespace: team}
            spec:
              services: {}
            """
        )
        problem = only(checked)
        self.assertEqual((problem.line, problem.column, problem.field), (4, 1, "spec"))
        self.assertEqual(problem.resource, "ApiInstance team/a")
        self.assertIn("'address' is a required property", problem.message)

    def test_unknown_key_warning_then_strict_error(self) -> None:
        """An unknown key is a warning at the key (resource kept), an error with strict."""
        text = """
            apiVersion: gateway.mulesoft.com/v1alpha1
            kind: Service
            metadata: {name: s}
            spec:
              address: http://h:80
              adress: http://h:81
            """
        lenient = check(text)
        self.assertIsNotNone(lenient.resource)
        warning = only(lenient, "warning")
        self.assertEqual((warning.line, warning.column, warning.field), (6, 3, "spec.adress"))
        strict = check(text, strict=True)
        self.assertIsNone(strict.resource)
        self.assertEqual(only(strict).field, "spec.adress")

    def test_route_weight_range(self) -> None:
        """route-weighted weights must be 1..100, reported at the weight."""
        checked = check(
            """
            apiVersion: gateway.mulesoft.com/v1alpha1
            kind: PolicyBinding
            metadata: {name: w}
            spec:
              targetRef: {kind: ApiInstance, name: a}
              policyRef: {name: route-weighted}
              config:
                routes:
                  - weight: 0
                    destinationRef: {name: s}
            """
        )
        problem = only(checked)
        self.assertEqual((problem.line, problem.column), (9, 17))
        self.assertEqual(problem.field, "spec.config.routes[0].weight")

    def test_route_needs_destination(self) -> None:
        """A route binding without destinationRef is an error."""
        checked = check(
            """
            apiVersion: gateway.mulesoft.com/v1alpha1
            kind: PolicyBinding
            metadata: {name: r}
            spec:
              targetRef: {kind: ApiInstance, name: a}
              policyRef: {name: route}
              config: {destinationPath: /x}
            """
        )
        self.assertIn("destinationRef", only(checked).message)

    def test_schemas_are_valid(self) -> None:
        """Every shipped schema is valid draft 2020-12."""
        from jsonschema import Draft202012Validator

        for name in (
            "ApiInstance",
            "Service",
            "PolicyBinding",
            "Configuration",
            "Extension",
            "policy-route",
            "policy-route-weighted",
        ):
            Draft202012Validator.check_schema(load_schema(name))


class IdentityTests(SynchronousTestCase):
    """Kinds, apiVersions and metadata."""

    def test_registration_without_kind(self) -> None:
        """A document without kind (registration.yaml) is a warning and ignored."""
        checked = check("registration:\n  token: x\n")
        self.assertEqual((checked.id, checked.resource), (None, None))
        self.assertIn("without 'kind'", only(checked, "warning").message)

    def test_unknown_kind(self) -> None:
        """An unknown kind is a warning."""
        checked = check("apiVersion: v1\nkind: Deployment\nmetadata: {name: x}\n")
        self.assertIsNone(checked.resource)
        self.assertEqual(only(checked, "warning").line, 2)
        self.assertFalse([p for p in checked.problems if p.severity == "error"])

    def test_kind_any_case(self) -> None:
        """`kind: service` is Service; namespace defaults to `default`."""
        checked = check(
            "apiVersion: gateway.mulesoft.com/v1beta1\nkind: service\nmetadata: {name: s}\n"
            "spec: {address: 'http://h:1'}\n"
        )
        assert checked.resource is not None
        self.assertEqual(str(checked.resource.id), "Service default/s")

    def test_bad_api_version(self) -> None:
        """Other apiVersions are errors for that document."""
        checked = check(
            "apiVersion: gateway.mulesoft.com/v2\nkind: Service\nmetadata: {name: s}\n"
            "spec: {address: 'http://h:1'}\n"
        )
        self.assertIsNone(checked.resource)
        self.assertEqual(only(checked).field, "apiVersion")

    def test_name_required(self) -> None:
        """metadata.name is required."""
        checked = check(
            "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: Service\nmetadata: {}\n"
            "spec: {address: 'http://h:1'}\n"
        )
        self.assertIsNone(checked.id)
        self.assertIn("metadata.name is required", only(checked).message)

    def test_target_ref_variants(self) -> None:
        """`Kind:` in targetRef is accepted; its value is matched case-insensitively."""
        checked = check(
            """
            apiVersion: gateway.mulesoft.com/v1alpha1
            kind: PolicyBinding
            metadata: {name: b}
            spec:
              targetRef: {Kind: apiinstance, name: a}
              policyRef: {name: route}
              config: {destinationRef: {name: s}}
            """
        )
        assert checked.resource is not None
        self.assertEqual(checked.resource.spec["targetRef"]["kind"], "ApiInstance")
        self.assertEqual(checked.problems, ())

    def test_target_kind_omitted(self) -> None:
        """An omitted targetRef.kind means ApiInstance, with a warning."""
        checked = check(
            """
            apiVersion: gateway.mulesoft.com/v1alpha1
            kind: PolicyBinding
            metadata: {name: b}
            spec:
              targetRef: {name: a}
              policyRef: {name: route}
              config: {destinationRef: {name: s}}
            """
        )
        assert checked.resource is not None
        self.assertEqual(checked.resource.spec["targetRef"]["kind"], "ApiInstance")
        self.assertIn("assuming ApiInstance", only(checked, "warning").message)


class SemanticTests(SynchronousTestCase):
    """Checks beyond the schema: addresses, regexes, networks, unsupported features."""

    def test_reserved_port(self) -> None:
        """Ports 9998/9999 are refused."""
        checked = check(
            "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: ApiInstance\nmetadata: {name: a}\n"
            "spec:\n  address: http://0.0.0.0:9999\n"
        )
        problem = only(checked)
        self.assertEqual((problem.line, problem.column), (5, 12))
        self.assertIn("reserved", problem.message)

    def test_lookahead_rejected_with_position(self) -> None:
        """A look-ahead is an error whose column points into the regex."""
        checked = check(
            """
            apiVersion: gateway.mulesoft.com/v1alpha1
            kind: PolicyBinding
            metadata: {name: b}
            spec:
              targetRef: {kind: ApiInstance, name: a}
              policyRef: {name: route}
              config: {destinationRef: {name: s}}
              rules:
                - path: /a(?!b)
            """
        )
        problem = only(checked)
        self.assertEqual((problem.line, problem.column), (9, 15))
        self.assertEqual(problem.field, "spec.rules[0].path")
        self.assertIn("position 3: negative look-ahead", problem.message)

    def test_backreference_rejected(self) -> None:
        """A back-reference in a header regex is an error."""
        checked = check(
            """
            apiVersion: gateway.mulesoft.com/v1alpha1
            kind: ApiInstance
            metadata: {name: a}
            spec:
              address: http://0.0.0.0:8080
              services:
                s:
                  address: http://h:80
                  routes:
                    - rules:
                        - headers: {x-a: '(a)\\1'}
            """
        )
        self.assertIn("back-reference", only(checked).message)

    def test_invalid_regex(self) -> None:
        """A regex Python cannot compile is an error with its position."""
        checked = check(
            """
            apiVersion: gateway.mulesoft.com/v1alpha1
            kind: PolicyBinding
            metadata: {name: b}
            spec:
              targetRef: {kind: ApiInstance, name: a}
              policyRef: {name: route}
              config: {destinationRef: {name: s}}
              rules:
                - methods: "GET|(POST"
            """
        )
        self.assertIn("invalid regex at position 5", only(checked).message)

    def test_service_ipv6_address(self) -> None:
        """IPv6 Service addresses must be bracketed."""
        good = check(
            "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: Service\nmetadata: {name: s}\n"
            "spec: {address: 'http://[::1]:8080/x'}\n"
        )
        self.assertIsNotNone(good.resource)
        bad = check(
            "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: Service\nmetadata: {name: s}\n"
            "spec: {address: 'http://::1:8080'}\n"
        )
        self.assertIn("brackets", only(bad).message)

    def test_configuration_logging_and_tracing_are_checked(self) -> None:
        """logging and tracing (v1beta1) are supported keys: no "not supported" warning."""
        checked = check(
            """
            apiVersion: gateway.mulesoft.com/v1beta1
            kind: Configuration
            metadata: {name: c}
            spec:
              logging: {outputs: []}
              tracing: {provider: {type: anypoint}}
            """
        )
        self.assertIsNotNone(checked.resource)
        messages = [p.message for p in checked.problems]
        # logging: flexgw.config.logconf; tracing: flexgw.config.tracing (anypoint is reported there)
        self.assertEqual(messages, [])

    def test_trusted_proxies(self) -> None:
        """trustedProxies entries must be IPs or CIDRs."""
        checked = check(
            """
            apiVersion: gateway.mulesoft.com/v1alpha1
            kind: Configuration
            metadata: {name: c}
            spec:
              http:
                trustedProxies: [10.0.0.0/8, nonsense]
            """
        )
        self.assertEqual(only(checked).field, "spec.http.trustedProxies[1]")

    def test_edge_http_settings(self) -> None:
        """headersWithUnderscoresAction and pathWithEscapedSlashesAction take Envoy's values,
        normalizePath and mergeSlashes booleans; a wrong value is located at its line and column."""
        for key, value in (
            ("headersWithUnderscoresAction", "drop"),
            ("pathWithEscapedSlashesAction", "unescape"),
            ("normalizePath", "sometimes"),
            ("mergeSlashes", "'yes'"),
        ):
            checked = check(
                "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: Configuration\n"
                f"metadata: {{name: c}}\nspec:\n  http:\n    rewriteHostHeader: true\n    {key}: {value}\n"
            )
            problem = only(checked)
            self.assertEqual(
                (problem.line, problem.column, problem.field),
                (7, len(key) + 7, f"spec.http.{key}"),
            )

    def test_wasm_extension(self) -> None:
        """A WASM Extension is recorded with an "unsupported" warning."""
        checked = check(
            """
            apiVersion: gateway.mulesoft.com/v1alpha1
            kind: Extension
            metadata: {name: custom}
            spec:
              extends:
                - name: custom-def
                - name: proxy-wasm-filter
              properties:
                implementation: {type: string, default: "base64://AAAA"}
            """
        )
        self.assertIsNotNone(checked.resource)
        self.assertIn("unsupported", only(checked, "warning").message)


class EnvironmentTests(SynchronousTestCase):
    """Environment expansion where Flex does it."""

    def test_policy_config_expanded(self) -> None:
        """`$NAME` and `${NAME}` expand inside a binding's config; `$$` is a literal `$`."""
        checked = check(
            """
            apiVersion: gateway.mulesoft.com/v1alpha1
            kind: PolicyBinding
            metadata: {name: b}
            spec:
              targetRef: {kind: ApiInstance, name: a}
              policyRef: {name: route}
              config:
                destinationPath: /$VER/${AREA}x/$$HOME
                destinationRef: {name: s}
            """,
            {"VER": "v1", "AREA": "eu"},
        )
        assert checked.resource is not None
        self.assertEqual(checked.resource.spec["config"]["destinationPath"], "/v1/eux/$HOME")

    def test_unset_variable_names_it_not_values(self) -> None:
        """An unset variable is an error naming it and its location; no value is printed."""
        checked = check(
            """
            apiVersion: gateway.mulesoft.com/v1alpha1
            kind: ApiInstance
            metadata: {name: a}
            spec:
              address: http://0.0.0.0:8080
              policies:
                - policyRef: {name: http-basic-authentication-flex}
                  config:
                    username: $USER_NAME
                    password: $MISSING_SECRET
            """,
            {"USER_NAME": "s3cr3t-user"},
        )
        problem = only(checked)
        self.assertEqual(
            str(problem),
            "conf.yaml:10:19: error: ApiInstance default/a: spec.policies[0].config.password: "
            "environment variable 'MISSING_SECRET' is not set",
        )
        self.assertNotIn("s3cr3t", " ".join(str(p) for p in checked.problems))

    def test_rules_not_expanded(self) -> None:
        """Rules are regexes, not config: `$` stays as written."""
        checked = check(
            """
            apiVersion: gateway.mulesoft.com/v1alpha1
            kind: PolicyBinding
            metadata: {name: b}
            spec:
              targetRef: {kind: ApiInstance, name: a}
              policyRef: {name: route}
              config: {destinationRef: {name: s}}
              rules:
                - path: /a$X
            """
        )
        assert checked.resource is not None
        self.assertEqual(checked.resource.spec["rules"][0]["path"], "/a$X")

    def test_configuration_scalars_typed(self) -> None:
        """A plain `$VAR` in a Configuration number field becomes a number."""
        checked = check(
            """
            apiVersion: gateway.mulesoft.com/v1alpha1
            kind: Configuration
            metadata: {name: c}
            spec:
              timeouts:
                upstreamResponseSeconds: $TIMEOUT
              http:
                rewriteHostHeader: ${REWRITE}
            """,
            {"TIMEOUT": "30", "REWRITE": "false"},
        )
        assert checked.resource is not None, [str(p) for p in checked.problems]
        self.assertEqual(checked.resource.spec["timeouts"]["upstreamResponseSeconds"], 30)
        self.assertIs(checked.resource.spec["http"]["rewriteHostHeader"], False)
