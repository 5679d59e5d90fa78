"""Tests of the list-then-watch client (flexgw.config.sources.kubernetes.CollectionWatch) against
the in-test API server on loopback: sync, changes, a cut watch, compaction, timeouts, an API
server away and back, token rotation, garbage on the stream."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from flexgw.config.sources import kubernetes
from flexgw.config.sources.kubernetes import CollectionWatch
from flexgw.testing.kubeapi import KubeAPI
from tests.probes import Conditions
from tests.test_testing_kubeapi import ingress

INGRESSES = "/apis/networking.k8s.io/v1/ingresses"


class WatchTestCase(TestCase):
    """A KubeAPI with token "t" and a CollectionWatch on every Ingress, with waits on its progress."""

    timeout = 20

    def setUp(self) -> None:
        self.api = KubeAPI(reactor, tokens={"t": ["list", "watch"]})
        self.api.listen()
        self.addCleanup(lambda: self.api.stop())
        self.token = "t"
        self.changes = 0
        self.conditions = Conditions()
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.watch = CollectionWatch(
            reactor,
            treq.client.HTTPClient(Agent(reactor, pool=pool)),
            self.api.url,
            INGRESSES,
            token=lambda: self.token,
            on_change=self._changed,
            on_state=lambda state: self._check(),
            backoff_initial=0.01,
            backoff_max=0.05,
            jitter=lambda: 0.5,
        )
        self.addCleanup(self.watch.stop)

    def _changed(self) -> None:
        self.changes += 1
        self._check()

    def _check(self) -> None:
        self.conditions.check()

    def until(self, predicate: Callable[[], bool]) -> defer.Deferred[None]:
        """Fire once `predicate()` holds (checked after every change and state change)."""
        return self.conditions.until(predicate)

    def names(self) -> list[str]:
        """The watched objects' keys."""
        return sorted(self.watch.objects)

    def requests(self, kind: str) -> list[dict[str, str]]:
        """The query of each list (kind="list") or watch request the server saw."""
        queries = []
        for method, path in self.api.requests:
            query = {k: v[-1] for k, v in parse_qs(urlsplit(path).query).items()}
            if method == "GET" and ("watch" in query) == (kind == "watch"):
                queries.append(query)
        return queries

    async def synced(self) -> None:
        """Start and wait for the first list and the watch."""
        self.watch.start()
        await self.api.watch_opened(1)


class SyncTests(WatchTestCase):
    """List, then watch from the list's version; objects follow the server."""

    async def test_list_then_follow_changes(self) -> None:
        """Objects listed (kind filled in for built-in items), then ADDED/MODIFIED/DELETED applied."""
        self.api.put(ingress("a"))
        self.api.put(ingress("b", namespace="other"))
        await self.synced()
        self.assertEqual(self.names(), ["other/b", "shop/a"])
        [watch] = self.requests("watch")
        self.assertEqual(watch["resourceVersion"], str(self.api.store.rv))
        self.assertEqual((watch["allowWatchBookmarks"], watch["timeoutSeconds"]), ("true", "300"))
        documents = self.watch.documents()
        self.assertEqual([d.origin for d in documents], ["Ingress other/b", "Ingress shop/a"])
        self.assertEqual(documents[0].value["apiVersion"], "networking.k8s.io/v1")
        self.api.put(ingress("a", host="new.example"))
        self.api.put(ingress("c"))
        self.api.remove("networking.k8s.io/v1", "Ingress", "other", "b")
        await self.until(lambda: self.names() == ["shop/a", "shop/c"])
        self.assertEqual(self.watch.objects["shop/a"]["spec"]["rules"][0]["host"], "new.example")
        self.assertEqual(self.watch.resource_version, str(self.api.store.rv))
        self.assertEqual(self.watch.counts["lists"], 1)

    async def test_pages(self) -> None:
        """A collection larger than the page limit is listed with limit/continue."""
        self.patch(kubernetes, "PAGE_LIMIT", 2)
        for name in "abcde":
            self.api.put(ingress(name))
        await self.synced()
        self.assertEqual(len(self.watch.objects), 5)
        lists = self.requests("list")
        self.assertEqual(len(lists), 3)
        self.assertIn("continue", lists[1])

    async def test_bookmark_moves_the_version(self) -> None:
        """A BOOKMARK moves the version a resumed watch starts from, without a change."""
        await self.synced()
        changes = self.changes
        self.api.store.rv += 5  # versions used by other collections of the cluster
        self.api.send_bookmarks()
        self.api.end_watches()  # cleanly: the bookmark is read before the end
        await self.api.watch_opened(2)
        self.assertEqual(self.requests("watch")[1]["resourceVersion"], str(self.api.store.rv))
        self.assertEqual(self.changes, changes)


