"""How flexgw reaches the Kubernetes API: in-cluster (service account) or a kubeconfig.

- `in_cluster(reactor, environ)`: `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`, the
  cluster CA of the service account volume, and its projected token, read again at every request
  (the kubelet rotates it in place; a request after a rotation carries the new token).
- `from_kubeconfig(reactor, path)`: the current context's cluster (server,
  `certificate-authority-data` or `certificate-authority`, `insecure-skip-tls-verify`) and user
  (`token`, `tokenFile` read at every request, `client-certificate(-data)` and
  `client-key(-data)`); relative file names are relative to the kubeconfig. `exec` and
  `auth-provider` plug-ins are refused with a clear error.

Both give a `Connection`: the server URL, a treq client on the injected reactor whose TLS trusts
the cluster CA (and presents the client certificate), and a token callable.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import treq
import yaml
from twisted.internet import ssl
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class KubeConnectionError(ValueError):
    """The Kubernetes connection cannot be set up (a usage error, said plainly)."""


@attrs.frozen
class Connection:
    """A reachable API server: its URL, an HTTP client trusting it, and the bearer token now."""

    server: str
    client: Any = attrs.field(repr=False)  # treq.client.HTTPClient
    token: Callable[[], str | None] = attrs.field(repr=False)
    namespace: str | None = None  # the context's (or the service account's) namespace
    pool: Any = attrs.field(default=None, repr=False)  # the client's HTTPConnectionPool

    def close(self) -> Any:
        """Close the idle pooled connections (a Deferred)."""
        return self.pool.closeCachedConnections()

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One JSON request to the API server: (HTTP code, the decoded body or None)."""
        headers = {"Accept": ["application/json"]}
        token = self.token()
        if token:
            headers["Authorization"] = [f"Bearer {token}"]
        data = None
        if body is not None:
            headers["Content-Type"] = ["application/json"]
            data = json.dumps(body).encode("utf-8")
        response = await self.client.request(method, self.server + path, headers=headers, data=data)
        content = await treq.content(response)
        try:
            value = json.loads(content) if content else None
        except ValueError:
            value = None
        return response.code, value


@implementer(IPolicyForHTTPS)
class _ClusterTLS:
    """TLS to the API server: its CA (else the system's), the client certificate when given."""

    def __init__(self, ca_pem: bytes | None, client_pem: bytes | None, insecure: bool = False) -> None:
        self.trust = ssl.Certificate.loadPEM(ca_pem) if ca_pem else None
        self.client = ssl.PrivateCertificate.loadPEM(client_pem) if client_pem else None
        self.insecure = insecure

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        """Connection creator for the API server's host."""
        if self.insecure:
            options = ssl.CertificateOptions(
                privateKey=self.client.privateKey.original if self.client else None,
                certificate=self.client.original if self.client else None,
            )
            return options
        return ssl.optionsForClientTLS(
            hostname.decode("ascii"), trustRoot=self.trust, clientCertificate=self.client
        )


def make_client(reactor: Any, pool: HTTPConnectionPool, ca_pem: bytes | None,
                client_pem: bytes | None = None, insecure: bool = False, tls: bool = True) -> Any:
    """A treq client on `reactor` for the API server, with `pool` (persistent connections)."""
    if not tls:
        return treq.client.HTTPClient(Agent(reactor, pool=pool))
    policy: Any = _ClusterTLS(ca_pem, client_pem, insecure)
    if ca_pem is None and client_pem is None and not insecure:
        policy = BrowserLikePolicyForHTTPS()
    return treq.client.HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))


def file_token(path: str) -> Callable[[], str | None]:
    """A token callable reading `path` at each call (None while it cannot be read)."""

    def token() -> str | None:
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read().strip() or None
        except OSError:
            return None

    return token


