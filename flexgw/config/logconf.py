"""`Configuration.spec.logging`: the runtime log level and where runtime and access logs go.

Flex keys (reference §5.1): `outputs[]` (`name`, `type`, `parameters`), `runtimeLogs.logLevel`
(debug | info | warn | error | fatal) and `runtimeLogs.outputs`, `accessLogs.outputs` (output
names). Output types served: `file` (`parameters.file`, or `path` + `file`; `format: template`
with `template`, otherwise JSON lines) and `stdout`. Other Fluent Bit types (http, splunk,
kafka, ...) are a warning each and ignored. `FLEX_LOG_LEVEL` (a number as Flex, or a level
name) sets the runtime level when no Configuration does.

Template variables: Flex's `{date}`, `{logger}`, `{level}`, `{kind}`, `{message}`; for access
logs also the fields of the JSON access-log line (§5.2: `{method}`, `{path}`, `{status}`,
`{client}`, `{listener}`, `{version}`, `{api}`, `{route}`, `{upstream}`, `{bytes_in}`,
`{bytes_out}`, `{duration_ms}`, `{upstream_ms}`, `{error}`, `{time}`) and the aliases
`{latency}` (duration_ms) and `{bytes}` (bytes_out). An unknown variable is an error naming
its position in the template.

Several Configurations with `logging`: the last by resource id wins, with a warning.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from flexgw.config.located import last_configuration_block
from flexgw.plan import LoggingSettings, LogOutput, Problem, Template

#: Config `logLevel` values -> Twisted level names.
LEVELS = {
    "trace": "debug",
    "debug": "debug",
    "info": "info",
    "warn": "warn",
    "warning": "warn",
    "error": "error",
    "fatal": "critical",
    "critical": "critical",
}
FLEX_VARIABLES = frozenset({"date", "logger", "level", "kind", "message"})
ACCESS_FIELDS = frozenset(
    {
        "time", "client", "listener", "method", "path", "version", "api", "route", "upstream",
        "status", "bytes_in", "bytes_out", "duration_ms", "upstream_ms", "error", "trace_id",
        "span_id",
    }
)
ALIASES = {"latency": "duration_ms", "bytes": "bytes_out"}
VARIABLES = FLEX_VARIABLES | ACCESS_FIELDS | frozenset(ALIASES)
_VARIABLE = re.compile(r"\{([^{}]*)\}")
_JSON_FORMATS = frozenset({"json", "json_lines", "plain"})


def compile_template(source: str) -> Template:
    """Compile `source`; raises ValueError naming the first unknown variable and its offset."""
    literals: list[str] = []
    names: list[str] = []
    last = 0
    for match in _VARIABLE.finditer(source):
        name = match.group(1).strip()
        if name not in VARIABLES:
            raise ValueError(
                f"unknown template variable {{{match.group(1)}}} at character {match.start() + 1};"
                f" known: {', '.join(sorted(VARIABLES))}"
            )
        literals.append(source[last : match.start()])
        names.append(ALIASES.get(name, name))
        last = match.end()
    literals.append(source[last:])
    return Template(source, tuple(literals), tuple(names))


def level_from_env(environ: Mapping[str, str], problems: list[Problem]) -> str | None:
    """FLEX_LOG_LEVEL: Flex's numbers (NONE -1 ... ALL), or a level name; None when unset."""
    text = environ.get("FLEX_LOG_LEVEL", "").strip()
    if not text:
        return None
    if text.lower() in LEVELS:
        return LEVELS[text.lower()]
    try:
        number = int(text)
    except ValueError:
        problems.append(
            Problem("error", f"FLEX_LOG_LEVEL={text!r} is not a log level", field="FLEX_LOG_LEVEL")
        )
        return None
    # NONE -1, FATAL 0, ERROR 1, WARN 2, INFO 4, DEBUG 8, TRACE 16, ALL 2147483647.
    # Twisted has nothing above critical: NONE keeps critical events only.
    if number >= 8:
        return "debug"
    if number >= 4:
        return "info"
    if number >= 2:
        return "warn"
    return "error" if number == 1 else "critical"