class ResumeTests(WatchTestCase):
    """A watch that ends or breaks resumes from the last version; 410 re-lists."""

    async def test_cut_watch_resumes_from_last_version(self) -> None:
        """A watch cut mid-stream resumes (after a backoff) from the last version: no re-list,
        and what changed meanwhile arrives."""
        self.api.put(ingress("a"))
        await self.synced()
        seen = self.watch.resource_version
        self.api.cut_watches()
        self.api.put(ingress("b"))  # while no watch is open
        await self.until(lambda: self.names() == ["shop/a", "shop/b"])
        self.assertEqual(self.requests("watch")[1]["resourceVersion"], seen)
        self.assertEqual((self.watch.counts["lists"], self.watch.counts["errors"]), (1, 1))

    async def test_compaction_relists(self) -> None:
        """Resuming from a compacted version gets an ERROR 410 event: the client lists again and
        drops what was deleted meanwhile."""
        self.api.put(ingress("a"))
        self.api.put(ingress("b"))
        await self.synced()
        self.api.cut_watches()
        self.api.remove("networking.k8s.io/v1", "Ingress", "shop", "a")
        self.api.compact()
        await self.until(lambda: self.watch.counts["lists"] == 2)
        self.assertEqual(self.names(), ["shop/b"])
        await self.api.watch_opened(3)  # the first, the one answered 410, the one after the list
        self.assertEqual(self.watch.counts["relists_gone"], 1)

    async def test_timeout_ends_watch_and_resumes_at_once(self) -> None:
        """The server ends the watch at timeoutSeconds; the client watches again from its version."""
        self.watch.watch_timeout = 1
        await self.synced()
        await self.api.watch_opened(2)
        self.assertEqual(self.watch.counts["errors"], 0)
        self.assertEqual(self.requests("watch")[1]["timeoutSeconds"], "1")

    async def test_local_deadline_when_the_server_keeps_the_watch_open(self) -> None:
        """A watch the server does not end by timeoutSeconds is dropped by the client's deadline."""
        self.watch.watch_timeout = 1
        self.watch.watch_grace = 0.1
        self.patch(kubernetes, "_seconds", lambda value: "3600")  # a server ignoring the timeout
        await self.synced()
        await self.api.watch_opened(2)
        self.assertEqual(self.watch.counts["errors"], 0)


class FailureTests(WatchTestCase):
    """Errors back off and retry; the objects listed keep their last state meanwhile."""

    async def test_api_server_away_then_back(self) -> None:
        """With the server gone, the objects are kept and errors counted; when it is back the
        client re-syncs."""
        self.api.put(ingress("a"))
        await self.synced()
        port = self.api.port.getHost().port  # type: ignore[union-attr]
        await self.api.stop()
        await self.until(lambda: self.watch.counts["errors"] >= 2)
        self.assertEqual(self.names(), ["shop/a"])
        self.api.put(ingress("b"))
        self.api.listen(port)
        await self.until(lambda: self.names() == ["shop/a", "shop/b"])

    async def test_unauthorized_until_the_token_rotates(self) -> None:
        """401 backs off; the token is asked again at every request, so a rotated one is used."""
        self.token = "old"
        self.watch.start()
        await self.until(lambda: self.watch.counts["errors"] >= 2)
        self.assertIn("401", self.watch.last_error or "")
        self.assertFalse(self.watch.synced)
        self.token = "t"
        await self.api.watch_opened(1)
        self.assertTrue(self.watch.synced)

    async def test_garbage_and_unknown_events_reconnect(self) -> None:
        """A line that is not JSON, or an unknown event type, drops the watch; it is counted and
        the client resumes."""
        await self.synced()
        self.api.send_raw(b"{not json\n")
        await self.api.watch_opened(2)
        self.api.send_raw(b'{"type": "SURPRISE", "object": {}}\n')
        await self.api.watch_opened(3)
        self.assertEqual(self.watch.counts["bad_events"], 2)
        self.api.put(ingress("a"))
        await self.until(lambda: self.names() == ["shop/a"])
        self.assertEqual(self.watch.counts["lists"], 1)

    async def test_backoff_grows_with_jitter_and_caps(self) -> None:
        """Each consecutive failure doubles the delay up to the cap, times (1 + jitter)."""
        delays = [round(self.watch._backoff(), 6) for _ in range(5)]
        self.assertEqual(delays, [0.015, 0.03, 0.06, 0.075, 0.075])