def in_cluster(reactor: Any, environ: Mapping[str, str], sa_dir: str = SA_DIR) -> Connection:
    """The connection a pod has: the service host and port, the service account's CA and token."""
    host = environ.get("KUBERNETES_SERVICE_HOST")
    port = environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise KubeConnectionError(
            "not running in a cluster (KUBERNETES_SERVICE_HOST/PORT unset); give --kubeconfig"
        )
    if ":" in host:
        host = f"[{host}]"
    try:
        with open(os.path.join(sa_dir, "ca.crt"), "rb") as handle:
            ca_pem = handle.read()
    except OSError as exc:
        raise KubeConnectionError(f"cannot read the cluster CA: {exc}") from None
    namespace = None
    try:
        with open(os.path.join(sa_dir, "namespace"), encoding="utf-8") as handle:
            namespace = handle.read().strip() or None
    except OSError:
        pass
    pool = HTTPConnectionPool(reactor, persistent=True)
    return Connection(
        f"https://{host}:{port}",
        make_client(reactor, pool, ca_pem),
        file_token(os.path.join(sa_dir, "token")),
        namespace,
        pool,
    )


def _named(entries: Any, name: str, what: str) -> dict[str, Any]:
    for entry in entries or ():
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(what)
            return value if isinstance(value, dict) else {}
    raise KubeConnectionError(f"kubeconfig: no {what} named {name!r}")


def _data_or_file(section: Mapping[str, Any], key: str, base: str) -> bytes | None:
    data = section.get(f"{key}-data")
    if data:
        try:
            return base64.b64decode(str(data), validate=True)
        except ValueError:
            raise KubeConnectionError(f"kubeconfig: {key}-data is not base64") from None
    path = section.get(key)
    if path:
        try:
            with open(os.path.join(base, str(path)), "rb") as handle:
                return handle.read()
        except OSError as exc:
            raise KubeConnectionError(f"kubeconfig: cannot read {key} {path}: {exc}") from None
    return None


def from_kubeconfig(reactor: Any, path: str, context: str | None = None) -> Connection:
    """The connection of `context` (default: current-context) in the kubeconfig at `path`."""
    try:
        with open(path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as exc:
        raise KubeConnectionError(f"cannot read kubeconfig {path}: {exc}") from None
    if not isinstance(config, dict):
        raise KubeConnectionError(f"kubeconfig {path} is not a mapping")
    base = os.path.dirname(os.path.abspath(path))
    name = context or config.get("current-context")
    if not name:
        raise KubeConnectionError(f"kubeconfig {path}: no current-context")
    ctx = _named(config.get("contexts"), str(name), "context")
    cluster = _named(config.get("clusters"), str(ctx.get("cluster")), "cluster")
    user = _named(config.get("users"), str(ctx.get("user")), "user") if ctx.get("user") else {}
    server = cluster.get("server")
    if not server:
        raise KubeConnectionError(f"kubeconfig {path}: cluster {ctx.get('cluster')!r} has no server")
    for plugin in ("exec", "auth-provider"):
        if user.get(plugin):
            raise KubeConnectionError(
                f"kubeconfig {path}: user {ctx.get('user')!r} uses {plugin}, which flexgw does not"
                " run; give it a token, a tokenFile or a client certificate"
            )
    ca_pem = _data_or_file(cluster, "certificate-authority", base)
    cert = _data_or_file(user, "client-certificate", base)
    key = _data_or_file(user, "client-key", base)
    if (cert is None) != (key is None):
        raise KubeConnectionError(f"kubeconfig {path}: a client certificate needs both cert and key")
    client_pem = key + b"\n" + cert if cert is not None and key is not None else None
    token: Callable[[], str | None]
    if user.get("token"):
        fixed = str(user["token"])
        token = lambda: fixed
    elif user.get("tokenFile"):
        token = file_token(os.path.join(base, str(user["tokenFile"])))
    else:
        token = lambda: None
    insecure = bool(cluster.get("insecure-skip-tls-verify"))
    pool = HTTPConnectionPool(reactor, persistent=True)
    tls = not str(server).startswith("http://")
    client = make_client(reactor, pool, ca_pem, client_pem, insecure, tls)
    namespace = ctx.get("namespace")
    return Connection(str(server).rstrip("/"), client, token, str(namespace) if namespace else None, pool)
