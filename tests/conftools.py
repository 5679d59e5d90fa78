"""Helpers for configuration tests: write YAML files into a fresh directory."""

from __future__ import annotations

import os
import textwrap

from twisted.trial.unittest import TestCase

HEADER = "apiVersion: gateway.mulesoft.com/v1alpha1\n"

#: The shipped example configurations (conf/ at the top of the repository).
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def example_files(name: str, moves: dict[str, str] | None = None) -> dict[str, str]:
    """The files of conf/`name` by file name, with each text in `moves` replaced by its new value
    (in order): the example as shipped, but for the addresses a test moves."""
    directory = os.path.join(EXAMPLES, name)
    files = {}
    for filename in sorted(os.listdir(directory)):
        with open(os.path.join(directory, filename), encoding="utf-8") as handle:
            text = handle.read()
        for old, new in (moves or {}).items():
            text = text.replace(old, new)
        files[filename] = text
    return files


def write_conf(case: TestCase, files: dict[str, str]) -> str:
    """Create a new directory holding `files` (name -> dedented YAML text); return its path."""
    root = case.mktemp()
    os.makedirs(root)
    update_conf(root, files)
    return root


def update_conf(root: str, files: dict[str, str | None]) -> None:
    """Write (or, for None, delete) files below `root`."""
    for name, text in files.items():
        path = os.path.join(root, name)
        if text is None:
            os.remove(path)
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(textwrap.dedent(text).lstrip("\n"))


def api(name: str, address: str, namespace: str | None = None, extra: str = "") -> str:
    """An ApiInstance document."""
    ns = f"\n  namespace: {namespace}" if namespace else ""
    return (
        f"{HEADER}kind: ApiInstance\nmetadata:\n  name: {name}{ns}\n"
        f"spec:\n  address: {address}\n{extra}"
    )


def service(name: str, address: str, namespace: str | None = None) -> str:
    """A Service document."""
    ns = f"\n  namespace: {namespace}" if namespace else ""
    return f"{HEADER}kind: Service\nmetadata:\n  name: {name}{ns}\nspec:\n  address: {address}\n"


def route(
    name: str,
    target: str,
    service_name: str,
    rules: str = "",
    config: str = "",
    order: int | None = None,
) -> str:
    """A `route` PolicyBinding document; `rules` and `config` are extra YAML lines (indented 2/4)."""
    order_line = f"  order: {order}\n" if order is not None else ""
    return (
        f"{HEADER}kind: PolicyBinding\nmetadata:\n  name: {name}\nspec:\n"
        f"  targetRef:\n    kind: ApiInstance\n    name: {target}\n"
        f"  policyRef:\n    name: route\n"
        f"  config:\n    destinationRef:\n      name: {service_name}\n{config}"
        f"{order_line}{rules}"
    )


#: What `kubectl get ingress,svc,endpoints,secret -n shop -o yaml` prints (the README's export
#: recipe): one `kind: List` document whose items are indented as kubectl indents them.
KUBECTL_GET_LIST = """\
apiVersion: v1
items:
- apiVersion: networking.k8s.io/v1
  kind: Ingress
  metadata:
    creationTimestamp: "2026-12-01T10:00:00Z"
    generation: 1
    name: shop
    namespace: shop
    resourceVersion: "1201"
    uid: 0b5f0a61-6f0e-4a51-9d1c-0a1f9c7e2a11
  spec:
    ingressClassName: flexgw
    rules:
    - host: shop.example
      http:
        paths:
        - backend:
            service:
              name: shop
              port:
                number: 80
          path: /orders
          pathType: {path_type}
  status:
    loadBalancer: {{}}
- apiVersion: v1
  kind: Service
  metadata:
    creationTimestamp: "2026-12-01T10:00:00Z"
    labels:
      app: shop
    name: shop
    namespace: shop
    resourceVersion: "1187"
    uid: 3c1d2e1a-1111-4b6e-8a55-5f0d7bb0a3c2
  spec:
    clusterIP: 127.0.0.1
    clusterIPs:
    - 127.0.0.1
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
    - name: http
      port: 80
      protocol: TCP
      targetPort: 8080
    selector:
      app: shop
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {{}}
- apiVersion: v1
  kind: Endpoints
  metadata:
    name: shop
    namespace: shop
  subsets:
  - addresses:
    - ip: 127.0.0.1
    ports:
    - name: http
      port: 8080
      protocol: TCP
- apiVersion: v1
  data:
    password: c2VjcmV0
  kind: Secret
  metadata:
    name: db
    namespace: shop
  type: Opaque
kind: List
metadata:
  resourceVersion: ""
"""
