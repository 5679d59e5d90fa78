"""Tests for the flexgw command line: validate, dump, version."""

from __future__ import annotations

import io
import json
import sys

from twisted.trial.unittest import TestCase

import flexgw
from flexgw.cli import main
from tests.conftools import KUBECTL_GET_LIST, api, route, service, write_conf

GOOD = {
    "a.yaml": api("a", "http://0.0.0.0:8080/api")
    + "---\n"
    + service("s", "http://up:9000/base")
    + "---\n"
    + route("r", "a", "s", rules="  rules:\n    - path: /x(/.*)\n      methods: GET\n"),
}


def run(argv: list[str], environ: dict[str, str] | None = None) -> tuple[int, str]:
    """Run main() capturing stdout."""
    out = io.StringIO()
    status = main(argv, stdout=out, environ=environ or {})
    return status, out.getvalue()


class ValidateTests(TestCase):
    """`flexgw validate DIR... [--strict]`."""

    def test_valid(self) -> None:
        """A valid directory exits 0."""
        status, out = run(["validate", write_conf(self, GOOD)])
        self.assertEqual(status, 0)
        self.assertIn("0 error(s), 0 warning(s), 1 API(s) served", out)

    def test_errors_printed_with_location(self) -> None:
        """Every problem is printed on its own line with file:line:column; exit 1."""
        root = write_conf(self, {"bad.yaml": service("s", "http://h:99999")})
        status, out = run(["validate", root])
        self.assertEqual(status, 1)
        first = out.splitlines()[0]
        self.assertTrue(
            first.endswith(
                "bad.yaml:6:12: error: Service default/s: spec.address: port 99999 out of range 1..65535"
            ),
            first,
        )

    def test_strict_turns_unknown_keys_into_errors(self) -> None:
        """Warnings alone exit 0; with --strict an unknown key exits 1."""
        root = write_conf(
            self, {"a.yaml": api("a", "http://0.0.0.0:8080", extra="  colour: blue\n")}
        )
        self.assertEqual(run(["validate", root])[0], 0)
        status, out = run(["validate", "--strict", root])
        self.assertEqual(status, 1)
        self.assertIn("error: ApiInstance default/a: spec.colour: unknown key 'colour'", out)

    def test_several_dirs(self) -> None:
        """Resources from several directories are combined."""
        one = write_conf(self, {"a.yaml": GOOD["a.yaml"].split("---\n")[0]})
        two = write_conf(self, {"b.yaml": "---\n".join(GOOD["a.yaml"].split("---\n")[1:])})
        status, out = run(["validate", one, two])
        self.assertEqual(status, 0, out)

    def test_kubectl_list_export(self) -> None:
        """The README's recipe (`kubectl get ingress,svc,endpoints,secret -o yaml`, one List) serves its Ingress."""
        root = write_conf(self, {"cluster.yaml": KUBECTL_GET_LIST.format(path_type="Prefix")})
        status, out = run(["validate", root])
        self.assertEqual(status, 0, out)
        self.assertIn("0 error(s), 0 warning(s), 1 API(s) served", out)

    def test_error_located_inside_a_list_item(self) -> None:
        """A bad field of a List item is an error at its own line:column, naming the object; exit 1."""
        root = write_conf(self, {"cluster.yaml": KUBECTL_GET_LIST.format(path_type="Fuzzy")})
        status, out = run(["validate", root])
        self.assertEqual(status, 1)
        self.assertIn(
            "cluster.yaml:24:21: error: Ingress shop/shop: spec.rules[0].http.paths[0].pathType:"
            " 'Fuzzy' is not one of",
            out,
        )

    def test_unknown_kinds_in_a_list_are_located_warnings(self) -> None:
        """A List item of a kind flexgw does not read is a warning at that item's kind."""
        text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: apps/v1\n  kind: Deployment\n  metadata: {name: d}\n"
        status, out = run(["validate", write_conf(self, {"l.yaml": text})])
        self.assertEqual(status, 0, out)
        self.assertIn("l.yaml:5:9: warning: kind: unknown kind 'Deployment'; ignored", out)

    def test_usage_error(self) -> None:
        """A missing subcommand is a usage error (exit 2)."""
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(main([], stdout=io.StringIO()), 2)
        self.assertIn("usage: flexgw", err.getvalue())


