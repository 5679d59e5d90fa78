"""Third-party policy kinds: the worked example in examples/policy-plugin, loaded by module name."""

from __future__ import annotations

import os
import shutil
import sys

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from flexgw import cli
from flexgw.policies import registry
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import Gateway, free_port

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(os.path.dirname(HERE), "examples", "policy-plugin")
CONF = os.path.join(os.path.dirname(HERE), "conf", "custom-policy", "api.yaml")


class Out:
    """A text stream keeping what `flexgw` printed."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, data: str) -> None:
        """Keep the text."""
        self.text += data


def _example_conf() -> str:
    """The shipped example configuration's text."""
    with open(CONF, encoding="utf-8") as handle:
        return handle.read()


class PolicyPluginTests(TestCase):
    """The example plugin loads by module name and its policy runs like a built-in one."""

    def setUp(self) -> None:
        """Put the example on sys.path and load it; undo both afterwards."""
        sys.path.insert(0, EXAMPLE)
        self.addCleanup(sys.path.remove, EXAMPLE)
        self.addCleanup(sys.modules.pop, "flexgw_request_id", None)
        self.addCleanup(registry.unregister, "request-id-flex")
        registry.load_modules(["flexgw_request_id"])

    def test_unknown_module_is_an_import_error(self) -> None:
        """A module that does not exist stops start-up rather than serving without the policy."""
        self.assertRaises(ImportError, registry.load_modules, ["no_such_flexgw_policy_module"])

    async def test_example_conf_serves_with_request_ids(self) -> None:
        """conf/custom-policy, pointed at local ports, adds an id upstream and echoes it back."""
        upstream = RecordingUpstream(reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()
        text = _example_conf().replace("127.0.0.1:8083", f"127.0.0.1:{port}")
        text = text.replace("127.0.0.1:8082", f"127.0.0.1:{upstream.address[1]}")
        gateway = Gateway(self, {"api.yaml": text})
        gateway.start()
        self.assertTrue(gateway.service.state.ok, gateway.service.state.problems)
        response = await client.request(
            reactor, "127.0.0.1", port, b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        sent = upstream.received[0].header("x-request-id")
        self.assertEqual(len(sent), 1)
        self.assertEqual(len(sent[0]), 32)
        self.assertEqual(response.header("x-request-id"), sent)
        kept = await client.request(
            reactor, "127.0.0.1", port, b"GET /a HTTP/1.1\r\nHost: t\r\nX-Request-Id: abc\r\n\r\n"
        )
        self.assertEqual(upstream.received[1].header("x-request-id"), [b"abc"])
        self.assertEqual(kept.header("x-request-id"), [b"abc"])

    def test_validate_reports_plugin_config_errors(self) -> None:
        """`flexgw validate --policy-module` checks the plugin's config with file:line:column."""
        root = self.mktemp()
        os.makedirs(root)
        shutil.copy(CONF, os.path.join(root, "api.yaml"))
        with open(os.path.join(root, "api.yaml"), "a", encoding="utf-8") as handle:
            handle.write("    colour: red\n")

        out = Out()
        status = cli.main(
            ["validate", "--strict", "--policy-module", "flexgw_request_id", root], out, {}
        )
        self.assertEqual(status, 1)
        self.assertIn("api.yaml:26:5: error: PolicyBinding default/ids-request-id: "
                      "spec.config.colour: unknown key 'colour'", out.text)


class MissingPluginTests(TestCase):
    """The example configuration without its policy module loaded."""

    def test_error_says_how_to_load_a_custom_policy(self) -> None:
        """`flexgw validate conf/custom-policy` without `--policy-module` fails closed, and the
        error names `--policy-module` and the entry point."""

        out = Out()
        status = cli.main(["validate", os.path.dirname(CONF)], out, {})
        self.assertEqual(status, 1)
        self.assertIn("policy 'request-id-flex' is not supported yet", out.text)
        self.assertIn("--policy-module MODULE", out.text)
        self.assertIn("flexgw.policies entry point", out.text)
        self.assertIn("default/ids-api is not served (fail closed)", out.text)
