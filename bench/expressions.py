"""Micro-benchmark of #[...] expressions: per-evaluation cost and per-request context cost.

Usage: PYTHONPATH=. python bench/expressions.py [--number 200000]
Prints microseconds per operation (best of 5 timeit repeats). Not a test; numbers depend on
the machine and on whether it is idle.
"""

from __future__ import annotations

import argparse
import timeit

from flexgw.policies.expressions import ExpressionContext, compile_expression

HEADERS = [
    (b"Host", b"api.example.com"),
    (b"User-Agent", b"curl/8.5.0"),
    (b"Accept", b"*/*"),
    (b"X-User", b"alice"),
    (b"Authorization", b"Basic dXNlcjpwYXNz"),
    (b"X-Forwarded-For", b"203.0.113.7"),
    (b"X-Request-Id", b"0f9c1e2a"),
    (b"Content-Type", b"application/json"),
    (b"Content-Length", b"17"),
    (b"Connection", b"keep-alive"),
]

EXPRESSIONS = [
    "attributes.headers['x-user']",
    "attributes.method",
    "attributes.method == 'GET' or attributes.method == 'HEAD'",
    "attributes.queryParams['debug'] == 'true'",
    "vars.claimSet.sub",
    "attributes.headers['x-tenant'] default 'none'",
    "lower(attributes.headers['x-user']) ++ ':' ++ attributes.requestPath",
    "[200,203,204,206,300,301,404,405,410,414,501] contains attributes.statusCode",
]


def new_ctx() -> ExpressionContext:
    """A fresh context over the sample request."""
    return ExpressionContext.from_request(
        b"GET",
        b"/orders/42?debug=true",
        b"1.1",
        HEADERS,
        "http",
        "127.0.0.1:8081",
        "192.0.2.10:51234",
        status=200,
        vars={"claimSet": {"sub": "user-1"}},
    )


def best(stmt: object, number: int) -> float:
    """Best-of-5 microseconds per call of stmt."""
    t = timeit.Timer(stmt)  # type: ignore[arg-type]
    return min(t.repeat(repeat=5, number=number)) / number * 1e6


def main() -> None:
    """Run and print the measurements."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--number", type=int, default=200_000)
    n = parser.parse_args().number

    print(f"context from_request: {best(new_ctx, n):.3f} us")
    for source in EXPRESSIONS:
        e = compile_expression(source)
        warm = new_ctx()
        e.evaluate(warm)
        evaluate = e.evaluate
        hot = best(lambda: evaluate(warm), n)  # noqa: B023 - measured immediately
        cold = best(lambda: evaluate(new_ctx()), n // 4)  # noqa: B023
        print(f"{hot:7.3f} us warm  {cold:7.3f} us incl. new context   #[{source}]")
    compile_cost = best(lambda: compile_expression(EXPRESSIONS[6]), n // 20)
    print(f"compile #[{EXPRESSIONS[6]}]: {compile_cost:.1f} us")


if __name__ == "__main__":
    main()
