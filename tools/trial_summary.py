"""Print trial's result as a plain `N passed, N failed` line (the form CI reads)."""

from __future__ import annotations

import re
import sys


def summarize(text: str) -> str:
    """The `N passed, N failed[, N skipped]` line for a trial log."""
    match = re.findall(r"^(PASSED|FAILED) \(([^)]*)\)\s*$", text, re.MULTILINE)
    if not match:
        return "0 passed, 1 failed"
    counts: dict[str, int] = {}
    for item in match[-1][1].split(","):
        name, _, number = item.strip().partition("=")
        if number.isdigit():
            counts[name] = int(number)
    passed = counts.get("successes", 0)
    failed = counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpectedSuccesses", 0)
    line = f"{passed} passed, {failed} failed"
    if counts.get("skips"):
        line += f", {counts['skips']} skipped"
    return line


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8", errors="replace") as log:
        print(summarize(log.read()))
