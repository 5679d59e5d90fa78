"""The admin listener's /ui dashboard in a real browser (Debian's Chromium driven by Playwright):
what a person sees: the APIs with their routes and policies, charts that move with traffic, a
broken file's problem, and no secret."""

from __future__ import annotations

import http.client
import os
import shutil
import tempfile
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from flexgw.service.admin import admin_site
from flexgw.service.dashboard import DashboardResource
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import Gateway, free_port
from tests.test_upstream_cluster import ClusterCase
from tests.test_upstream_resilience import RETRY, gather, service_policy

CHROMIUM = os.environ.get("FLEXGW_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
SECRET = "s3cret-Pa55word"
#: Where to also save the screenshot (the README's picture is made so).
SCREENSHOT = os.environ.get("FLEXGW_UI_SCREENSHOT")


def documents(orders: int, limited: int, upstream: int) -> str:
    """Two APIs: `orders` behind basic auth and a header policy, `limited` allowing 1 request a minute."""
    return f"""\
apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata: {{name: orders}}
spec:
  address: http://127.0.0.1:{orders}/orders
  services:
    backend: {{address: "http://127.0.0.1:{upstream}"}}
  policies:
    - policyRef: {{name: http-basic-authentication-flex}}
      config: {{username: ops, password: {SECRET}}}
    - policyRef: {{name: header-injection-flex}}
      config:
        inboundHeaders: [{{key: x-via, value: flexgw}}]
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata: {{name: limited}}
spec:
  address: http://127.0.0.1:{limited}
  services:
    backend: {{address: "http://127.0.0.1:{upstream}"}}
  policies:
    - policyRef: {{name: rate-limiting-flex}}
      config:
        rateLimits: [{{maximumRequests: 1, timePeriodInMilliseconds: 60000}}]
"""


def traffic(port: int, path: str, count: int, authorization: str | None = None) -> list[int]:
    """`count` GETs on one keep-alive connection; their statuses."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Authorization": authorization} if authorization else {}
    statuses = []
    try:
        for _ in range(count):
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
    finally:
        connection.close()
    return statuses


def legend_above_zero(series: str, chart: str) -> str:
    """A page function: true once the legend of `series` on `chart` shows a rate above zero."""
    return (
        f"() => {{ const s = document.querySelector('#legend-{chart} [data-series=\"{series}\"]');"
        " if (!s) return false; const m = s.textContent.match(/([0-9.]+) /); return m && parseFloat(m[1]) > 0; }"
    )


def need_browser() -> None:
    """Skip unless Chromium and Playwright are installed."""
    if not os.path.exists(CHROMIUM):
        raise SkipTest(f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        raise SkipTest("playwright is not installed (pip install '.[test]')") from None


def browse(test: TestCase, url: str, look: Any) -> None:
    """Open `url` in headless Chromium (a fresh profile) and call `look(page)`; the browser's
    console is printed when the test fails. Run in a thread (deferToThread)."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="flexgw-chromium-")
    test.addCleanup(shutil.rmtree, profile, True)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1100, "height": 900},
        )
        try:
            page = context.new_page()
            messages: list[str] = []
            page.on("console", lambda message: messages.append(message.text))
            page.on("pageerror", lambda error: messages.append(str(error)))
            test.addCleanup(lambda: messages and print("browser console:", *messages, sep="\n  "))
            page.goto(url)
            look(page)
        finally:
            context.close()


