"""Load balancers over a Service's addresses: round robin (weighted), least request (power of
two choices), ring hash and Maglev (affinity on a key). Each is built over the addresses in
rotation and rebuilt when that set changes (resolution, health, ejection), never per request.

A balancer sees members with `weight` and `outstanding()` (requests in flight); `pick(key)`
returns one of them (`key` is the hash key for ringHash/maglev, None otherwise), `exclude` asks
for another member than the one given when there is one (a retry).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from math import gcd
from typing import Any, Protocol
from zlib import crc32


class Member(Protocol):
    """What a balancer reads of an address."""

    weight: int
    key: str  # "host:port": the address's identity on a hash ring

    def outstanding(self) -> int: ...


_MASK = (1 << 64) - 1


def hash64(text: str) -> int:
    """A stable 64-bit hash of `text` (the same in every process and run: Python's `hash` is
    seeded per process): CRC-32 (C speed) spread over 64 bits by Fibonacci hashing."""
    return (crc32(text.encode("utf-8")) * 0x9E3779B97F4A7C15) & _MASK


class RoundRobin:
    """Each member in turn; with unequal weights, nginx's smooth weighted round robin (a
    member of weight 3 gets 3 of every (sum of weights) picks, spread out)."""

    def __init__(self, members: Sequence[Any], rng: random.Random) -> None:
        self.members = list(members)
        self.n = len(self.members)
        self.index = rng.randrange(self.n) if self.n else 0  # processes do not start in step
        weights = [m.weight for m in self.members]
        self.weighted = len(set(weights)) > 1
        self.current = [0] * self.n
        self.total = sum(weights)

    def pick(self, key: str | None = None, exclude: Any = None) -> Any:
        """The next member (another than `exclude` when there is one)."""
        n = self.n
        if not self.weighted:
            index = self.index
            member = self.members[index % n]
            self.index = index + 1
            if member is exclude and n > 1:
                member = self.members[(index + 1) % n]
                self.index = index + 2
            return member
        current = self.current
        best = -1
        for i, m in enumerate(self.members):
            current[i] += m.weight
            if m is exclude and n > 1:
                continue
            if best < 0 or current[i] > current[best]:
                best = i
        current[best] -= self.total
        return self.members[best]


class LeastRequest:
    """Power of two choices: of two members drawn at random, the one with fewer requests in
    flight (divided by its weight when weights differ)."""

    def __init__(self, members: Sequence[Any], rng: random.Random) -> None:
        self.members = list(members)
        self.n = len(self.members)
        self.weighted = len({m.weight for m in self.members}) > 1
        self.rng = rng

    def pick(self, key: str | None = None, exclude: Any = None) -> Any:
        """The less loaded of two random members (neither `exclude`, when possible)."""
        members = self.members
        n = self.n
        if n == 1:
            return members[0]
        if n == 2 and exclude is not None:
            return members[1] if members[0] is exclude else members[0]
        rand = self.rng.randrange
        a = members[rand(n)]
        while a is exclude:
            a = members[rand(n)]
        b = members[rand(n)]
        while b is a or b is exclude:
            b = members[rand(n)]
        if self.weighted:
            if (a.outstanding() + 1) * b.weight <= (b.outstanding() + 1) * a.weight:
                return a
            return b
        return a if a.outstanding() <= b.outstanding() else b


class RingHash:
    """Consistent hashing (Ketama): each member owns points on a 64-bit ring in proportion to
    its weight; a key goes to the first point at or after its hash. When a member leaves, only
    the keys it owned move (about 1/N of them)."""

    #: Points on the ring per unit of weight (Ketama's 160). A member's points depend on its
    #: own key and weight only, so a member leaving moves nothing but its own keys.
    POINTS = 160

    def __init__(self, members: Sequence[Any], rng: random.Random) -> None:
        self.members = list(members)
        self.rng = rng
        divisor = 0
        for member in self.members:
            divisor = gcd(divisor, member.weight)
        points: list[tuple[int, int]] = []
        for index, member in enumerate(self.members):
            for replica in range(self.POINTS * member.weight // (divisor or 1)):
                points.append((hash64(f"{member.key}_{replica}"), index))
        points.sort()
        self.hashes = [h for h, _ in points]
        self.owners = [self.members[i] for _, i in points]

    def pick(self, key: str | None = None, exclude: Any = None) -> Any:
        """The owner of `key`'s point (the next one along the ring for a retry; a random
        member without a key)."""
        if key is None:
            members = [m for m in self.members if m is not exclude] or self.members
            return members[self.rng.randrange(len(members))]
        hashes = self.hashes
        at = bisect.bisect_left(hashes, hash64(key))
        owners = self.owners
        count = len(owners)
        member = owners[at % count]
        if member is exclude and len(self.members) > 1:
            step = 1
            while owners[(at + step) % count] is exclude:
                step += 1
            member = owners[(at + step) % count]
        return member


class Maglev:
    """Google's Maglev hashing: a lookup table of a prime size filled from each member's
    permutation (weights by turns); keys move about 1/N when a member leaves; O(1) lookup."""

    #: Table sizes (primes); the smallest at least 100 times the members is used (Maglev's
    #: M >> N: shares within about 1 %, and a rebuild stays cheap on ejections).
    SIZES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521)

    def __init__(self, members: Sequence[Any], rng: random.Random) -> None:
        self.members = list(members)
        self.rng = rng
        wanted = 100 * sum(m.weight for m in self.members)
        m = next((size for size in self.SIZES if size >= wanted), self.SIZES[-1])
        n = len(self.members)
        table: list[int] = [-1] * m
        offsets, skips = [], []
        for member in self.members:
            h = hash64(member.key)
            offsets.append(h % m)
            skips.append((h >> 32) % (m - 1) + 1)
        nexts = [0] * n
        weights = [member.weight for member in self.members]
        divisor = 0
        for w in weights:
            divisor = gcd(divisor, w)
        turns = [w // (divisor or 1) for w in weights]
        filled = 0
        while filled < m:
            for i in range(n):
                for _ in range(turns[i]):
                    c = (offsets[i] + nexts[i] * skips[i]) % m
                    while table[c] >= 0:
                        nexts[i] += 1
                        c = (offsets[i] + nexts[i] * skips[i]) % m
                    table[c] = i
                    nexts[i] += 1
                    filled += 1
                    if filled == m:
                        break
                if filled == m:
                    break
        self.table = [self.members[i] for i in table]
        self.size = m

    def pick(self, key: str | None = None, exclude: Any = None) -> Any:
        """The table entry of `key`'s hash (the next different entry for a retry)."""
        if key is None:
            members = [m for m in self.members if m is not exclude] or self.members
            return members[self.rng.randrange(len(members))]
        at = hash64(key) % self.size
        member = self.table[at]
        if member is exclude and len(self.members) > 1:
            step = 1
            while self.table[(at + step) % self.size] is exclude:
                step += 1
            member = self.table[(at + step) % self.size]
        return member


BALANCERS: dict[str, Any] = {
    "roundRobin": RoundRobin,
    "leastRequest": LeastRequest,
    "ringHash": RingHash,
    "maglev": Maglev,
}
