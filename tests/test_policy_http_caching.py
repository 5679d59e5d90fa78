"""http-caching-flex: Cache-Control rules, the bounded store, the policy in memory, end to end."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase

from flexgw.http.request import RequestHead, analyze_head
from flexgw.policies import registry
from flexgw.policies.base import BuildContext, LocalResponse, PolicyConfigError, PolicyContext
from flexgw.policies.http_caching import (
    KIND,
    Collector,
    Entry,
    HttpCachingKind,
    MemoryCache,
    freshness_lifetime,
    parse_cache_control,
)
from flexgw.storage.redis import RedisClient
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream, function, stream
from tests.harness import (
    Gateway,
    api_document,
    assert_loads_cleanly,
    free_port,
    start_api_gateway,
)
from tests.redisserver import RedisServer
from tests.test_rate_limiting_redis import storage_document

#: Flex's documented Local Mode example (every key with its documented default).
FLEX_EXAMPLE = """\
    httpCachingKey: "#[attributes.requestPath]"
    maxCacheEntries: 10000
    ttl: 600
    useHttpCacheHeaders: true
    invalidationHeader: ""
    requestExpression: "#[attributes.method == 'GET' or attributes.method == 'HEAD']"
    responseExpression: "#[[200, 203, 204, 206, 300, 301, 404, 405, 410, 414, 501] contains attributes.statusCode]"
    distributed: false
    persistCache: false