class DashboardBrowserTests(TestCase):
    """One browser session against a real gateway and its admin listener."""

    timeout = 120

    def setUp(self) -> None:
        need_browser()
        self.upstream = RecordingUpstream(reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.orders, self.limited = free_port(), free_port()
        self.gateway = Gateway(self, {"apis.yaml": documents(self.orders, self.limited, self.upstream.address[1])})
        self.gateway.start()
        admin = reactor.listenTCP(0, admin_site(self.gateway.service), interface="127.0.0.1")
        self.addCleanup(admin.stopListening)
        self.admin = admin.getHost().port

    def test_dashboard_shows_apis_traffic_and_problems(self) -> Any:
        """The page lists both APIs with routes, upstream and policies in chain order (no secret);
        the requests and rate-limit charts move when traffic flows; a broken file dropped in shows
        as a problem with its file, and the reload as one with errors."""
        return deferToThread(self._browse)

    def _browse(self) -> None:
        browse(self, f"http://127.0.0.1:{self.admin}/ui?interval=250", self._look)

    def _look(self, page: Any) -> None:
        page.wait_for_selector('[data-api="default/orders"]')
        apis = page.inner_text("#apis")
        for text in ("default/orders", "default/limited", "/orders",
                     f"127.0.0.1:{self.upstream.address[1]}", "rate-limiting-flex"):
            self.assertIn(text, apis)
        chain = page.inner_text('[data-api="default/orders"] ol.chain')
        self.assertLess(chain.index("http-basic-authentication-flex"), chain.index("header-injection-flex"))
        self.assertEqual(page.inner_text("#ready"), "ready")
        self.assertNotIn(SECRET, page.content())
        page.wait_for_selector('#legend-rps [data-series="2xx"]')
        before = page.evaluate("document.getElementById('chart-rps').toDataURL()")
        self.assertFalse(page.evaluate(legend_above_zero("2xx", "rps")))
        for _ in range(40):  # traffic until the chart shows it (each round is ~20 requests)
            statuses = traffic(self.orders, "/orders/items", 20, "Basic b3BzOnMzY3JldC1QYTU1d29yZA==")
            self.assertEqual(set(statuses), {200})
            traffic(self.limited, "/", 2)
            if page.evaluate(legend_above_zero("2xx", "rps")) and page.evaluate(
                legend_above_zero("429 rate limited", "ratelimit")
            ):
                break
        else:
            self.fail("the charts never showed the traffic: " + page.inner_text("#traffic"))
        self.assertNotEqual(page.evaluate("document.getElementById('chart-rps').toDataURL()"), before)
        page.wait_for_function("() => /[0-9]/.test(document.querySelector('#legend-latency [data-series=\"p99\"]').textContent)")
        if SCREENSHOT:
            page.screenshot(path=SCREENSHOT)

        with open(os.path.join(self.gateway.root, "broken.yaml"), "w") as handle:
            handle.write("apiVersion: gateway.mulesoft.com/v1alpha1\nkind: ApiInstance\n"
                         "metadata: {name: broken}\nspec:\n  address: not-an-address\n")
        reactor.callFromThread(self.gateway.service.reload)
        page.wait_for_function("() => document.getElementById('problems').textContent.includes('broken.yaml')")
        problems = page.inner_text("#problems")
        self.assertIn("error", problems)
        self.assertIn("broken.yaml:", problems)
        page.wait_for_function("() => document.querySelector('#reloads tbody').textContent.includes('with errors')")
        self.assertIn("not ready", page.inner_text("#ready"))
        self.assertIn("ApiInstance default/broken: expected scheme://host:port", problems)


class UpstreamDashboardTests(ClusterCase):
    """The state of a Service's addresses on the dashboard."""

    timeout = 120

    def test_address_turns_unhealthy_when_its_upstream_stops(self) -> Any:
        """Three addresses health-checked every 0.1 s with retries: the page lists each as
        healthy with its health check, ejection and retry columns and the retry budget; when
        one upstream stops, its row turns unhealthy (the others stay healthy), and back to
        healthy when it listens again."""
        need_browser()
        config = gather(
            service_policy(
                "upstream-health-check",
                "    path: /health\n    intervalSeconds: 0.1\n    timeoutSeconds: 0.1\n"
                "    unhealthyThreshold: 2\n    healthyThreshold: 1\n",
            ),
            service_policy("upstream-retry", RETRY),
        )
        gateway, self.upstreams, _ = self.start(config=config)
        self.port = self.admin(gateway)
        return deferToThread(browse, self, f"http://127.0.0.1:{self.port}/ui?interval=250", self._look)

    def _look(self, page: Any) -> None:
        upstreams = self.upstreams
        row = [f'[data-upstream="default/orders"] tr[data-address="http://{host}:{upstreams.port}"]'
               for host in upstreams.hosts]
        state = [f"{r} td[data-state]" for r in row]
        page.wait_for_function(
            f"() => [{', '.join(repr(s) for s in state)}].every(s => "
            "document.querySelector(s) && document.querySelector(s).textContent === 'healthy')"
        )
        table = page.inner_text('[data-upstream="default/orders"]')
        for text in ("health check", "ejected", "ejections", "retries", "health-checked",
                     "retry budget: 0 active, exhausted 0 times"):
            self.assertIn(text, table)
        self.assertIn("healthy", page.inner_text(row[1]))
        blockingCallFromThread(reactor, lambda: defer.ensureDeferred(upstreams.kill(1)))
        page.wait_for_function(
            f"() => document.querySelector({state[1]!r}).textContent === 'unhealthy'"
        )
        self.assertEqual(page.inner_text(state[0]), "healthy")
        self.assertEqual(page.inner_text(state[2]), "healthy")
        self.assertIn("unhealthy", page.inner_text(row[1]).split("\t")[2])  # the health check column
        blockingCallFromThread(reactor, upstreams.restart, 1)
        page.wait_for_function(f"() => document.querySelector({state[1]!r}).textContent === 'healthy'")


class DashboardResourceTests(SynchronousTestCase):
    """The static files as the admin listeners serve them (no browser)."""

    def render(self, *path: bytes) -> tuple[DummyRequest, bytes]:
        """GET /ui/<path> on a DashboardResource."""
        request = DummyRequest(list(path))
        body = DashboardResource().render_GET(request)  # type: ignore[arg-type]
        return request, body

    def test_files_and_headers(self) -> None:
        """/ui is the page (scripts from its own origin only); its script and style; 404 otherwise."""
        request, body = self.render()
        self.assertIn(b'<script src="/ui/ui.js"', body)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"])
        self.assertIn(b"script-src 'self'", request.responseHeaders.getRawHeaders(b"content-security-policy")[0])
        self.assertIn(b"fetch(\"/metrics\"", self.render(b"ui.js")[1])
        self.assertEqual(self.render(b"")[1], body)
        request, _ = self.render(b"..", b"setup.cfg")
        self.assertEqual(request.responseCode, 404)

    def test_no_remote_resource(self) -> None:
        """Nothing in the page loads from another origin (it works offline)."""
        for name in ("index.html", "ui.js", "ui.css"):
            text = DashboardResource().files[name]
            self.assertNotIn(b"http://", text, name)
            self.assertNotIn(b"https://", text, name)
            self.assertNotIn(b"//cdn", text, name)

    def test_both_admin_sites_serve_it(self) -> None:
        """The one-process admin listener and the --workers supervisor's both have /ui."""
        from flexgw.service.workers import supervisor_admin_site

        for site in (admin_site(object()), supervisor_admin_site(object())):  # type: ignore[arg-type]
            self.assertIsInstance(site.resource.children[b"ui"], DashboardResource)
