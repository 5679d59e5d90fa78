"""Detection and false-positive rates of injection-protection-flex's built-in protections.

Corpus (this folder; README.md names the sources): sql.txt and xss.txt, public payload lists,
one payload a line; benign.jsonl, benign request values (build_benign.py). Each payload is
sent as a query parameter value the way a client would (percent-encoded once), and again
double-encoded and with mixed case; each benign value is scanned where it would arrive (JSON
bodies as application/json, markdown as a text body, query strings as queries, the rest as
header values). Both protections (sql, xss) are on, as in Flex's example.

Usage (repository root): python bench/injection_corpus/measure.py [--misses] [--false-positives]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from urllib.parse import quote

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from flexgw.policies.injection_protection import (
    _query_pieces,
    body_pieces,
    detect,
    percent_decode,
)


def mixed_case(text: str) -> str:
    """Every other letter upper-cased."""
    return "".join(c.upper() if i % 2 else c.lower() for i, c in enumerate(text))


def as_query_value(payload: str, rounds: int = 1) -> str:
    """What the policy scans for `?q=<payload encoded rounds times>`."""
    encoded = payload
    for _ in range(rounds):
        encoded = quote(encoded, safe="")
    return percent_decode(encoded.encode("ascii"), plus=True)


def flagged(text: str) -> bool:
    """Both built-in protections on."""
    return detect(text, True, True) is not None


def benign_flagged(value: str) -> bool:
    """A benign value scanned where it would arrive."""
    stripped = value.lstrip()
    if stripped.startswith("{"):
        return any(flagged(p) for p in body_pieces(value.encode(), b"application/json"))
    if "=" in value and " " not in value and "&" in value or value.startswith(("q=", "search=")):
        return any(flagged(p) for p in _query_pieces(value.encode()))
    if "\n" in value:
        return any(flagged(p) for p in body_pieces(value.encode(), b"text/markdown"))
    return flagged(percent_decode(value.encode()))


def main() -> None:
    """Print the table (markdown) and, on request, what was missed or wrongly flagged."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--misses", action="store_true")
    parser.add_argument("--false-positives", action="store_true")
    args = parser.parse_args()
    print("| corpus | payloads | detected | double-encoded | mixed case |")
    print("|---|---|---|---|---|")
    for name in ("sql", "xss"):
        payloads = (HERE / f"{name}.txt").read_text().splitlines()
        plain = [p for p in payloads if flagged(as_query_value(p))]
        double = [p for p in payloads if flagged(as_query_value(p, 2))]
        mixed = [p for p in payloads if flagged(as_query_value(mixed_case(p)))]
        n = len(payloads)
        print(f"| {name}.txt | {n} | {len(plain) / n:.1%} | {len(double) / n:.1%} | {len(mixed) / n:.1%} |")
        if args.misses:
            for p in payloads:
                if p not in plain:
                    print("  MISS", repr(p))
    benign = [json.loads(line) for line in (HERE / "benign.jsonl").read_text().splitlines()]
    wrong = [v for v in benign if benign_flagged(v)]
    print(f"\nbenign.jsonl: {len(benign)} values, {len(wrong)} flagged "
          f"(false-positive rate {len(wrong) / len(benign):.1%})")
    if args.false_positives:
        for v in wrong:
            print("  FP", repr(v[:200]))


if __name__ == "__main__":
    main()