class DumpTests(TestCase):
    """`flexgw dump DIR...`."""

    def test_dump(self) -> None:
        """The compiled model is printed as JSON."""
        status, out = run(["dump", write_conf(self, GOOD)])
        self.assertEqual(status, 0)
        data = json.loads(out)
        (listener,) = data["listeners"]
        self.assertEqual((listener["host"], listener["port"]), ("0.0.0.0", 8080))
        (api_,) = listener["apis"]
        self.assertEqual(api_["basePath"], "/api")
        self.assertEqual(api_["routes"][0]["rules"], [{"path": "/x(/.*)", "methods": "GET"}])
        self.assertEqual(data["upstreams"]["default/s"]["pathPrefix"], "/base")
        self.assertEqual(data["timeouts"]["upstreamResponseSeconds"], 15.0)
        self.assertEqual(data["http"]["rewriteHostHeader"], True)
        self.assertEqual(data["problems"], [])

    def test_dump_forward_proxy(self) -> None:
        """A forward-proxy API shows its normalised destination rules and address ranges."""
        from tests.test_egress_proxy import proxy_conf

        conf = proxy_conf(3128, ["A.test", "*.b.test:8443", "0x7f.1:*", "[::1]:443"])
        status, out = run(["dump", write_conf(self, {"p.yaml": conf})])
        self.assertEqual(status, 0)
        (listener,) = json.loads(out)["listeners"]
        (api_,) = listener["apis"]
        proxy = api_["forwardProxy"]
        self.assertEqual(
            proxy["allowedDestinations"], ["a.test:80,443", "*.b.test:8443", "127.0.0.1:*", "[::1]:443"]
        )
        self.assertEqual(proxy["connectPorts"], [443])
        self.assertIn("169.254.0.0/16", proxy["blockedAddresses"])
        self.assertEqual(proxy["blockedAddressExceptions"], ["127.0.0.1/32"])


class VersionTests(TestCase):
    """`flexgw version`."""

    def test_version(self) -> None:
        """Prints the package version."""
        self.assertEqual(run(["version"]), (0, f"flexgw {flexgw.__version__}\n"))


class DemoTokenTests(TestCase):
    """`flexgw demo-token`: a JWT for the conf/ingress example."""

    SECRET = "flexgw-demo-secret-for-the-ingress-example"

    def test_token_claims(self) -> None:
        """HS256 with the given secret, aud, sub and an exp `--ttl` seconds ahead."""
        import jwt

        status, text = run(
            ["demo-token", "--secret", self.SECRET, "--audience", "api.example.com", "--ttl", "60"]
        )
        self.assertEqual(status, 0)
        token = text.strip()
        self.assertEqual(jwt.get_unverified_header(token)["alg"], "HS256")
        claims = jwt.decode(token, self.SECRET, algorithms=["HS256"], audience="api.example.com")
        self.assertEqual(claims["sub"], "demo-user")
        self.assertEqual(claims["exp"] - claims["iat"], 60)

    def test_secret_from_environment(self) -> None:
        """Without --secret, FLEXGW_JWT_SECRET (the example's own variable) is the key."""
        import jwt

        status, text = run(["demo-token"], {"FLEXGW_JWT_SECRET": self.SECRET})
        self.assertEqual(status, 0)
        jwt.decode(text.strip(), self.SECRET, algorithms=["HS256"], audience="api.example.com")

    def test_short_or_missing_secret_refused(self) -> None:
        """No secret, or one under 32 bytes (too short for HS256), is a usage error."""
        for argv in (["demo-token"], ["demo-token", "--secret", "short"]):
            status, text = run(argv)
            self.assertEqual(status, 2)
            self.assertIn("32 bytes or more", text)