"""


def binding(config: str = "    ttl: 600\n", name: str = "cache") -> str:
    """A PolicyBinding document for http-caching-flex on `test-api`."""
    return (
        "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
        f"metadata: {{name: {name}}}\n"
        "spec:\n  targetRef: {name: test-api}\n  policyRef: {name: http-caching-flex}\n"
        "  config:\n" + config
    )


def head(raw: bytes) -> RequestHead:
    """A request head from raw bytes (request line and headers)."""
    lines = raw.split(b"\r\n")
    method, target, version = lines[0].split(b" ")
    headers = [tuple(line.split(b": ", 1)) for line in lines[1:] if line]
    parsed = analyze_head(method, target, version[5:].decode(), headers, True)
    assert isinstance(parsed, RequestHead), parsed
    return parsed


class CacheControlTests(TestCase):
    """Parsing directives and computing freshness (RFC 9111 §4.2.1, §5.2)."""

    def test_directives(self) -> None:
        """Names are case-insensitive, arguments may be quoted, the first occurrence wins."""
        self.assertEqual(
            parse_cache_control([b"Public, MAX-AGE=\"60\"", b"no-cache, max-age=5"]),
            {"public": None, "max-age": "60", "no-cache": None},
        )

    def test_lifetime_order(self) -> None:
        """s-maxage beats max-age beats Expires−Date beats the default; bad values mean 0."""
        dated = [(b"Date", b"Mon, 07 Dec 2026 00:00:00 GMT"), (b"Expires", b"Mon, 07 Dec 2026 00:02:00 GMT")]
        self.assertEqual(freshness_lifetime({"s-maxage": "9", "max-age": "5"}, dated, 600), 9)
        self.assertEqual(freshness_lifetime({"max-age": "5"}, dated, 600), 5)
        self.assertEqual(freshness_lifetime({}, dated, 600), 120)
        self.assertEqual(freshness_lifetime({}, [], 600), 600)
        self.assertEqual(freshness_lifetime({"max-age": "x"}, [], 600), 0)
        self.assertEqual(freshness_lifetime({}, [(b"Expires", b"0")], 600), 0)


class StoreTests(TestCase):
    """The memory LRU, the collector, and the Redis encoding."""

    def entry(self, body: bytes = b"x") -> Entry:
        """A small entry."""
        return Entry(200, ((b"Content-Type", b"text/plain"),), body, 0.0, 60.0)

    def test_lru_bounded_by_count_and_bytes(self) -> None:
        """Past maxCacheEntries or maxCacheBytes the least recently used entries go."""
        cache = MemoryCache(max_entries=2, max_bytes=10)
        cache.put("a", self.entry())
        cache.put("b", self.entry())
        cache.get("a")  # a is now the most recent
        cache.put("c", self.entry())
        self.assertEqual(list(cache.entries), ["a", "c"])
        cache.put("d", self.entry(b"123456789"))
        self.assertEqual(list(cache.entries), ["c", "d"])
        self.assertEqual(cache.bytes, 10)
        cache.clear()
        self.assertEqual((len(cache), cache.bytes), (0, 0))

    def test_collector_abandons_past_its_limit(self) -> None:
        """A body over the limit is dropped, not kept growing."""
        collector = Collector(4)
        collector.feed(b"abc")
        self.assertEqual(collector.body(), b"abc")
        collector.feed(b"de")
        self.assertTrue(collector.abandoned)
        self.assertEqual(collector.chunks, [])

    def test_encoding_round_trip(self) -> None:
        """What Redis holds decodes to the same entry (binary headers and bodies included)."""
        entry = Entry(404, ((b"X-\xff", b"v\x00"),), b"\x00\xffbody\n", 12.5, 30.0, 3,
                      ((b"accept", b"a/b"), (b"x-none", None)))
        self.assertEqual(Entry.decode(entry.encode()), entry)


def build(config: dict[str, Any], clock: Any = None) -> Any:
    """The policy for one binding, on a memory clock."""
    return KIND.build(config, BuildContext("default/cache", "default/test-api", clock=clock))


def context(raw: bytes = b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n") -> PolicyContext:
    """A request context."""
    return PolicyContext(head(raw), "127.0.0.1", "http", "default/test-api")


class PolicyTests(TestCase):
    """The policy driven by hand: miss, store, hit, expiry, HEAD, config errors."""

    def setUp(self) -> None:
        """A memory clock."""
        self.clock = MemoryReactorClock()

    def fetch(self, policy: Any, ctx: PolicyContext, status: int, headers: list[Any], body: bytes) -> None:
        """What the exchange does for a miss: response phase, body through the tap, done."""
        ctx.begin_response(status, headers)
        policy.on_response(ctx)
        if ctx.response_tap is not None:
            ctx.response_tap.feed(body)
        policy.on_done(ctx, status, None)

    def test_registered_with_flex_schema(self) -> None:
        """Registered under Flex's name; the schema has Flex's keys."""
        self.assertIsInstance(registry.lookup("http-caching-flex"), HttpCachingKind)
        for key in ("httpCachingKey", "maxCacheEntries", "ttl", "useHttpCacheHeaders",
                    "invalidationHeader", "requestExpression", "responseExpression",
                    "distributed", "persistCache"):
            self.assertIn(key, KIND.schema["properties"])

    def test_miss_store_hit_expire(self) -> None:
        """A stored response answers until its ttl runs out, with a growing Age."""
        policy = build({"ttl": 10}, self.clock)
        ctx = context()
        self.assertIsNone(policy.on_request(ctx))
        self.fetch(policy, ctx, 200, [(b"Content-Type", b"text/plain")], b"hello")
        self.clock.advance(4)
        hit = policy.on_request(context())
        self.assertIsInstance(hit, LocalResponse)
        self.assertEqual((hit.status, hit.body), (200, b"hello"))
        self.assertEqual(hit.headers, ((b"Content-Type", b"text/plain"), (b"Age", b"4")))
        head_hit = policy.on_request(context(b"HEAD /a HTTP/1.1\r\nHost: t\r\n\r\n"))
        self.assertEqual(head_hit.body, b"hello")  # the front sends the head only
        self.clock.advance(6)
        self.assertIsNone(policy.on_request(context()))

    def test_response_expression_and_post(self) -> None:
        """A 500 is not stored (responseExpression); a POST is not cached (requestExpression)."""
        policy = build({}, self.clock)
        ctx = context()
        policy.on_request(ctx)
        self.fetch(policy, ctx, 500, [], b"oops")
        self.assertEqual(len(policy.cache), 0)
        post = context(b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
        self.assertIsNone(policy.on_request(post))
        self.assertIsNone(post.scratch)

    def test_headers_ignored_without_use_http_cache_headers(self) -> None:
        """useHttpCacheHeaders false: no-store and max-age=0 are ignored, ttl rules."""
        policy = build({"useHttpCacheHeaders": False, "ttl": 5}, self.clock)
        ctx = context()
        policy.on_request(ctx)
        self.fetch(policy, ctx, 200, [(b"Cache-Control", b"no-store, max-age=0")], b"kept")
        self.assertIsInstance(
            policy.on_request(context(b"GET /a HTTP/1.1\r\nHost: t\r\nCache-Control: no-cache\r\n\r\n")),
            LocalResponse,
        )

    def test_config_errors_are_located(self) -> None:
        """A broken expression or a literal request expression names its field."""
        for config, field in (
            ({"httpCachingKey": "#[attributes.nope]"}, "httpCachingKey"),
            ({"requestExpression": "true"}, "requestExpression"),
            ({"responseExpression": "#[1 +]"}, "responseExpression"),
            ({"invalidationHeader": "bad header"}, "invalidationHeader"),
        ):
            with self.assertRaises(PolicyConfigError) as caught:
                build(config)
            self.assertEqual(caught.exception.field, field)

    def test_flex_example_validates(self) -> None:
        """`flexgw validate`'s pipeline accepts Flex's documented example without a problem."""
        state = assert_loads_cleanly(self, binding(FLEX_EXAMPLE))
        self.assertEqual(len(state.plan.listeners[0].apis[0].policies), 1)


def responder(ex: Any) -> None:
    """Upstream answers: `/cc/<Cache-Control>` sends that directive; `/cookie` sets a cookie;
    `/vary` varies on Accept-Language; others a plain 200. The body names the request's index."""
    target = ex.request.target.decode()
    headers = [(b"Content-Type", b"text/plain")]
    if target.startswith("/cc/"):
        headers.append((b"Cache-Control", target[4:].replace("%20", " ").encode()))
    elif target == "/cookie":
        headers.append((b"Set-Cookie", b"session=1"))
    elif target == "/vary":
        headers.append((b"Vary", b"Accept-Language"))
    body = b"response %d for %s" % (ex.request.index, target.encode())
    ex.respond(200, [*headers, (b"Content-Length", b"%d" % len(body))], body)


