"""`Configuration.spec.sharedStorage`: where rate-limit counters are shared (Redis) or kept (local).

Flex keys (reference §5.3): `redis.address` (`host:port`; the port defaults to 6379),
`redis.username` (one doc example says `user`), `redis.password`, `redis.db` (examples also
write `DB`; default 0). `local: {enabled: true}` asks for the local store explicitly.

Not supported yet (a warning each): `redis.sentinel` (ignored when an `address` is given too;
without one Redis is not used) and `redis.tls` (Redis is then not used: a plaintext client would
fail every check). Without usable Redis settings, counters stay in each gateway's memory.

Several Configurations with `sharedStorage`: the last by resource id wins, with a warning.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from flexgw.config.plan import Problem, SharedStorage

DEFAULT_REDIS_PORT = 6379
_REDIS_KEYS = frozenset({"address", "username", "user", "password", "db", "DB", "sentinel", "tls"})


def _parse_address(text: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port`, or a bare host; raises ValueError."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(text)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
        if ":" in host:
            ipaddress.IPv6Address(host)  # an unbracketed IPv6 literal, or ValueError
    port = int(port_text) if port_text else DEFAULT_REDIS_PORT
    if not host or not 0 < port < 65536:
        raise ValueError(text)
    return host, port


def resolve_shared_storage(
    configurations: Sequence[Any], problems: list[Problem]
) -> SharedStorage | None:
    """The shared storage of the last Configuration that has `sharedStorage` (None: local)."""
    from flexgw.config.resolve import last_configuration_block  # resolve imports this module

    chosen = last_configuration_block(configurations, "sharedStorage", problems)
    if chosen is None:
        return None
    block, origin = chosen
    for key in block:
        if key not in ("redis", "local"):
            problems.append(
                origin.problem("warning", f"{key!r} is not supported; ignored", (key,), True)
            )
    redis = block.get("redis")
    if not isinstance(redis, dict):
        return None
    for key in redis:
        if key not in _REDIS_KEYS:
            problems.append(
                origin.problem("warning", f"{key!r} is not supported; ignored", ("redis", key), True)
            )
    usable = True
    if redis.get("tls") is not None:
        usable = False
        problems.append(
            origin.problem(
                "warning",
                "Redis TLS is not supported yet; rate-limit counters stay in each gateway's memory",
                ("redis", "tls"),
                True,
            )
        )
    address = redis.get("address")
    if redis.get("sentinel") is not None:
        what = "ignored (address is used)" if address else "counters stay in each gateway's memory"
        problems.append(
            origin.problem(
                "warning", f"Redis Sentinel is not supported yet; {what}", ("redis", "sentinel"), True
            )
        )
    if not address:
        if redis.get("sentinel") is None:
            problems.append(
                origin.problem(
                    "error", "redis.address (host:port) is required", ("redis",), True
                )
            )
        return None
    try:
        host, port = _parse_address(str(address))
    except ValueError:
        problems.append(
            origin.problem(
                "error", f"{address!r} is not a host:port address; Redis is not used",
                ("redis", "address"),
            )
        )
        return None
    db_value = redis.get("db", redis.get("DB", 0))
    try:
        db = int(db_value if db_value is not None else 0)
        if db < 0:
            raise ValueError(db)
    except (TypeError, ValueError):
        problems.append(
            origin.problem(
                "error", f"db {db_value!r} is not a database number; Redis is not used",
                ("redis", "db" if "db" in redis else "DB"),
            )
        )
        return None
    if not usable:
        return None
    username = redis.get("username", redis.get("user"))
    password = redis.get("password")
    return SharedStorage(
        host=host,
        port=port,
        username=None if username in (None, "") else str(username),
        password=None if password in (None, "") else str(password),
        db=db,
    )
