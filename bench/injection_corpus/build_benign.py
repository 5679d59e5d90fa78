"""Writes benign.jsonl: benign request values (one JSON string a line) for the false-positive rate.

Sources: the paragraphs and table rows of this repository's README.md and docs/design.md (real
markdown with code, YAML, quotes and shell), plus generated API traffic: JSON bodies, names
with apostrophes, prose using SQL words, query strings, headers. Deterministic (fixed seed).
Run from the repository root: python bench/injection_corpus/build_benign.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

NAMES = [
    "O'Brien", "D'Angelo", "O'Neil", "N'Diaye", "D'Souza", "O'Connor", "L'Oréal", "Dell'Acqua",
    "O'Hara", "D'Arcy", "M'Bappé", "O'Sullivan", "Ta'eed", "Mc'Intyre", "D'Alessandro", "Ng",
    "José Álvarez", "Zoë Smith-Jones", "Renée O'Day", "Seán Ó Briain", "Ólafur", "Anne-Marie",
]
PROSE = [
    "Please select the items you want and update your order before Friday.",
    "Drop me a line when the union meeting is over.",
    "I'd like 1 or 2 more of these, and maybe a third if it's on sale.",
    "Meet me at Union Station; we'll grab lunch and then head to the office.",
    "Delete the old files from the shared drive, then create a new folder.",
    "Rock 'n' roll isn't dead - it's just sleeping.",
    "He's 5' 11\" tall and weighs 180 lbs.",
    "Tom & Jerry, Simon & Garfunkel and Hall & Oates.",
    "The script for the school play is due next week.",
    "Can you confirm the booking for table 4?",
    "Order by phone: 555-0100 (press 1 for sales, 2 for support).",
    "C'est la vie; on verra demain.",
    "We don't sell alcohol to anyone under 21 - no exceptions.",
    "Use the 'select all' checkbox, then choose 'export'.",
    "Is x < y and y > z? Only if z < x.",
    "Prices from $5 & up; 10% off when you buy 3 or more.",
    "She said: \"It's fine, I'll handle it\".",
    "Insert the card, then press OK to continue.",
    "The where clause of that sentence was confusing.",
    "Alert: your package has shipped!",
    "Set the alarm for 6:30 am, or 7 if it's Sunday.",
    "Having 2 cats and 1 dog keeps us busy.",
    "Let's grab coffee - my treat :)",
    "Read chapters 1-3 and answer questions 4, 5 & 6.",
    "Our office is on the 3rd floor, room #305.",
    "Email me at first.last+tag@example.com or call +1 (555) 010-0199.",
    "The formula is a*b + c/d - (e^2).",
    "Drop-off between 9 and 5, Monday to Friday.",
    "Error: can't open file 'report.pdf' (permission denied).",
    "I love the show 'Grey's Anatomy' and 'Schitt's Creek'.",
]
QUERIES = [
    "q=rock+%26+roll&page=2", "search=o%27brien&sort=-created_at", "filter[status]=open&limit=50",
    "ids=1,2,3&fields=name,email", "from=2026-01-01&to=2026-12-31", "redirect=%2Fdashboard%3Ftab%3D2",
    "lang=en-US&tz=Europe%2FParis", "q=select+a+gift&category=toys", "name=D%27Angelo&city=New+York",
    "price_min=5&price_max=100&in_stock=true", "q=%22exact+phrase%22", "utm_source=newsletter&utm_medium=email",
    "token=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJl", "cursor=YXJyYXljb25uZWN0aW9uOjQ5",
    "q=drop+shipping+union+jobs", "email=a.b%40example.com", "expand=items.product&include=tax",
    "callback_url=https%3A%2F%2Fexample.com%2Fhook", "q=C%23+or+F%23", "sort=name&order=asc",
]
HEADERS = [
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko)",
    "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", "gzip, deflate, br",
    "en-US,en;q=0.9,fr;q=0.8", "Bearer eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJ1In0.sig",
    "session=abc123; theme=dark; consent=yes", "no-cache", "application/json; charset=utf-8",
    "W/\"5e15153d-120f\"", "max-age=0", "https://www.example.com/search?q=shoes", "1.2.3.4, 10.0.0.1",
    "curl/8.5.0", "python-requests/2.31.0", "multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW",
]


def markdown_pieces() -> list[str]:
    """Paragraphs and table rows of the project's own markdown."""
    pieces = []
    for path in (ROOT / "README.md", ROOT / "docs" / "design.md"):
        text = path.read_text()
        for block in text.split("\n\n"):
            block = block.strip()
            if not block:
                continue
            if block.startswith("|"):
                pieces.extend(line for line in block.splitlines() if not line.startswith("|---"))
            else:
                pieces.append(block)
    return pieces


def json_bodies(rng: random.Random) -> list[str]:
    """API request bodies, serialised."""
    bodies = []
    for i in range(120):
        name = rng.choice(NAMES)
        body = {
            "id": i,
            "name": name,
            "email": f"user{i}@example.com",
            "comment": rng.choice(PROSE),
            "address": {"street": f"{rng.randint(1, 999)} O'Connell St.", "city": "Dublin", "zip": "D01 F5P2"},
            "items": [{"sku": f"SKU-{rng.randint(1000, 9999)}", "qty": rng.randint(1, 5), "price": 9.99}],
            "tags": rng.sample(["new", "sale", "gift", "select", "union", "drop", "or", "and"], 3),
            "notes": "## Notes\n- **bold** and _italic_\n- `code` and [a link](https://example.com/a?b=1&c=2)",
        }
        bodies.append(json.dumps(body))
    return bodies


def main() -> None:
    """Write benign.jsonl."""
    rng = random.Random(16)
    values = [*NAMES, *PROSE, *QUERIES, *HEADERS, *markdown_pieces(), *json_bodies(rng)]
    with open(HERE / "benign.jsonl", "w") as handle:
        handle.writelines(json.dumps(value) + "\n" for value in values)
    print(len(values), "benign values")


if __name__ == "__main__":
    main()
