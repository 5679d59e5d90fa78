"""Print trial's result as a plain `N passed, N failed` line (the form CI reads); given several
logs (`make test` runs the suite once per reactor), one line per log, then their sum last."""

from __future__ import annotations

import re
import sys


def counts(text: str) -> dict[str, int]:
    """passed / failed / skipped of a trial log (one failure when it has no result line)."""
    match = re.findall(r"^(PASSED|FAILED) \(([^)]*)\)\s*$", text, re.MULTILINE)
    if not match:
        return {"passed": 0, "failed": 1, "skipped": 0}
    found: dict[str, int] = {}
    for item in match[-1][1].split(","):
        name, _, number = item.strip().partition("=")
        if number.isdigit():
            found[name] = int(number)
    return {
        "passed": found.get("successes", 0),
        "failed": found.get("failures", 0) + found.get("errors", 0) + found.get("unexpectedSuccesses", 0),
        "skipped": found.get("skips", 0),
    }


def line(result: dict[str, int]) -> str:
    """`N passed, N failed[, N skipped]`."""
    text = f"{result['passed']} passed, {result['failed']} failed"
    if result["skipped"]:
        text += f", {result['skipped']} skipped"
    return text


def summarize(text: str) -> str:
    """The `N passed, N failed[, N skipped]` line for a trial log."""
    return line(counts(text))


if __name__ == "__main__":
    total = {"passed": 0, "failed": 0, "skipped": 0}
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8", errors="replace") as log:
            result = counts(log.read())
        if len(sys.argv) > 2:
            print(f"{path}: {line(result)}")
        for key in total:
            total[key] += result[key]
    print(line(total))
