"""The whole configuration pipeline, with reload semantics: read a source, check, keep last good, resolve, compile."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from twisted.logger import Logger

from flexgw.config.compile import compile_default_tls, compile_model
from flexgw.config.ingress import IngressOptions, apply_ingress
from flexgw.config.resolve import resolve
from flexgw.config.sources import ConfigSource
from flexgw.config.sources.files import FileSource
from flexgw.config.validate import Checked, Resource, ResourceId, check_document
from flexgw.plan import GatewayPlan, Problem

log = Logger()


@attrs.frozen
class ConfigState:
    """One configuration generation: the plan plus what the next reload needs to keep last good versions."""

    plan: GatewayPlan
    # the resources the plan was built from, and the ones each origin (a file) held
    resources: Mapping[ResourceId, Resource] = attrs.field(factory=dict)
    origins: Mapping[str, tuple[ResourceId, ...]] = attrs.field(factory=dict)
    served: frozenset[str] = frozenset()  # ApiInstance keys served by the plan
    tls_good: Mapping[str, Any] = attrs.field(factory=dict)  # last good TLS settings by binding

    @property
    def problems(self) -> tuple[Problem, ...]:
        """Every problem found, errors and warnings."""
        return self.plan.problems

    @property
    def errors(self) -> tuple[Problem, ...]:
        """The problems that are errors."""
        return tuple(p for p in self.plan.problems if p.severity == "error")

    @property
    def ok(self) -> bool:
        """True when no problem is an error."""
        return not self.errors


def as_source(source: ConfigSource | Iterable[str | os.PathLike[str]]) -> ConfigSource:
    """`source` itself, or the file source of the directories it names (--conf)."""
    if hasattr(source, "read"):
        return source  # type: ignore[return-value]
    return FileSource(source)  # type: ignore[arg-type]


def load_config(
    source: ConfigSource | Iterable[str | os.PathLike[str]],
    environ: Mapping[str, str],
    previous: ConfigState | None = None,
    strict: bool = False,
    runtime: Any = None,
    ingress: IngressOptions | None = None,
) -> ConfigState:
    """Read every resource `source` holds (a ConfigSource, or directories for the file source)
    and compile a new plan; never raises on bad input.

    With `previous`, a resource whose new version fails its checks keeps its previous version,
    and a unit (a file) that cannot be read keeps the previous versions of every resource it held.
    `ingress` says how Kubernetes Ingress documents are served (class, default listener).
    """
    problems: list[Problem] = []
    snapshot = as_source(source).read()
    problems.extend(snapshot.problems)
    old_resources = previous.resources if previous is not None else {}
    old_origins = previous.origins if previous is not None else {}

    chosen: dict[ResourceId, Resource] = {}
    origin_of: dict[ResourceId, str] = {}
    source_of: dict[ResourceId, str] = {}
    carried: list[tuple[str, Resource]] = []  # resources kept from units that cannot be read
    failed: list[Checked] = []
    for unit in snapshot.units:
        problems.extend(unit.problems)
        if unit.failed:
            kept = [old_resources[rid] for rid in old_origins.get(unit.origin, ()) if rid in old_resources]
            if kept:
                problems.append(
                    Problem(
                        "warning",
                        f"keeping the last good version of {len(kept)} resource(s) from this file",
                        file=unit.origin,
                    )
                )
            carried.extend((unit.origin, resource) for resource in kept)
            continue
        for document in unit.documents:
            checked = check_document(document, environ, strict)
            problems.extend(checked.problems)
            rid = checked.id
            if rid is None:
                continue
            resource = checked.resource
            if resource is None:
                resource = old_resources.get(rid)
                if resource is None:
                    failed.append(checked)
                    continue
                problems.append(
                    document.problem(
                        "warning", "invalid; the last good version keeps serving", resource=str(rid)
                    )
                )
            if rid in chosen and source_of.get(rid, "") != unit.source:
                problems.append(
                    document.problem(
                        "error",
                        f"also defined by the {source_of[rid] or 'first'} source ({origin_of[rid]});"
                        f" a resource may come from one source only: that one keeps serving",
                        ("metadata", "name"),
                        resource=str(rid),
                        field="metadata.name",
                    )
                )
                continue
            if rid in chosen:
                problems.append(
                    document.problem(
                        "warning",
                        f"defined again (first in {origin_of[rid]}); this later definition wins",
                        ("metadata", "name"),
                        resource=str(rid),
                    )
                )
            chosen[rid] = resource
            origin_of[rid] = unit.origin
            source_of[rid] = unit.source
    for origin, resource in carried:
        if resource.id not in chosen:
            chosen[resource.id] = resource
            origin_of[resource.id] = origin

    model = resolve(chosen.values(), environ, failed)
    model = apply_ingress(model, chosen.values(), ingress)
    use_shared_storage = getattr(runtime, "use_shared_storage", None)
    if use_shared_storage is not None:  # before policies are built: they choose their store
        use_shared_storage(model.shared_storage)
    use_forward_proxy = getattr(runtime, "use_forward_proxy", None)
    if use_forward_proxy is not None:  # before policies are built: their side-call agent
        use_forward_proxy(model.forward_proxy)
    side_tls, side_problems = compile_default_tls(model)
    problems.extend(side_problems)
    use_side_tls = getattr(runtime, "use_side_tls", None)
    if use_side_tls is not None:  # before policies are built: their side calls use its Agent
        use_side_tls(side_tls)
    compiled = compile_model(
        model,
        prefer=previous.served if previous is not None else (),
        runtime=runtime,
        last_good_tls=previous.tls_good if previous is not None else {},
    )
    problems.extend(compiled.problems)

    by_origin: dict[str, list[ResourceId]] = {}
    for rid, origin in origin_of.items():
        by_origin.setdefault(origin, []).append(rid)
    generation = (previous.plan.generation if previous is not None else 0) + 1
    plan = GatewayPlan(
        listeners=compiled.listeners,
        timeouts=model.timeouts,
        http=model.http,
        problems=tuple(problems),
        generation=generation,
        shared_storage=model.shared_storage,
        probe=model.probe,
        proxy_protocol=model.proxy_protocol,
        logging=model.logging,
        # the collector is reached with the side calls' TLS settings (h2s://, https://)
        tracing=attrs.evolve(model.tracing[0], tls=side_tls) if model.tracing is not None else None,
        tls_files=tuple(
            sorted(
                set(compiled.tls_files)
                | set(side_tls.files if side_tls else ())
                | set(_storage_tls_files(model.shared_storage))
            )
        ),
    )
    return ConfigState(
        plan=plan,
        resources=chosen,
        origins={origin: tuple(rids) for origin, rids in by_origin.items()},
        served=compiled.served,
        tls_good=compiled.tls_good,
    )


def _storage_tls_files(storage: Any) -> tuple[str, ...]:
    """The certificate/CA files `sharedStorage.redis.tls` read (watched like the others)."""
    if storage is None or storage.tls is None:
        return ()
    return tuple(storage.tls.files)


class ConfiguredFiles:
    """The certificate, key and CA files a configuration reads, for a process without a plan of
    its own (the `--workers` supervisor): `refresh()` compiles the configuration aside (as
    `flexgw validate` does) and keeps `plan.tls_files`; calling the object returns them (cheap:
    the watcher asks at every poll)."""

    def __init__(
        self, source: ConfigSource | Iterable[str], environ: Mapping[str, str], **load_options: Any
    ):
        self.source = as_source(source)
        self.environ = environ
        self.load_options = load_options
        self.files: tuple[str, ...] = ()

    def refresh(self) -> None:
        """Compile the configuration again and keep the files it read (unchanged on failure)."""
        try:
            state = load_config(self.source, self.environ, **self.load_options)
        except Exception:  # noqa: BLE001 - load_config reports problems; this is a safety net
            log.failure("cannot list the configuration's TLS files")
            return
        self.files = state.plan.tls_files

    def __call__(self) -> tuple[str, ...]:
        return self.files
