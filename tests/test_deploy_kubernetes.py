"""deploy/kubernetes/: the CRDs are what tools/crds.py generates from flexgw's JSON Schemas, their
schemas accept the Flex resources flexgw accepts and refuse schema errors, the manifests name
what flexgw needs, and the real kubectl accepts every manifest (client dry-run, against the
in-test API server for its discovery)."""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import sys
from typing import Any

import jsonschema
import yaml
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from flexgw.config.ingress import CONTROLLERS
from flexgw.testing.certs import CertificateAuthority
from flexgw.testing.kubeapi import KubeAPI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy", "kubernetes")
KUBECTL = shutil.which("kubectl")


def _load_tool() -> Any:
    spec = importlib.util.spec_from_file_location("crds", os.path.join(ROOT, "tools", "crds.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


crds = _load_tool()


def documents(*patterns: str) -> list[dict[str, Any]]:
    """Every YAML document in the files matching `patterns` under deploy/kubernetes."""
    found = []
    for pattern in patterns:
        for path in sorted(glob.glob(os.path.join(DEPLOY, pattern))):
            with open(path, encoding="utf-8") as handle:
                found.extend(d for d in yaml.safe_load_all(handle) if d)
    return found


def write_file(path: str, text: str) -> str:
    """Write `text` to `path`; return the path."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


class CrdTests(TestCase):
    """The committed CRDs match the generator, and their schemas validate like flexgw's."""

    def test_committed_crds_match_the_generator(self) -> None:
        """deploy/kubernetes/crds.yaml is what `python tools/crds.py --write` writes now."""
        with open(crds.OUTPUT, encoding="utf-8") as handle:
            self.assertEqual(handle.read(), crds.render(), "stale: run python tools/crds.py --write")

    def schema(self, kind: str) -> Any:
        """A validator of the CRD's v1alpha1 schema (OpenAPI 3.0 is JSON Schema draft 4 here)."""
        [crd] = [d for d in documents("crds.yaml") if d["spec"]["names"]["kind"] == kind]
        [v1alpha1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
        return jsonschema.Draft4Validator(v1alpha1["schema"]["openAPIV3Schema"])

    def test_schemas_accept_the_examples_and_refuse_errors(self) -> None:
        """Every Flex resource in conf/ is accepted; an ApiInstance without an address, a
        non-positive timeout, a wrong type are refused."""
        by_kind: dict[str, int] = {}
        for path in glob.glob(os.path.join(ROOT, "conf", "**", "*.yaml"), recursive=True):
            with open(path, encoding="utf-8") as handle:
                for doc in yaml.safe_load_all(handle):
                    if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("gateway.mulesoft.com/"):
                        errors = list(self.schema(doc["kind"]).iter_errors(doc))
                        self.assertEqual(errors, [], path)
                        by_kind[doc["kind"]] = by_kind.get(doc["kind"], 0) + 1
        self.assertGreater(by_kind.get("ApiInstance", 0), 0)
        header = {"apiVersion": "gateway.mulesoft.com/v1alpha1", "metadata": {"name": "x"}}
        bad = [
            ("ApiInstance", {"spec": {"services": {}}}),
            ("ApiInstance", {"spec": {"address": 8080}}),
            ("Configuration", {"spec": {"timeouts": {"upstreamResponseSeconds": 0}}}),
            ("PolicyBinding", {"spec": {"targetRef": {"name": "a"}, "policyRef": "nope"}}),
        ]
        for kind, body in bad:
            self.assertFalse(self.schema(kind).is_valid({**header, "kind": kind, **body}), (kind, body))

    def test_structural(self) -> None:
        """Every schema node has a type (or says it is int-or-string / open), and no $ref or
        const is left: what the API server requires of a structural schema."""

        def walk(node: Any, where: str) -> None:
            self.assertTrue(
                "type" in node or node.get("x-kubernetes-int-or-string")
                or node.get("x-kubernetes-preserve-unknown-fields"), where)
            for key in ("$ref", "const", "$defs", "oneOf", "anyOf"):
                self.assertNotIn(key, node, where)
            self.assertFalse("properties" in node and "additionalProperties" in node, where)
            for name, child in (node.get("properties") or {}).items():
                walk(child, f"{where}.{name}")
            if isinstance(node.get("additionalProperties"), dict):
                walk(node["additionalProperties"], f"{where}.*")
            if "items" in node:
                walk(node["items"], f"{where}[]")

        for crd in documents("crds.yaml"):
            for version in crd["spec"]["versions"]:
                walk(version["schema"]["openAPIV3Schema"], crd["metadata"]["name"])


class ManifestTests(TestCase):
    """The manifests grant and run what flexgw needs, and nothing more."""

    def test_rbac_is_least_privilege(self) -> None:
        """Read-only verbs on what is routed, update of ingresses/status only, Leases in a Role."""
        docs = documents("rbac.yaml")
        [cluster] = [d for d in docs if d["kind"] == "ClusterRole"]
        writes = {(g, r, v) for rule in cluster["rules"] for g in rule["apiGroups"]
                  for r in rule["resources"] for v in rule["verbs"] if v not in ("get", "list", "watch")}
        self.assertEqual(writes, {("networking.k8s.io", "ingresses/status", "update")})
        [role] = [d for d in docs if d["kind"] == "Role"]
        self.assertEqual([r["resources"] for r in role["rules"]], [["leases"]])

    def test_deployment(self) -> None:
        """Probes on the admin port, --workers auto, non-root, read-only root, drain-friendly
        grace period, and the IngressClass names flexgw's controller."""
        [deployment] = documents("deployment.yaml")
        pod = deployment["spec"]["template"]["spec"]
        [container] = pod["containers"]
        self.assertIn("--workers=auto", container["args"])
        self.assertIn("--kubernetes", container["args"])
        self.assertTrue(pod["securityContext"]["runAsNonRoot"])
        self.assertTrue(container["securityContext"]["readOnlyRootFilesystem"])
        self.assertGreater(pod["terminationGracePeriodSeconds"], 25)
        self.assertEqual(container["readinessProbe"]["httpGet"]["path"], "/probes/readiness")
        [ingress_class] = documents("ingressclass.yaml")
        self.assertIn(ingress_class["spec"]["controller"], CONTROLLERS)
        self.assertIn("/", ingress_class["spec"]["controller"])  # a real API server requires it


class KubectlDryRunTests(TestCase):
    """`kubectl apply --dry-run=client` accepts every manifest."""

    if KUBECTL is None:
        skip = "kubectl is not installed"

    async def test_dry_run_accepts_every_manifest(self) -> None:
        """kubectl (client dry-run; discovery from the in-test API server) accepts
        deploy/kubernetes/ and its sidecar/ variant, and creates nothing. `--validate=false`:
        kubectl's client-side validation downloads the server's OpenAPI documents, which the
        in-test server does not have (the CRD schemas are checked by CrdTests instead)."""
        ca = CertificateAuthority()
        api = KubeAPI(reactor, tokens={"admin": None})
        api.listen(tls=ca.issue("127.0.0.1", ips=["127.0.0.1"]))
        self.addCleanup(api.stop)
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        config = write_file(os.path.join(home, "config"), api.kubeconfig("admin", ca.pem))
        env = {"KUBECONFIG": config, "HOME": home, "PATH": os.environ.get("PATH", "")}
        assert KUBECTL is not None
        out, err, code = await getProcessOutputAndValue(
            KUBECTL, ["apply", "--dry-run=client", "--validate=false", "-R", "-f", DEPLOY], env=env, reactor=reactor
        )
        self.assertEqual(code, 0, err.decode(errors="replace"))
        lines = out.decode().splitlines()
        self.assertEqual(len(lines), len(documents("*.yaml", "sidecar/*.yaml")), lines)
        self.assertTrue(all(line.endswith("(dry run)") for line in lines), lines)
        self.assertEqual([m for m, _ in api.requests if m != "GET"], [])  # nothing written
