"""Kubernetes Ingress resources into routes: class filtering, listener binding, backends, precedence.

`apply_ingress` takes checked resources (from files today; a Kubernetes API watcher can build the
same `Resource` values from watched objects) and a resolved model, and returns the model with the
Ingress routes added to the ApiInstances they are bound to (or to the default Ingress listener).
Nothing here reads files; locations in problems come from each resource's `Document`.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from flexgw.config.address import Address, AddressError, parse_api_address
from flexgw.config.kubernetes import (
    API_INSTANCE_ANNOTATION,
    DEFAULT_CLASS_ANNOTATION,
    LEGACY_CLASS_ANNOTATION,
    TLS_SECRET_TYPE,
    decode_tls_secret,
    host_regex,
    normalise_prefix,
    parse_timestamp,
    path_regex,
)
from flexgw.config.located import Origin, origin_of
from flexgw.config.resolve import (
    DEFAULT_ORDER,
    ApiSpec,
    DestinationSpec,
    ResolvedModel,
    RouteSpec,
    RuleSpec,
)
from flexgw.config.sources import FieldPath
from flexgw.config.validate import Resource, ResourceId
from flexgw.plan import Balancing, Endpoint, Problem, Upstream
from flexgw.tls.settings import CertificateKey

CONTROLLER = "flexgw.dev/ingress-controller"  # what deploy/kubernetes/ingressclass.yaml says
# IngressClass spec.controller values that name flexgw: a real API server requires a
# domain-prefixed path; the bare "flexgw" is accepted too (files written before)
CONTROLLERS = frozenset({CONTROLLER, "flexgw"})
DEFAULT_LISTENER = "http://0.0.0.0:8080"
DEFAULT_TLS_LISTENER = "https://0.0.0.0:8443"
# the ApiInstance-like identity of the listener serving Ingresses without the annotation
DEFAULT_LISTENER_ID = ResourceId("IngressListener", "flexgw", "ingress")
DEFAULT_TLS_LISTENER_ID = ResourceId("IngressListener", "flexgw", "ingress-tls")
CLUSTER_DOMAIN = "cluster.local"
# port names / appProtocol values (lower case, before any "-suffix") -> upstream scheme
_SCHEMES = {"https": "https", "h2": "h2", "h2c": "h2c", "grpc": "h2c"}
_NEWEST = datetime.datetime.max.replace(tzinfo=datetime.UTC)


@attrs.frozen
class IngressOptions:
    """How flexgw acts as an Ingress controller (`--ingress-class`, ...)."""

    ingress_class: str = "flexgw"
    default_class: bool = False  # serve Ingresses without a class
    listener: Address = attrs.field(factory=lambda: parse_api_address(DEFAULT_LISTENER))
    # serves the Ingresses of `listener` too, with their spec.tls certificates, when one has any
    tls_listener: Address = attrs.field(factory=lambda: parse_api_address(DEFAULT_TLS_LISTENER))


def ingress_options(
    ingress_class: str,
    default_class: bool,
    listener: str,
    tls_listener: str = DEFAULT_TLS_LISTENER,
) -> IngressOptions:
    """Options from the command line; ValueError names the bad option."""
    if not ingress_class.strip():
        raise ValueError("--ingress-class must not be empty")
    addresses = []
    for flag, text, scheme in (
        ("--ingress-listener", listener, "http"),
        ("--ingress-tls-listener", tls_listener, "https"),
    ):
        try:
            address = parse_api_address(text)
        except AddressError as exc:
            raise ValueError(f"{flag} {text}: {exc}") from None
        if address.scheme != scheme:
            raise ValueError(f"{flag} {text}: must be an {scheme}:// address")
        addresses.append(address)
    if (addresses[0].host, addresses[0].port) == (addresses[1].host, addresses[1].port):
        raise ValueError("--ingress-listener and --ingress-tls-listener must differ")
    return IngressOptions(ingress_class.strip(), default_class, addresses[0], addresses[1])


@attrs.frozen
class _Candidate:
    """One Ingress path (or default backend) before conflicts are settled."""

    key: tuple[str, str, str, str]  # (listener key, host, path type, normalised path)
    rank: tuple[Any, ...]
    route: RouteSpec


def _metadata(resource: Resource) -> Mapping[str, Any]:
    value = resource.document.value
    metadata = value.get("metadata") if isinstance(value, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _annotations(resource: Resource) -> Mapping[str, str]:
    annotations = _metadata(resource).get("annotations")
    return annotations if isinstance(annotations, dict) else {}


def _age(resource: Resource) -> tuple[datetime.datetime, str, str]:
    """Kubernetes precedence: oldest creationTimestamp first (none: newest), then namespace/name."""
    stamp = _metadata(resource).get("creationTimestamp")
    when = _NEWEST
    if isinstance(stamp, str):
        try:
            when = parse_timestamp(stamp)
        except ValueError:  # reported by the checks; treated as newest
            pass
    return (when, resource.id.namespace, resource.id.name)


class _Classes:
    """Which IngressClass names flexgw serves, and whether it is the default class."""

    def __init__(self, options: IngressOptions, classes: Iterable[Resource]) -> None:
        self.names = {options.ingress_class}
        self.default = options.default_class
        for resource in classes:
            if resource.spec.get("controller") not in CONTROLLERS:
                continue
            self.names.add(resource.id.name)
            if str(_annotations(resource).get(DEFAULT_CLASS_ANNOTATION, "")).lower() == "true":
                self.default = True

    def note(self, resource: Resource) -> Problem | None:
        """None when flexgw serves this Ingress; otherwise the info note saying why not."""
        spec = resource.spec
        name = spec.get("ingressClassName")
        where: FieldPath = ("spec", "ingressClassName")
        if name is None:
            legacy = _annotations(resource).get(LEGACY_CLASS_ANNOTATION)
            if legacy is not None:
                name, where = legacy, ("metadata", "annotations", LEGACY_CLASS_ANNOTATION)
        if name is None:
            if self.default:
                return None
            return origin_of(resource, ("spec",)).problem(
                "info",
                "has no ingress class and flexgw is not the default class "
                "(--ingress-default-class, or an IngressClass marked default); ignored",
            )
        if name in self.names:
            return None
        served = ", ".join(repr(n) for n in sorted(self.names))
        return origin_of(resource, where).problem(
            "info", f"ingress class {name!r} is not served by flexgw ({served}); ignored"
        )


class _Backends:
    """Resolves `backend.service` to upstreams: a Kubernetes Service, else a flexgw Service."""

    def __init__(self, by_kind: Mapping[str, list[Resource]], flex: Mapping[str, Upstream]) -> None:
        self.services = {r.id.key: r for r in by_kind.get("KubernetesService", [])}
        self.endpoints = {r.id.key: r for r in by_kind.get("Endpoints", [])}
        self.slices: dict[str, list[Resource]] = {}
        for resource in by_kind.get("EndpointSlice", []):
            owner = resource.labels.get("kubernetes.io/service-name")
            if owner:
                self.slices.setdefault(f"{resource.id.namespace}/{owner}", []).append(resource)
        self.flex = flex
        self.upstreams: dict[str, Upstream] = {}

    def resolve(
        self, namespace: str, backend: Mapping[str, Any], origin: Origin, problems: list[Problem]
    ) -> tuple[DestinationSpec, ...]:
        """The destinations of a backend; () with an error problem when it cannot be resolved."""
        service = backend["service"]
        name = service["name"]
        key = f"{namespace}/{name}"
        wanted = service["port"]
        kube = self.services.get(key)
        if kube is None:
            if key in self.flex:
                return (DestinationSpec(key, "", 100, origin),)
            problems.append(
                origin.problem(
                    "error",
                    f"Service {key} not found (neither a Kubernetes v1 Service nor a flexgw Service); path not served",
                    ("service", "name"),
                )
            )
            return ()
        ports = [p for p in kube.spec.get("ports") or [] if isinstance(p, dict)]
        if "number" in wanted:
            port = next((p for p in ports if p.get("port") == wanted["number"]), None)
        else:
            port = next((p for p in ports if p.get("name") == wanted["name"]), None)
        if port is None:
            shown = wanted.get("number", wanted.get("name"))
            problems.append(
                origin.problem(
                    "error",
                    f"Service {key} has no port {shown!r}; path not served",
                    ("service", "port"),
                )
            )
            return ()
        scheme = self._scheme(port)
        upstream_key = f"{key}:{port['port']}"
        endpoints = self._endpoints(kube, port, origin, problems)
        if endpoints is not None:
            if not endpoints:
                return ()
            # The ready addresses of the Service are one upstream's balanced set
            # (flexgw.upstream.cluster: one pool per address, round robin, health checks and
            # retries as for any Service), named as a client in the cluster names the Service:
            # every address gets the same Host (and TLS name), <name>.<namespace>.svc at the
            # Service port, whichever address takes the request.
            host = f"{kube.id.name}.{kube.id.namespace}.svc.{CLUSTER_DOMAIN}"
            self.upstreams[upstream_key] = Upstream(
                key=upstream_key,
                scheme=scheme,
                host=host,
                port=int(port["port"]),
                balancing=Balancing(endpoints=tuple(Endpoint(h, n) for h, n in endpoints)),
            )
            return (DestinationSpec(upstream_key, "", 100, origin),)
        host, number = self._target(kube, port)
        self.upstreams[upstream_key] = Upstream(
            key=upstream_key, scheme=scheme, host=host, port=number
        )
        return (DestinationSpec(upstream_key, "", 100, origin),)

    @staticmethod
    def _scheme(port: Mapping[str, Any]) -> str:
        """The upstream scheme from appProtocol, else the port name `<protocol>[-suffix]`.

        As a flexgw Service address: https (TLS), h2 (HTTP/2 over TLS), h2c (HTTP/2 with prior
        knowledge; also grpc and kubernetes.io/h2c); anything else plain HTTP/1.1.
        """
        label = str(port.get("appProtocol") or port.get("name") or "http").lower()
        label = label.removeprefix("kubernetes.io/").split("-", 1)[0]
        return _SCHEMES.get(label, "http")

    def _endpoints(
        self,
        kube: Resource,
        port: Mapping[str, Any],
        origin: Origin,
        problems: list[Problem],
    ) -> list[tuple[str, int]] | None:
        """The ready (address, port) pairs of the Service's EndpointSlices, else of its
        Endpoints (an error problem when there is none); None without either document."""
        key = kube.id.key
        name = port.get("name")
        if key in self.slices:
            found = []
            for item in self.slices[key]:
                numbers = [
                    p.get("port")
                    for p in item.spec.get("ports") or []
                    if isinstance(p, dict) and (p.get("name") or None) == (name or None)
                ]
                if not numbers or not isinstance(numbers[0], int):
                    continue
                for endpoint in item.spec.get("endpoints") or []:
                    if (endpoint.get("conditions") or {}).get("ready") is False:
                        continue
                    found.append((endpoint["addresses"][0], numbers[0]))
            return self._some(found, key, "EndpointSlices", origin, problems)
        if key in self.endpoints:
            found = []
            for subset in self.endpoints[key].spec.get("subsets") or []:
                sports = [p for p in subset.get("ports") or [] if isinstance(p, dict)]
                match = [p for p in sports if (p.get("name") or None) == (name or None)]
                if not match and len(sports) == 1 and not name:
                    match = sports
                if not match:
                    continue
                for address in subset.get("addresses") or []:
                    found.append((address["ip"], match[0]["port"]))
            return self._some(found, key, "Endpoints", origin, problems)
        return None

    @staticmethod
    def _target(kube: Resource, port: Mapping[str, Any]) -> tuple[str, int]:
        """Without endpoints: the external name, else clusterIP, else the cluster DNS name."""
        spec = kube.spec
        if spec.get("type") == "ExternalName":
            return (str(spec["externalName"]), int(port["port"]))
        cluster_ip = spec.get("clusterIP")
        if isinstance(cluster_ip, str) and cluster_ip and cluster_ip != "None":
            return (cluster_ip, int(port["port"]))
        number = port.get("targetPort") if cluster_ip == "None" else port["port"]
        if not isinstance(number, int):
            number = port["port"]
        return (f"{kube.id.name}.{kube.id.namespace}.svc.{CLUSTER_DOMAIN}", int(number))

    @staticmethod
    def _some(
        found: list[tuple[str, int]], key: str, what: str, origin: Origin, problems: list[Problem]
    ) -> list[tuple[str, int]]:
        if not found:
            problems.append(
                origin.problem(
                    "error",
                    f"Service {key} has no ready address for this port in its {what}; path not served",
                )
            )
        return sorted(set(found))


def _backend_rank(path_type: str, path: str) -> tuple[int, int]:
    """Longer paths first; at equal length Exact before Prefix before ImplementationSpecific."""
    order = {"Exact": 0, "Prefix": 1}.get(path_type, 2)
    return (-len(path), order)


def _host_rank(host: str | None) -> int:
    if not host:
        return 2
    return 1 if host.startswith("*.") else 0


def apply_ingress(
    model: ResolvedModel, resources: Iterable[Resource], options: IngressOptions | None = None
) -> ResolvedModel:
    """`model` with the routes of every Ingress flexgw serves, and the problems found.

    Routes join the ApiInstance named by the api-instance annotation (its listener and its
    policies apply), or a listener of their own at `options.listener`. The same host and path
    from two Ingresses on one listener: the oldest Ingress wins (then namespace/name), the other
    is a warning.
    """
    options = options or IngressOptions()
    by_kind: dict[str, list[Resource]] = {}
    for resource in resources:
        by_kind.setdefault(resource.id.kind, []).append(resource)
    ingresses = by_kind.get("Ingress", [])
    if not ingresses:
        return model
    problems = list(model.problems)
    classes = _Classes(options, by_kind.get("IngressClass", []))
    apis = {api.id: api for api in model.apis}
    backends = _Backends(by_kind, model.upstreams)
    secrets = {r.id.key: r for r in by_kind.get("Secret", [])}
    candidates: dict[str, list[_Candidate]] = {}
    certificates: dict[str, list[CertificateKey]] = {}
    unannotated: list[Resource] = []  # served on the default listener(s)

    for age, resource in enumerate(sorted(ingresses, key=_age)):
        note = classes.note(resource)
        if note is not None:
            problems.append(note)
            continue
        binding = _annotations(resource).get(API_INSTANCE_ANNOTATION)
        api: ApiSpec | None = None
        if binding is not None:
            name, dot, namespace = str(binding).strip().rpartition(".")
            target = ResourceId(
                "ApiInstance",
                namespace if dot else resource.id.namespace,
                name if dot else namespace,
            )
            if target not in apis:
                problems.append(
                    origin_of(
                        resource, ("metadata", "annotations", API_INSTANCE_ANNOTATION)
                    ).problem("error", f"{target} does not exist; this Ingress is not served")
                )
                continue
            listener = target.key
            api = apis[target]
        else:
            listener = DEFAULT_LISTENER_ID.key
            unannotated.append(resource)
        found = candidates.setdefault(listener, [])
        found.extend(_routes(resource, age, listener, backends, problems))
        usable = api is None or bool(api.tls) or api.address.scheme == "https"
        for origin, certificate in _certificates(resource, secrets, problems):
            if not usable:
                assert api is not None
                problems.append(
                    origin.problem(
                        "warning",
                        f"the certificate is not used: {api.id} serves plain HTTP (an https:// "
                        "address or a tls binding makes its port TLS); these hosts are served "
                        "over plain HTTP only",
                    )
                )
                continue
            certificates.setdefault(listener, []).append(certificate)

    for listener, found in candidates.items():
        kept = _settle(found, problems)
        owned = tuple(certificates.get(listener, ()))
        if listener == DEFAULT_LISTENER_ID.key:
            origin = origin_of(unannotated[0])
            none: tuple[CertificateKey, ...] = ()
            listeners = [(DEFAULT_LISTENER_ID, options.listener, "--ingress-listener", none)]
            if owned:  # as a Kubernetes controller: every route on the TLS port as well
                listeners.append(
                    (DEFAULT_TLS_LISTENER_ID, options.tls_listener, "--ingress-tls-listener", owned)
                )
            for rid, address, flag, owned_here in listeners:
                taken = _port_user(apis, address)
                if taken is not None:
                    for resource in unannotated:
                        problems.append(
                            origin_of(resource).problem(
                                "error",
                                f"no {API_INSTANCE_ANNOTATION} annotation, and {flag} "
                                f"{address.scheme}://{address.host}:{address.port} is on the port of "
                                f"{taken}; not served there (annotate the Ingress, or choose another {flag})",
                            )
                        )
                    continue
                apis[rid] = ApiSpec(
                    id=rid,
                    address=address,
                    routes=tuple(kept),
                    origin=origin,
                    certificates=owned_here,
                )
        else:
            rid = next(rid for rid in apis if rid.key == listener and rid.kind == "ApiInstance")
            apis[rid] = attrs.evolve(
                apis[rid],
                routes=apis[rid].routes + tuple(kept),
                certificates=apis[rid].certificates + owned,
            )
    upstreams = dict(model.upstreams)
    upstreams.update(backends.upstreams)
    return attrs.evolve(
        model,
        apis=tuple(apis.values()),
        upstreams=upstreams,
        problems=tuple(problems),
    )


def _port_user(apis: Mapping[ResourceId, ApiSpec], address: Address) -> ResourceId | None:
    """The ApiInstance (not blocked) listening on `address`'s port, if any: a default Ingress
    listener (no base path) could share it with none."""
    for rid, api in sorted(apis.items()):
        if rid.kind == "ApiInstance" and not api.blocked and api.address.port == address.port:
            return rid
    return None


def _routes(
    resource: Resource,
    age: int,
    listener: str,
    backends: _Backends,
    problems: list[Problem],
) -> list[_Candidate]:
    """Every path of one Ingress as a candidate route, plus its default backend."""
    spec = resource.spec
    ns = resource.id.namespace
    out: list[_Candidate] = []
    rules = spec.get("rules") or []
    default = spec.get("defaultBackend")
    for i, rule in enumerate(rules):
        host = rule.get("host")
        http = rule.get("http")
        if http is None:
            if default is None:
                problems.append(
                    origin_of(resource, ("spec", "rules", i)).problem(
                        "warning", "a rule without http paths and no defaultBackend; ignored"
                    )
                )
                continue
            # a host without paths: every path of that host goes to the default backend
            where: FieldPath = ("spec", "rules", i)
            paths: list[tuple[Mapping[str, Any], FieldPath, FieldPath]] = [
                (
                    {"pathType": "Prefix", "path": "/", "backend": default},
                    where,
                    ("spec", "defaultBackend"),
                )
            ]
        else:
            paths = []
            for j, item in enumerate(http["paths"]):
                where = ("spec", "rules", i, "http", "paths", j)
                paths.append((item, where, where + ("backend",)))
        for item, where, backend_where in paths:
            path_type = item["pathType"]
            path = item.get("path") or ("/" if path_type != "ImplementationSpecific" else "")
            shown = normalise_prefix(path) or "/" if path_type == "Prefix" else path
            origin = origin_of(resource, where)
            destinations = backends.resolve(
                ns, item["backend"], origin_of(resource, backend_where), problems
            )
            if not destinations:
                continue
            regex = path_regex(path_type, path)
            route = RouteSpec(
                name=f"{resource.id.key}:{_dotted(where)}",
                order=DEFAULT_ORDER,
                rules=(RuleSpec(path=regex, host=host_regex(host)),),
                destinations=destinations,
                origin=origin,
            )
            rank: tuple[int, ...] = (0, _host_rank(host), *_backend_rank(path_type, path), age)
            key = (listener, host or "", path_type if path_type != "Prefix" else "Prefix", shown)
            out.append(_Candidate(key, rank, attrs.evolve(route, rank=rank)))
    if default is not None:
        where = ("spec", "defaultBackend")
        destinations = backends.resolve(ns, default, origin_of(resource, where), problems)
        if destinations:
            rank = (1, age)
            route = RouteSpec(
                name=f"{resource.id.key}:spec.defaultBackend",
                order=DEFAULT_ORDER,
                rules=(),
                destinations=destinations,
                origin=origin_of(resource, where),
                rank=rank,
            )
            out.append(_Candidate((listener, "", "default", ""), rank, route))
    return out


def _dotted(path: FieldPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + part
    return out


def _settle(found: list[_Candidate], problems: list[Problem]) -> list[RouteSpec]:
    """Keep the first (oldest Ingress) of each host+path; report the others as warnings."""
    winners: dict[tuple[str, str, str, str], _Candidate] = {}
    kept = []
    for candidate in sorted(found, key=lambda c: (c.rank[-1], c.route.name)):
        winner = winners.get(candidate.key)
        if winner is None:
            winners[candidate.key] = candidate
            kept.append(candidate.route)
            continue
        _, host, path_type, path = candidate.key
        what = "default backend" if path_type == "default" else f"{path_type} path {path!r}"
        if host:
            what += f" for host {host}"
        problems.append(
            candidate.route.origin.problem(
                "warning",
                f"{what} is already served by {winner.route.name} (older, or first by "
                "namespace/name); this one is not served",
            )
        )
    return kept


def _certificates(
    resource: Resource,
    secrets: Mapping[str, Resource],
    problems: list[Problem],
) -> list[tuple[Origin, CertificateKey]]:
    """The certificates of `spec.tls[]`, from kubernetes.io/tls Secrets in the Ingress' namespace.

    A certificate is picked by SNI for the item's `hosts` (its own DNS names when none are
    given); a host the certificate does not cover is a warning (clients would refuse it).
    """
    out = []
    for i, item in enumerate(resource.spec.get("tls") or []):
        where: FieldPath = ("spec", "tls", i)
        origin = origin_of(resource, where)
        name = item.get("secretName")
        hosts = tuple(host.lower() for host in item.get("hosts") or ())
        if name is None:
            problems.append(
                origin.problem(
                    "warning", "no secretName: flexgw has no default certificate; ignored"
                )
            )
            continue
        key = f"{resource.id.namespace}/{name}"
        secret = secrets.get(key)
        if secret is None:
            problems.append(
                origin.problem(
                    "error",
                    f"Secret {key} not found (or invalid); no certificate for "
                    f"{', '.join(hosts) or 'these hosts'}",
                    ("secretName",),
                )
            )
            continue
        if secret.spec.get("type") != TLS_SECRET_TYPE:
            problems.append(
                origin.problem(
                    "error", f"Secret {key} is not of type {TLS_SECRET_TYPE}", ("secretName",)
                )
            )
            continue
        pair, _ = decode_tls_secret(secret.spec)
        if pair is None:  # reported with the Secret's own checks
            continue
        subjects = tuple(s.lower() for s in pair.subjects)
        for j, host in enumerate(hosts):
            if not _covers(subjects, host):
                problems.append(
                    origin.problem(
                        "warning",
                        f"the certificate of Secret {key} does not cover {host} "
                        f"(its names: {', '.join(subjects) or 'none'})",
                        ("hosts", j),
                    )
                )
        # the same normal form as a tls binding's certificate (one PEM per certificate, PKCS#8)
        chain = x509.load_pem_x509_certificates(pair.chain_pem)
        private = serialization.load_pem_private_key(pair.key_pem, password=None)
        certificate = CertificateKey(
            chain_pem=tuple(c.public_bytes(serialization.Encoding.PEM) for c in chain),
            key_pem=private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            names=hosts or subjects,
        )
        out.append((origin, certificate))
    return out


def _covers(names: tuple[str, ...], host: str) -> bool:
    """Whether a certificate with DNS names `names` is valid for `host` (RFC 6125 wildcards)."""
    if host in names:
        return True
    if host.startswith("*."):
        return False
    parent = host.split(".", 1)[1] if "." in host else ""
    return bool(parent) and f"*.{parent}" in names