class EndToEndTests(TestCase):
    """Through a real gateway and a recording upstream."""

    timeout = 20

    def setUp(self) -> None:
        """A recording upstream."""
        self.upstream = RecordingUpstream(function(responder), reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.port = free_port()

    def start(self, config: str = "    invalidationHeader: x-invalidate\n") -> Gateway:
        """A gateway with the caching binding."""
        return start_api_gateway(self, self.port, self.upstream.address[1], binding(config))

    async def get(self, path: str, headers: str = "", method: str = "GET", port: int = 0) -> client.Response:
        """One request through the gateway."""
        raw = f"{method} {path} HTTP/1.1\r\nHost: t\r\n{headers}\r\n".encode()
        return await client.request(reactor, "127.0.0.1", port or self.port, raw, head=method == "HEAD")

    async def test_second_get_is_a_hit_with_age(self) -> None:
        """The second GET (and a HEAD) never reach the upstream; the hit has Age and the body."""
        self.start()
        first = await self.get("/a")
        second = await self.get("/a")
        head_hit = await self.get("/a", method="HEAD")
        self.assertEqual(first.body, second.body)
        self.assertEqual(second.header("age"), [b"0"])
        self.assertEqual(first.header("age"), [])
        self.assertEqual(head_hit.header("content-length"), [b"%d" % len(first.body)])
        self.assertEqual(len(self.upstream.received), 1)

    async def test_uncacheable_responses_and_requests(self) -> None:
        """no-store, private, no-cache, max-age=0 and Set-Cookie responses are not stored;
        a request's no-cache goes upstream."""
        self.start()
        for path in ("/cc/no-store", "/cc/private", "/cc/no-cache", "/cc/max-age=0", "/cookie"):
            await self.get(path)
            await self.get(path)
        self.assertEqual(len(self.upstream.received), 10)
        await self.get("/b")
        await self.get("/b", "Cache-Control: no-cache\r\n")
        await self.get("/b", "Pragma: no-cache\r\n")
        self.assertEqual(len(self.upstream.received), 13)
        missing = await self.get("/never", "Cache-Control: only-if-cached\r\n")
        self.assertEqual(missing.status, 504)

    async def test_vary_and_invalidation(self) -> None:
        """A different Accept-Language is a miss; `invalidate` drops one key, `invalidate-all` all."""
        self.start()
        await self.get("/vary", "Accept-Language: en\r\n")
        await self.get("/vary", "Accept-Language: en\r\n")
        await self.get("/vary", "Accept-Language: fr\r\n")
        self.assertEqual(len(self.upstream.received), 2)
        await self.get("/c")
        await self.get("/d")
        await self.get("/c", "x-invalidate: invalidate\r\n")  # goes upstream, stored again
        await self.get("/d")  # still cached
        self.assertEqual(len(self.upstream.received), 5)
        await self.get("/c", "X-Invalidate: invalidate-all\r\n")
        await self.get("/d")
        self.assertEqual(len(self.upstream.received), 7)

    async def test_large_and_chunked_responses(self) -> None:
        """A 2 MiB body passes through whole and is not stored; a small chunked one is."""
        self.upstream.responder = stream(2 * 1024 * 1024)
        self.start()
        big = await self.get("/big")
        await self.get("/big")
        self.assertEqual(len(big.body), 2 * 1024 * 1024)
        self.assertEqual(len(self.upstream.received), 2)
        self.upstream.responder = stream(1000, chunked=True)
        small = await self.get("/small")
        again = await self.get("/small")
        self.assertEqual(small.body, again.body)
        self.assertEqual(len(self.upstream.received), 3)

    async def test_concurrent_misses_make_one_upstream_request(self) -> None:
        """Five concurrent GETs of one key: one upstream request, five identical answers."""
        held: list[Any] = []
        self.upstream.responder = function(held.append)
        gateway = self.start()
        policy = gateway.service.plan.listeners[0].apis[0].policies[0].policy
        waiting: defer.Deferred[None] = defer.Deferred()
        original = policy._wait

        def counted(*args: Any) -> Any:
            result = original(*args)
            if sum(len(f.waiters) for f in policy.in_flight.values()) == 4:
                waiting.callback(None)
            return result

        policy._wait = counted
        requests = [self.get("/slow") for _ in range(5)]
        gathered = defer.gatherResults([defer.ensureDeferred(r) for r in requests])
        await self.upstream.wait_for_requests(1)
        await waiting  # the four others wait for the first one's response
        responder(held[0])
        responses = await gathered
        self.assertEqual({r.body for r in responses}, {b"response 0 for /slow"})
        self.assertEqual(len(self.upstream.received), 1)

    async def test_distributed_through_redis(self) -> None:
        """Two gateways on one Redis share entries; invalidate-all on one clears both."""
        server = RedisServer()
        self.addCleanup(server.stop)
        server.start()
        ports = []
        for _ in range(2):
            port = free_port()
            files = {
                "api.yaml": api_document(port, self.upstream.address[1])
                + binding("    distributed: true\n    invalidationHeader: x-invalidate\n"),
                "storage.yaml": storage_document(f"address: 127.0.0.1:{server.port}\n"),
            }
            gateway = Gateway(self, files)
            gateway.start()
            self.assertIsInstance(gateway.service.runtime.redis, RedisClient)
            self.addCleanup(gateway.service.runtime.redis.close)
            ports.append(port)
        first = await self.get("/shared", port=ports[0])
        # The first gateway stores the entry after answering, on its own Redis connection:
        # wait until Redis has it (a loaded machine let the second gateway's lookup in first).
        admin = RedisClient(reactor, "127.0.0.1", server.port)
        self.addCleanup(admin.close)
        while not (stored := await admin.execute(b"KEYS", b"*")):
            pass
        second = await self.get("/shared", port=ports[1])
        self.assertEqual(first.body, second.body)
        self.assertEqual(second.header("age"), [b"0"])
        self.assertEqual(len(self.upstream.received), 1)
        await self.get("/x", "x-invalidate: invalidate-all\r\n", port=ports[1])
        # The invalidation, too, reaches Redis after the answer: wait until the entry is gone.
        while await admin.execute(b"EXISTS", *stored):
            pass
        await self.get("/shared", port=ports[0])
        self.assertEqual(len(self.upstream.received), 3)
