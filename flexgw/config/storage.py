"""`Configuration.spec.sharedStorage`: where rate-limit counters are shared (Redis) or kept (local).

Flex keys (reference §5.3): `redis.address` (`host:port`; the port defaults to 6379),
`redis.username` (one doc example says `user`), `redis.password`, `redis.db` (examples also
write `DB`; default 0). `local: {enabled: true}` asks for the local store explicitly.

`redis.sentinel` (instead of `address`; with both, the sentinel is used and `address` ignored
with a warning): `masterName`, `addresses` (a list of `host:port`, the port defaulting to
26379) and an optional `password` (the sentinels' own; `password`/`username` above are the
master's). The client asks the sentinels for the master (flexgw.storage.redis).

`redis.tls` (reference §3.4): `skipValidation`, `trustedCA` (default: the system trust store),
`certificate {key, crt, keyPassphrase}` (mTLS), `ciphers`, `minversion`/`maxversion` (also
`minVersion`/`maxVersion`), parsed as `tls-outbound` is (flexgw.tls.settings), minus the
ciphers Flex excludes for Redis. `alpn` is accepted and unused (Redis speaks no ALPN). It
applies to the master and to the sentinels alike.

flexgw extensions (Flex has no such settings; reference §5.3), under `redis`:
`commandTimeoutSeconds` (default 2; more than 0, at most 60): how long a connection attempt or a
reply may take before Redis is taken as down; `probeIntervalSeconds` (default 0.5; more than 0,
at most 1): the longest delay between two probes while Redis is down, so a Redis that comes back
is used again within about that much; `outageSummarySeconds` (default 60; at least 1): how often
a "still down" record (with the count of checks decided by `blockOnUnknownQuota`) is logged
during an outage. See flexgw.storage.breaker.

A malformed value is an error at its file:line:column and Redis is not used (counters stay in
each gateway's memory). Several Configurations with `sharedStorage`: the last by resource id
wins, with a warning.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from flexgw.config.located import last_configuration_block
from flexgw.plan import PolicyConfigError, Problem, RedisSentinel, SharedStorage

DEFAULT_REDIS_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
#: flexgw extensions: key -> (SharedStorage field, lowest (excluded when `open`), highest)
_REDIS_TIMINGS = {
    "commandTimeoutSeconds": ("command_timeout", 0.0, 60.0),
    "probeIntervalSeconds": ("probe_interval", 0.0, 1.0),
    "outageSummarySeconds": ("summary_interval", 1.0, 86400.0),
}
_REDIS_KEYS = frozenset(
    {"address", "username", "user", "password", "db", "DB", "sentinel", "tls", *_REDIS_TIMINGS}
)
_SENTINEL_KEYS = frozenset({"addresses", "masterName", "password"})
_TLS_KEYS = frozenset({
    "skipValidation", "trustedCA", "certificate", "alpn", "ciphers",
    "minversion", "maxversion", "minVersion", "maxVersion",
})
#: Ciphers Flex's Redis TLS does not offer (reference §3.4).
REDIS_EXCLUDED_CIPHERS = frozenset({
    "TLS_RSA_WITH_NULL_SHA",
    "TLS_PSK_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_PSK_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256",
})


def _parse_address(text: str, default_port: int = DEFAULT_REDIS_PORT) -> tuple[str, int]:
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
    port = int(port_text) if port_text else default_port
    if not host or not 0 < port < 65536:
        raise ValueError(text)
    return host, port


def resolve_shared_storage(
    configurations: Sequence[Any], problems: list[Problem]
) -> SharedStorage | None:
    """The shared storage of the last Configuration that has `sharedStorage` (None: local)."""
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
    address = redis.get("address")
    sentinel = None
    if redis.get("sentinel") is not None:
        sentinel = _parse_sentinel(redis["sentinel"], origin, problems)
        usable = sentinel is not None
        if address:
            problems.append(
                origin.problem(
                    "warning", "address is ignored: the master is asked of the sentinels",
                    ("redis", "address"), True,
                )
            )
    tls = None
    if redis.get("tls") is not None:
        tls = _parse_tls(redis["tls"], origin, problems)
        usable = usable and tls is not None
    host, port = "", 0
    if sentinel is None and redis.get("sentinel") is None:
        if not address:
            problems.append(
                origin.problem(
                    "error", "redis.address (host:port) or redis.sentinel is required", ("redis",), True
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
    timings: dict[str, float] = {}
    for key, (field, low, high) in _REDIS_TIMINGS.items():
        value = redis.get(key)
        if value is None:
            continue
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and (value < low or value > high or (low == 0.0 and value == 0)):
            ok = False
        if not ok:
            bound = f"more than 0 and at most {high:g}" if low == 0.0 else f"{low:g} to {high:g}"
            problems.append(
                origin.problem(
                    "error", f"{key} must be a number of seconds, {bound}; Redis is not used",
                    ("redis", key),
                )
            )
            usable = False
        else:
            timings[field] = float(value)
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
        sentinel=sentinel,
        tls=tls,
        **timings,
    )


def _parse_sentinel(block: Any, origin: Any, problems: list[Problem]) -> RedisSentinel | None:
    """`redis.sentinel`: None (with an error located at the bad field) when malformed."""
    at = ("redis", "sentinel")
    if not isinstance(block, dict):
        problems.append(
            origin.problem("error", "sentinel must be a mapping (masterName, addresses, password)", at)
        )
        return None
    for key in block:
        if key not in _SENTINEL_KEYS:
            problems.append(
                origin.problem("warning", f"{key!r} is not supported; ignored", (*at, key), True)
            )
    ok = True
    master = block.get("masterName")
    if not isinstance(master, str) or not master.strip():
        ok = False
        problems.append(
            origin.problem(
                "error", "sentinel.masterName (the monitored master's name) is required",
                (*at, "masterName") if "masterName" in block else at,
                "masterName" not in block,
            )
        )
    addresses = block.get("addresses")
    parsed: list[tuple[str, int]] = []
    if isinstance(addresses, str):
        addresses = [addresses]  # one address written as a scalar
    if not isinstance(addresses, list) or not addresses:
        ok = False
        problems.append(
            origin.problem(
                "error", "sentinel.addresses must be a non-empty list of host:port",
                (*at, "addresses") if "addresses" in block else at,
                "addresses" not in block,
            )
        )
    else:
        for n, item in enumerate(addresses):
            try:
                if not isinstance(item, str | int) or isinstance(item, bool):
                    raise TypeError(item)
                parsed.append(_parse_address(str(item), DEFAULT_SENTINEL_PORT))
            except (TypeError, ValueError):
                ok = False
                problems.append(
                    origin.problem(
                        "error", f"{item!r} is not a host:port sentinel address",
                        (*at, "addresses", n) if isinstance(block.get("addresses"), list)
                        else (*at, "addresses"),
                    )
                )
    password = block.get("password")
    if password is not None and not isinstance(password, str | int):
        ok = False
        problems.append(origin.problem("error", "sentinel.password must be a string", (*at, "password")))
    if not ok:
        return None
    return RedisSentinel(
        master_name=str(master).strip(),
        addresses=tuple(parsed),
        password=None if password in (None, "") else str(password),
    )


def _parse_tls(block: Any, origin: Any, problems: list[Problem]) -> Any:
    """`redis.tls` as TLSSettings (flexgw.tls.settings); None, with a located error, when wrong."""
    from flexgw.tls.settings import parse_tls

    at = ("redis", "tls")
    if not isinstance(block, dict):
        problems.append(origin.problem("error", "tls must be a mapping", at))
        return None
    config = {}
    for key, value in block.items():
        if key not in _TLS_KEYS:
            problems.append(
                origin.problem("warning", f"{key!r} is not supported; ignored", (*at, key), True)
            )
        else:
            config[key] = value
    try:
        for key in ("ciphers", "alpn"):
            if config.get(key) is not None and not isinstance(config[key], list):
                raise PolicyConfigError("must be a list", key)
        if "skipValidation" in config and not isinstance(config["skipValidation"], bool):
            raise PolicyConfigError("must be true or false", "skipValidation")
        for n, name in enumerate(config.get("ciphers") or ()):
            if str(name).strip().upper() in REDIS_EXCLUDED_CIPHERS:
                raise PolicyConfigError(f"{name!r} is not available for Redis TLS", f"ciphers.{n}")
        settings = parse_tls(config, outbound=True)
    except PolicyConfigError as exc:
        sub = tuple(int(p) if p.isdigit() else p for p in exc.field.split(".")) if exc.field else ()
        problems.append(origin.problem("error", f"{exc.message}; Redis is not used", (*at, *sub)))
        return None
    if settings.skip_validation:
        problems.append(
            origin.problem(
                "warning",
                "skipValidation: the Redis server's certificate is not verified",
                (*at, "skipValidation"),
            )
        )
    return settings
