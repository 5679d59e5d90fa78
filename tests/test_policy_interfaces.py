"""The policy plug-in interfaces: IPolicy's optional capabilities with their defaults, the typed
services a policy kind gets, and the deprecated PolicyRuntime name."""

from __future__ import annotations

import warnings

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from flexgw.policies import base
from flexgw.policies.base import BuildContext, PolicyCapabilities, PolicyServices
from flexgw.policies.circuit_breaker import BREAKER_KIND, IDLE_KIND
from flexgw.policies.registry import lookup
from flexgw.service.policyruntime import PolicyRuntime


class Bare:
    """A policy with only IPolicy's two methods (as a third-party plug-in may write it)."""

    def on_request(self, ctx: object) -> None:
        """Nothing."""

    def on_response(self, ctx: object) -> None:
        """Nothing."""


class CapabilitiesTests(TestCase):
    """PolicyCapabilities.of reads IPolicy's optional members, defaults for missing ones."""

    def test_defaults(self) -> None:
        """A policy without the optional members: no body, a response phase, no on_done, in
        the chain."""
        self.assertEqual(PolicyCapabilities.of(Bare()), PolicyCapabilities())
        self.assertEqual(
            PolicyCapabilities(),
            PolicyCapabilities(needs_body=False, response_phase=True, on_done=False, chain_member=True),
        )

    def test_built_in_policies(self) -> None:
        """json-threat needs the body; the circuit breaker has on_done and no response phase;
        idle-timeout stays out of the chain."""
        context = BuildContext("default/p", None, clock=Clock())
        json_threat = lookup("json-threat-protection-flex").build({}, context)
        self.assertTrue(PolicyCapabilities.of(json_threat).needs_body)
        breaker = PolicyCapabilities.of(BREAKER_KIND.build({}, context))
        self.assertEqual((breaker.on_done, breaker.response_phase), (True, False))
        idle = IDLE_KIND.build({"timeout": 30}, context)
        self.assertFalse(PolicyCapabilities.of(idle).chain_member)


class ServicesTests(TestCase):
    """BuildContext.services is always a PolicyServices."""

    def test_missing_services(self) -> None:
        """Without services (flexgw validate, tests) a kind gets an empty PolicyServices."""
        services = BuildContext("default/p", None).services
        self.assertIsInstance(services, PolicyServices)
        self.assertEqual(
            (services.side_agent, services.redis, services.supervisor, services.message_log),
            (None, None, None, None),
        )
        self.assertEqual(services.shared, {})

    def test_runtime_is_services(self) -> None:
        """The gateway's runtime is what policies get."""
        runtime = PolicyRuntime(reactor=None, clock=Clock())
        self.assertIs(BuildContext("default/p", None, services=runtime).services, runtime)
        self.assertIsInstance(runtime, PolicyServices)

    def test_old_name_warns(self) -> None:
        """flexgw.policies.base.PolicyRuntime still works, with a DeprecationWarning."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            old = base.PolicyRuntime
        self.assertIs(old, base.PolicyServices)
        self.assertEqual([w.category for w in caught], [DeprecationWarning])
        self.assertIn("flexgw.service.policyruntime", str(caught[0].message))
