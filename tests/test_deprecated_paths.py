"""Old import paths plug-ins and tools used keep working for one release after the layering moves."""

from __future__ import annotations

import importlib
import sys
import warnings

from twisted.trial.unittest import SynchronousTestCase

import flexgw.plan
from flexgw.policies import base


class DeprecatedPathTests(SynchronousTestCase):
    """`flexgw.config.plan` warns and re-exports; `flexgw.policies.base.PolicyConfigError` stays."""

    def test_config_plan_warns_and_reexports(self) -> None:
        """Importing flexgw.config.plan raises a DeprecationWarning naming flexgw.plan and gives its names."""
        sys.modules.pop("flexgw.config.plan", None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            old = importlib.import_module("flexgw.config.plan")
        messages = [str(w.message) for w in caught if w.category is DeprecationWarning]
        self.assertEqual(messages, ["flexgw.config.plan is deprecated; import from flexgw.plan instead"])
        for name in ("GatewayPlan", "Listener", "Upstream", "Problem", "PolicyConfigError", "LoggingSettings"):
            self.assertIs(getattr(old, name), getattr(flexgw.plan, name))

    def test_egress_policy_modules_warn_and_forward(self) -> None:
        """flexgw.egress.policy and .destinations warn and forward to their policies/ modules."""
        from flexgw.policies import destinations, forward_proxy

        for old, new in (("flexgw.egress.policy", forward_proxy), ("flexgw.egress.destinations", destinations)):
            sys.modules.pop(old, None)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                module = importlib.import_module(old)
            self.assertEqual(
                [str(w.message) for w in caught if w.category is DeprecationWarning],
                [f"{old} is deprecated; import from {new.__name__} instead"],
            )
        self.assertIs(module.parse_allow_rule, destinations.parse_allow_rule)
        self.assertIs(importlib.import_module("flexgw.egress.policy").ForwardProxyConfig,
                      forward_proxy.ForwardProxyConfig)

    def test_policy_config_error_plugin_path(self) -> None:
        """Plug-ins' `from flexgw.policies.base import PolicyConfigError` is the plan's class, without a warning."""
        self.assertIs(base.PolicyConfigError, flexgw.plan.PolicyConfigError)
        sys.modules.pop("flexgw.policies.base", None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fresh = importlib.import_module("flexgw.policies.base")
        self.addCleanup(sys.modules.__setitem__, "flexgw.policies.base", base)
        self.assertEqual([w for w in caught if w.category is DeprecationWarning], [])
        self.assertIs(fresh.PolicyConfigError, flexgw.plan.PolicyConfigError)
