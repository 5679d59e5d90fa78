"""Tests for load_config reload semantics: last good resources, unparseable files, generations."""

from __future__ import annotations

import os

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from flexgw.config.pipeline import ConfigState, load_config
from tests.conftools import api, route, service, update_conf, write_conf


def upstream_hosts(state: ConfigState) -> list[str]:
    """Hosts of every destination in the plan, in order."""
    return [
        d.upstream.host
        for listener in state.plan.listeners
        for a in listener.apis
        for r in a.routes
        for d in r.destinations
    ]


BASE = {
    "api.yaml": api("a", "http://0.0.0.0:8080"),
    "svc.yaml": service("s", "http://one:80"),
    "route.yaml": route("r", "a", "s"),
}


class ReloadTests(TestCase):
    """A broken new version never replaces a working one."""

    def test_generation_increments(self) -> None:
        """Each load_config with `previous` yields the next generation."""
        root = write_conf(self, BASE)
        first = load_config([root], {})
        second = load_config([root], {}, previous=first)
        self.assertEqual((first.plan.generation, second.plan.generation), (1, 2))
        self.assertTrue(first.ok and second.ok)

    def test_invalid_resource_keeps_last_good(self) -> None:
        """A Service whose new version is invalid is reported; its previous version keeps serving."""
        root = write_conf(self, BASE)
        first = load_config([root], {})
        update_conf(root, {"svc.yaml": service("s", "ftp://two:80")})
        second = load_config([root], {}, previous=first)
        self.assertFalse(second.ok)
        self.assertEqual(upstream_hosts(second), ["one"])
        messages = [p.message for p in second.problems]
        self.assertIn("invalid; the last good version keeps serving", messages)
        # without a previous state, the broken resource is simply missing
        fresh = load_config([root], {})
        self.assertEqual(upstream_hosts(fresh), [])

    def test_valid_change_applies(self) -> None:
        """A valid new version replaces the old one."""
        root = write_conf(self, BASE)
        first = load_config([root], {})
        update_conf(root, {"svc.yaml": service("s", "http://two:80")})
        self.assertEqual(upstream_hosts(load_config([root], {}, previous=first)), ["two"])

    def test_env_failure_keeps_last_good(self) -> None:
        """A binding whose config references an unset variable keeps its last good version."""
        root = write_conf(self, BASE)
        first = load_config([root], {})
        update_conf(
            root, {"route.yaml": route("r", "a", "s", config="    destinationPath: /$PREFIX\n")}
        )
        second = load_config([root], {}, previous=first)
        self.assertIn("'PREFIX' is not set", " ".join(str(p) for p in second.problems))
        (route_,) = second.plan.listeners[0].apis[0].routes
        self.assertEqual(route_.destinations[0].destination_path, "")
        third = load_config([root], {"PREFIX": "v2"}, previous=second)
        (route_,) = third.plan.listeners[0].apis[0].routes
        self.assertEqual(route_.destinations[0].destination_path, "/v2")

    def test_unparseable_file_keeps_its_resources(self) -> None:
        """A file that no longer parses keeps every resource it held, across several reloads."""
        root = write_conf(
            self,
            {
                "all.yaml": BASE["api.yaml"]
                + "---\n"
                + BASE["svc.yaml"]
                + "---\n"
                + BASE["route.yaml"]
            },
        )
        first = load_config([root], {})
        update_conf(root, {"all.yaml": "kind: [unclosed\n"})
        second = load_config([root], {}, previous=first)
        third = load_config([root], {}, previous=second)
        for state in (second, third):
            self.assertFalse(state.ok)
            self.assertEqual(upstream_hosts(state), ["one"])
            syntax = [p for p in state.problems if "YAML syntax error" in p.message]
            self.assertEqual(len(syntax), 1)
            self.assertEqual(syntax[0].line, 2)

    def test_deleted_file_removes_resources(self) -> None:
        """Deleting a file removes its resources (deletion is not a failure)."""
        root = write_conf(self, BASE)
        first = load_config([root], {})
        update_conf(root, {"route.yaml": None})
        second = load_config([root], {}, previous=first)
        self.assertEqual(second.plan.listeners[0].apis[0].routes, ())

    def test_conflict_prefers_served_api(self) -> None:
        """A new ApiInstance overlapping a served one is rejected, whatever its name."""
        root = write_conf(self, {"z.yaml": api("zz", "http://0.0.0.0:8080/cats")})
        first = load_config([root], {})
        update_conf(root, {"a.yaml": api("aa", "http://0.0.0.0:8080/cats/dogs")})
        second = load_config([root], {}, previous=first)
        self.assertEqual([a.key for a in second.plan.listeners[0].apis], ["default/zz"])

    def test_duplicate_later_wins(self) -> None:
        """The same resource defined twice: the later file wins, with a warning."""
        root = write_conf(self, {**BASE, "svc2.yaml": service("s", "http://two:80")})
        state = load_config([root], {})
        self.assertEqual(upstream_hosts(state), ["two"])
        self.assertTrue(any("defined again" in p.message for p in state.problems))

    @settings(
        max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(st.text(max_size=300))
    def test_broken_file_never_raises(self, text: str) -> None:
        """load_config returns a state for any file content, and the good files still serve."""
        root = self.mktemp()
        os.makedirs(root)
        update_conf(root, BASE)
        with open(os.path.join(root, "zz-random.yaml"), "w", encoding="utf-8") as handle:
            handle.write(text)
        state = load_config([root], {})
        self.assertIsInstance(state, ConfigState)
        self.assertEqual(state.plan.listeners[0].port, 8080)


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.sampled_from(
        ["http://0.0.0.0:8080", "https://h:443/x", "/a(/.*)", "(?=x)", "$X", "route", "a", ""]
    ),
)
_keys = st.sampled_from(
    [
        "address",
        "services",
        "routes",
        "rules",
        "path",
        "config",
        "destinationRef",
        "name",
        "targetRef",
        "policyRef",
        "kind",
        "weight",
        "timeouts",
        "http",
        "headers",
        "policies",
        "x",
    ]
)
_values = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(_keys, children, max_size=4)
    ),
    max_leaves=12,
)
_documents = st.fixed_dictionaries(
    {
        "apiVersion": st.just("gateway.mulesoft.com/v1alpha1"),
        "kind": st.sampled_from(
            ["ApiInstance", "Service", "PolicyBinding", "Configuration", "Extension"]
        ),
        "metadata": st.fixed_dictionaries({"name": st.sampled_from(["a", "b", "s"])}),
        "spec": _values,
    }
)


class RandomResourceTests(TestCase):
    """Structurally random resources never make the pipeline raise."""

    @settings(
        max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(st.lists(_documents, min_size=1, max_size=4))
    def test_random_resources(self, documents: list[dict[str, object]]) -> None:
        """load_config returns a state (and a plan) for any mix of resource-shaped documents."""
        root = self.mktemp()
        os.makedirs(root)
        with open(os.path.join(root, "r.yaml"), "w", encoding="utf-8") as handle:
            yaml.safe_dump_all(documents, handle)
        state = load_config([root], {"X": "1"}, strict=True)
        previous = load_config([root], {}, previous=state)
        self.assertEqual(previous.plan.generation, 2)
