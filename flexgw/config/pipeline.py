"""The whole configuration pipeline, with reload semantics: load, check, keep last good, resolve, compile."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from flexgw.config.compile import compile_default_tls, compile_model
from flexgw.config.ingress import IngressOptions, apply_ingress
from flexgw.config.load import discover_files, load_file
from flexgw.config.resolve import resolve
from flexgw.config.validate import Checked, Resource, ResourceId, check_document
from flexgw.plan import GatewayPlan, Problem


@attrs.frozen
class ConfigState:
    """One configuration generation: the plan plus what the next reload needs to keep last good versions."""

    plan: GatewayPlan
    # the resources the plan was built from, and which file each came from
    resources: Mapping[ResourceId, Resource] = attrs.field(factory=dict)
    files: Mapping[str, tuple[ResourceId, ...]] = attrs.field(factory=dict)
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


def load_config(
    conf_dirs: Iterable[str | os.PathLike[str]],
    environ: Mapping[str, str],
    previous: ConfigState | None = None,
    strict: bool = False,
    runtime: Any = None,
    ingress: IngressOptions | None = None,
) -> ConfigState:
    """Load every resource below `conf_dirs` and compile a new plan; never raises on bad input.

    With `previous`, a resource whose new version fails its checks keeps its previous version,
    and a file that cannot be parsed keeps the previous versions of every resource it held.
    `ingress` says how Kubernetes Ingress documents are served (class, default listener).
    """
    problems: list[Problem] = []
    files, discover_problems = discover_files(conf_dirs)
    problems.extend(discover_problems)
    old_resources = previous.resources if previous is not None else {}
    old_files = previous.files if previous is not None else {}

    chosen: dict[ResourceId, Resource] = {}
    origin_file: dict[ResourceId, str] = {}
    carried: list[tuple[str, Resource]] = []  # resources kept from unparseable files
    failed: list[Checked] = []
    for path in files:
        loaded = load_file(path)
        problems.extend(loaded.problems)
        if loaded.failed:
            kept = [old_resources[rid] for rid in old_files.get(path, ()) if rid in old_resources]
            if kept:
                problems.append(
                    Problem(
                        "warning",
                        f"keeping the last good version of {len(kept)} resource(s) from this file",
                        file=path,
                    )
                )
            carried.extend((path, resource) for resource in kept)
            continue
        for document in loaded.documents:
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
                    Problem(
                        "warning",
                        "invalid; the last good version keeps serving",
                        file=document.file,
                        line=document.locate(())[0],
                        column=document.locate(())[1],
                        resource=str(rid),
                    )
                )
            if rid in chosen:
                line, column = document.locate(("metadata", "name"))
                problems.append(
                    Problem(
                        "warning",
                        f"defined again (first in {origin_file[rid]}); this later definition wins",
                        file=document.file,
                        line=line,
                        column=column,
                        resource=str(rid),
                    )
                )
            chosen[rid] = resource
            origin_file[rid] = path
    for path, resource in carried:
        if resource.id not in chosen:
            chosen[resource.id] = resource
            origin_file[resource.id] = path

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

    by_file: dict[str, list[ResourceId]] = {}
    for rid, path in origin_file.items():
        by_file.setdefault(path, []).append(rid)
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
        files={path: tuple(rids) for path, rids in by_file.items()},
        served=compiled.served,
        tls_good=compiled.tls_good,
    )


def _storage_tls_files(storage: Any) -> tuple[str, ...]:
    """The certificate/CA files `sharedStorage.redis.tls` read (watched like the others)."""
    if storage is None or storage.tls is None:
        return ()
    return tuple(storage.tls.files)
