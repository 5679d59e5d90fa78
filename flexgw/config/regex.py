"""Rule regexes: Python `re` limited to what RE2 (Flex's engine) accepts, compiled once."""

from __future__ import annotations

import re

_UNSUPPORTED_GROUPS = (
    ("(?=", "look-ahead"),
    ("(?!", "negative look-ahead"),
    ("(?<=", "look-behind"),
    ("(?<!", "negative look-behind"),
    ("(?P=", "back-reference"),
    ("(?(", "conditional group"),
    ("(?>", "atomic group"),
    ("(?#", "comment group"),
)


class RegexError(ValueError):
    """A rule regex that RE2 would reject or Python cannot compile; `position` is 0-based."""

    def __init__(self, message: str, position: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.position = position


def re2_violation(pattern: str) -> tuple[int, str] | None:
    """(0-based offset, description) of the first construct RE2 does not support, if any."""
    i = 0
    in_class = False
    n = len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            nxt = pattern[i + 1] if i + 1 < n else ""
            if not in_class and nxt.isdigit() and nxt != "0":
                return i, "back-reference"
            i += 2
            continue
        if in_class:
            if ch == "]":
                in_class = False
            i += 1
            continue
        if ch == "[":
            in_class = True
            i += 1
            if i < n and pattern[i] == "^":
                i += 1
            if i < n and pattern[i] == "]":  # a literal ] first in the class
                i += 1
            continue
        if ch == "(":
            for prefix, name in _UNSUPPORTED_GROUPS:
                if pattern.startswith(prefix, i):
                    return i, name
        if ch in "*+?}" and i + 1 < n and pattern[i + 1] == "+":
            return i + 1, "possessive quantifier"
        i += 1
    return None


def compile_rule_regex(pattern: str) -> re.Pattern[str]:
    """Compile a rule regex for full matching; raises RegexError (with a position) when invalid."""
    violation = re2_violation(pattern)
    if violation is not None:
        offset, name = violation
        raise RegexError(f"{name} is not supported (Flex uses RE2)", offset)
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise RegexError(exc.msg, exc.pos) from None
    except (RecursionError, OverflowError, ValueError):
        raise RegexError("regex too complex", None) from None