def resolve_logging(
    configurations: Sequence[Any], environ: Mapping[str, str], problems: list[Problem]
) -> LoggingSettings:
    """The logging settings of the last Configuration with `logging`, FLEX_LOG_LEVEL otherwise."""
    env_level = level_from_env(environ, problems)
    chosen = last_configuration_block(configurations, "logging", problems)
    if chosen is None:
        return LoggingSettings(runtime_level=env_level)
    block, origin = chosen
    for key in block:
        if key not in ("outputs", "runtimeLogs", "accessLogs"):
            problems.append(
                origin.problem("warning", f"{key!r} is not supported; ignored", (key,), True)
            )
    outputs: dict[str, LogOutput | None] = {}  # None: declared but not served
    raw_outputs = block.get("outputs")
    if raw_outputs is not None and not isinstance(raw_outputs, list):
        problems.append(origin.problem("error", "must be a list of outputs", ("outputs",)))
        raw_outputs = []
    for n, raw in enumerate(raw_outputs or ()):
        name, output = _output(raw, origin, ("outputs", n), problems)
        if name is not None:
            outputs[name] = output

    level = None
    runtime: tuple[LogOutput, ...] = ()
    access: tuple[LogOutput, ...] = ()
    for section in ("runtimeLogs", "accessLogs"):
        part = block.get(section)
        if part is None:
            continue
        if not isinstance(part, dict):
            problems.append(origin.problem("error", "must be a mapping", (section,)))
            continue
        allowed = ("logLevel", "outputs") if section == "runtimeLogs" else ("outputs",)
        for key in part:
            if key not in allowed:
                problems.append(
                    origin.problem(
                        "warning", f"{key!r} is not supported; ignored", (section, key), True
                    )
                )
        if section == "runtimeLogs" and part.get("logLevel") is not None:
            raw_level = part["logLevel"]
            level = LEVELS.get(str(raw_level).strip().lower())
            if level is None:
                problems.append(
                    origin.problem(
                        "error",
                        f"{raw_level!r} is not a log level (debug, info, warn, error, fatal)",
                        (section, "logLevel"),
                    )
                )
        chosen_outputs = _references(part.get("outputs"), outputs, origin, section, problems)
        if section == "runtimeLogs":
            runtime = chosen_outputs
        else:
            access = chosen_outputs
    return LoggingSettings(
        runtime_level=level if level is not None else env_level,
        runtime_outputs=runtime,
        access_outputs=access,
    )


def _references(
    names: Any,
    outputs: Mapping[str, LogOutput | None],
    origin: Any,
    section: str,
    problems: list[Problem],
) -> tuple[LogOutput, ...]:
    """The served outputs a `runtimeLogs`/`accessLogs` section names."""
    if names is None:
        return ()
    if not isinstance(names, list):
        problems.append(origin.problem("error", "must be a list of output names", (section, "outputs")))
        return ()
    chosen: list[LogOutput] = []
    for n, name in enumerate(names):
        if not isinstance(name, str) or name not in outputs:
            problems.append(
                origin.problem(
                    "error", f"{name!r} is not the name of an output", (section, "outputs", n)
                )
            )
            continue
        output = outputs[name]
        if output is not None and output not in chosen:
            chosen.append(output)
    return tuple(chosen)


def _output(
    raw: Any, origin: Any, at: tuple[Any, ...], problems: list[Problem]
) -> tuple[str | None, LogOutput | None]:
    """(name, output) of one `outputs` item; output None when it is not served."""
    if not isinstance(raw, dict):
        problems.append(origin.problem("error", "an output must be a mapping", at))
        return None, None
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        problems.append(origin.problem("error", "an output needs a `name`", at))
        return None, None
    kind = str(raw.get("type") or "").strip().lower()
    if not kind:
        problems.append(origin.problem("error", "an output needs a `type`", at))
        return name, None
    parameters = raw.get("parameters") or {}
    if not isinstance(parameters, dict):
        problems.append(origin.problem("error", "must be a mapping", (*at, "parameters")))
        return name, None
    if kind not in ("file", "stdout"):
        problems.append(
            origin.problem(
                "warning",
                f"output type {raw.get('type')!r} is not supported yet (file and stdout are);"
                " this output is ignored",
                (*at, "type"),
            )
        )
        return name, None
    path = None
    if kind == "file":
        file = parameters.get("file")
        directory = parameters.get("path")
        if not isinstance(file, str) or not file:
            problems.append(
                origin.problem("error", "a file output needs `parameters.file`", (*at, "parameters"))
            )
            return name, None
        path = os.path.join(str(directory), file) if directory else file
    template = None
    fmt = str(parameters.get("format") or "").strip().lower()
    if fmt == "template":
        source = parameters.get("template")
        if not isinstance(source, str):
            problems.append(
                origin.problem(
                    "error", "`format: template` needs `parameters.template`", (*at, "parameters")
                )
            )
            return name, None
        try:
            template = compile_template(source)
        except ValueError as exc:
            problems.append(origin.problem("error", str(exc), (*at, "parameters", "template")))
            return name, None
    elif fmt and fmt not in _JSON_FORMATS:
        problems.append(
            origin.problem(
                "warning",
                f"format {parameters.get('format')!r} is not supported yet; JSON lines are written",
                (*at, "parameters", "format"),
            )
        )
    return name, LogOutput(name=name, type=kind, path=path, template=template)
