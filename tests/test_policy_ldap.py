"""ldap-authentication-flex: filter escaping, config, and a real slapd (search then bind, pooling,
TLS, StartTLS, stalled/garbage/reset directories) through the policy and a real gateway."""

from __future__ import annotations

import atexit
import base64
import os
import shutil
import signal
import tempfile
from typing import Any

import attrs
import jsonschema
from hypothesis import given, settings
from hypothesis import strategies as st
from ldaptor import ldapfilter
from ldaptor.protocols import pureldap
from twisted.internet import defer, protocol, reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from flexgw.http.request import analyze_head
from flexgw.policies import registry
from flexgw.policies.base import BuildContext, LocalResponse, PolicyConfigError, PolicyContext
from flexgw.policies.ldap_auth import KIND, SCHEMA, LdapAuthPolicy, filter_template, settings_from
from flexgw.sidecalls import ldap as ldapclient
from flexgw.testing import client
from flexgw.testing.certs import CertificateAuthority
from flexgw.testing.upstream import RecordingUpstream
from flexgw.tls.settings import TLSSettings
from tests.harness import free_port, start_api_gateway
from tests.ldapserver import BASE, SERVICE_DN, SERVICE_PASSWORD, SlapdServer
from tests.probes import poll_until

REALM = b'Basic realm="mule-realm"'
PEOPLE = f"ou=people,{BASE}"

#: Flex's documented Local Mode example (docs `policies-included-basic-auth-ldap`).
FLEX_EXAMPLE = {
    "ldapServerURL": "ldap://ldap.forumsys.com:389",
    "ldapServerUserDn": "cn=read-only-admin,dc=example,dc=com",
    "ldapServerUserPassword": "password",
    "ldapSearchBase": "dc=example,dc=com",
    "ldapSearchFilter": "(uid={0})",
    "ldapSearchInSubtree": False,
}


def context(user: str | None = None, password: str = "") -> PolicyContext:
    """A request with `Authorization: Basic user:password` (when `user` is given)."""
    headers = [(b"Host", b"api")]
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode())
        headers.append((b"Authorization", b"Basic " + token))
    head = analyze_head(b"GET", b"/x", "1.1", headers, True)
    return PolicyContext(head, "127.0.0.1", "http", "default/api")  # type: ignore[arg-type]


class FilterTests(SynchronousTestCase):
    """The filter is parsed once; the username goes in as a value, as RFC 4515 escaping would."""

    def test_injection_is_a_literal_value(self) -> None:
        """`*)(uid=*` becomes one equality assertion on that literal text."""
        built = filter_template("(uid={0})")("*)(uid=*")
        self.assertIsInstance(built, pureldap.LDAPFilter_equalityMatch)
        self.assertEqual(built.assertionValue.value, "*)(uid=*")
        self.assertEqual(built.asText(), r"(uid=\2a\29\28uid=\2a)")

    @settings(max_examples=25, deadline=None)
    @given(st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")),
                   min_size=1, max_size=12))
    def test_same_as_escaped_text(self, user: str) -> None:
        """For any username without white space (ldaptor's text parser drops some): the same
        BER as parsing the filter text with the RFC 4515-escaped name."""
        text = "(&(objectClass=person)(|(uid={0})(mail={0}@example.com)(cn=x{0}*)))"
        built = filter_template(text)(user)
        expected = ldapfilter.parseFilter(text.replace("{0}", pureldap.escape(user)))
        self.assertEqual(built.toWire(), expected.toWire())

    def test_white_space_kept(self) -> None:
        """White space in a username stays in the value, as the directory compares it."""
        self.assertEqual(filter_template("(cn={0})")(" a\tb ").assertionValue.value, " a\tb ")

    def test_filter_errors(self) -> None:
        """A malformed filter or `{0}` in an attribute name is a config error on the field."""
        for text in ("uid={0}", "(uid={0}", "({0}=x)"):
            with self.assertRaises(PolicyConfigError) as caught:
                filter_template(text)
            self.assertEqual(caught.exception.field, "ldapSearchFilter")

    def test_no_placeholder(self) -> None:
        """A filter without `{0}` is the same object for everyone."""
        build = filter_template("(objectClass=person)")
        self.assertIs(build("a"), build("b"))


class ConfigTests(SynchronousTestCase):
    """Flex's keys and defaults; the URL forms."""

    def test_registered_and_flex_example(self) -> None:
        """The kind is registered and Flex's documented example validates and builds."""
        self.assertIs(registry.lookup("ldap-authentication-flex"), KIND)
        jsonschema.Draft202012Validator(SCHEMA).validate(FLEX_EXAMPLE)
        policy = KIND.build(dict(FLEX_EXAMPLE), BuildContext("default/l", "default/api"))
        self.assertIsInstance(policy, LdapAuthPolicy)
        self.assertEqual((policy.settings.host, policy.settings.port), ("ldap.forumsys.com", 389))

    def test_defaults(self) -> None:
        """Defaults: ldap://127.0.0.1:389, (uid={0}), one level, 10 s."""
        s = settings_from({"ldapServerUserDn": "cn=a", "ldapServerUserPassword": "p",
                           "ldapSearchBase": "dc=x"})
        self.assertEqual((s.host, s.port, s.tls, s.start_tls), ("127.0.0.1", 389, False, False))
        self.assertEqual((s.filter_text, s.subtree, s.timeout), ("(uid={0})", False, 10.0))

    def test_urls(self) -> None:
        """ldaps:// defaults to 636; the RFC 4516 extension asks for StartTLS."""
        base = {"ldapServerUserDn": "cn=a", "ldapServerUserPassword": "p", "ldapSearchBase": ""}
        s = settings_from({**base, "ldapServerURL": "ldaps://dir.example"})
        self.assertEqual((s.port, s.tls), (636, True))
        for url in ("ldap://dir:10389/????StartTLS", "ldap://dir/????!StartTLS",
                    "ldap://dir/????1.3.6.1.4.1.1466.20037"):
            self.assertTrue(settings_from({**base, "ldapServerURL": url}).start_tls, url)
        for url in ("http://dir", "ldap://", "ldaps://dir/????StartTLS", "ldap://dir/????!x-other"):
            with self.assertRaises(PolicyConfigError):
                settings_from({**base, "ldapServerURL": url})
        self.assertFalse(jsonschema.Draft202012Validator(SCHEMA).is_valid(
            {**base, "ldapServerURL": "http://dir"}))
        self.assertFalse(jsonschema.Draft202012Validator(SCHEMA).is_valid({"ldapSearchBase": ""}))


class DirectoryCase(TestCase):
    """Helpers to build the policy against a directory and run requests through it."""

    # 30 s: these tests wait for the directory's answers, never for this timeout (2 s ran out
    # on a loaded machine); the tests of timeouts set their own.
    timeout_ms = 30000
    server: Any = None

    def build(self, url: str | None = None, tls: TLSSettings | None = None, clock: Any = None,
              **config: Any) -> Any:
        """The policy on `url` (default: the class's slapd), its directory closed at the end;
        `clock` runs its timeouts (default: the reactor)."""
        config = {
            "ldapServerURL": url or self.server.url,
            "ldapServerUserDn": SERVICE_DN,
            "ldapServerUserPassword": SERVICE_PASSWORD,
            "ldapSearchBase": PEOPLE,
            "ldapTimeout": self.timeout_ms,
            **config,
        }
        jsonschema.Draft202012Validator(SCHEMA).validate(config)
        policy = LdapAuthPolicy(settings_from(config), reactor, {}, tls, clock)
        self.addCleanup(lambda: policy._directory and policy._directory.close())
        return policy

    async def call(self, policy: LdapAuthPolicy, user: str | None, password: str = "") -> Any:
        """The policy's outcome for one request: None (let through) or a LocalResponse."""
        ctx = context(user, password)
        result = policy.on_request(ctx)
        if isinstance(result, defer.Deferred):
            result = await result
        if result is None:
            self.assertEqual(ctx.authentication["principal"], user)  # type: ignore[index]
        return result

    def assertUnauthorized(self, result: Any) -> None:
        """Flex's 401 with the Basic challenge."""
        self.assertIsInstance(result, LocalResponse)
        self.assertEqual(result.status, 401)
        self.assertIn((b"www-authenticate", REALM), result.headers)

    def assertUnavailable(self, result: Any, cause: str) -> None:
        """A 503 naming the cause."""
        self.assertIsInstance(result, LocalResponse)
        self.assertEqual((result.status, result.cause), (503, cause))
        self.assertIn((b"x-flexgw-error", cause.encode()), result.headers)


_shared: dict[str, SlapdServer] = {}


def shared_slapd(name: str, make: Any = SlapdServer) -> SlapdServer:
    """One slapd per trial process and `name`, started at first use and stopped (by its PID)
    when the process exits: the classes using it never stop or signal it."""
    server = _shared.get(name)
    if server is None:
        server = _shared[name] = make().start()
        atexit.register(server.stop)
    return server


class SlapdTests(DirectoryCase):
    """Against a real slapd shared by the module's tests."""

    def setUp(self) -> None:
        """The shared slapd (skipped when it is not installed)."""
        self.server = shared_slapd("plain")

    async def test_search_then_bind(self) -> None:
        """The right password passes with the entry's DN; a wrong one, an unknown user, no
        credentials and an empty password are 401s."""
        policy = self.build()
        ctx = context("alice", "alice-pw")
        self.assertIsNone(await policy.on_request(ctx))
        self.assertEqual(ctx.authentication["properties"]["dn"],  # type: ignore[index]
                         f"uid=alice,{PEOPLE}")
        self.assertUnauthorized(await self.call(policy, "alice", "wrong"))
        self.assertUnauthorized(await self.call(policy, "nobody", "alice-pw"))
        self.assertUnauthorized(await self.call(policy, None))
        self.assertUnauthorized(await self.call(policy, "alice", ""))

    async def test_injection_cannot_widen_the_search(self) -> None:
        """`al*` does not match alice; `*)(uid=*` matches only the entry literally named so."""
        policy = self.build(ldapSearchFilter="(&(objectClass=inetOrgPerson)(uid={0}))")
        self.assertUnauthorized(await self.call(policy, "al*", "alice-pw"))
        self.assertUnauthorized(await self.call(policy, "*", "alice-pw"))
        self.assertUnauthorized(await self.call(policy, "*)(uid=*", "alice-pw"))
        self.assertIsNone(await self.call(policy, "*)(uid=*", "star-pw"))

    async def test_subtree_and_ambiguity(self) -> None:
        """One level misses carol two levels down, the subtree finds her; two entries with the
        same mail are refused."""
        self.assertUnauthorized(await self.call(self.build(ldapSearchBase=BASE), "carol", "carol-pw"))
        deep = self.build(ldapSearchBase=BASE, ldapSearchInSubtree=True)
        self.assertIsNone(await self.call(deep, "carol", "carol-pw"))
        by_mail = self.build(ldapSearchFilter="(mail={0})")
        self.assertUnauthorized(await self.call(by_mail, "twins@example.com", "twin-pw"))
        self.assertIsNone(await self.call(by_mail, "bob@example.com", "bob-pw"))

    async def test_connections_are_pooled(self) -> None:
        """Twenty requests, ten at a time, open at most one service connection and the bind
        pool's connections; sequential ones reuse them."""
        policy = self.build()
        await defer.gatherResults([defer.ensureDeferred(self.call(policy, "bob", "bob-pw"))
                                   for _ in range(10)])
        opened = policy.directory.connects
        self.assertLessEqual(opened, 1 + policy.directory.max_bind_connections)
        for _ in range(10):
            self.assertIsNone(await self.call(policy, "bob", "bob-pw"))
        self.assertEqual(policy.directory.connects, opened)

    async def test_clients_that_go_away(self) -> None:
        """Requests cancelled midway (their clients went away: connecting, searching, binding)
        leave the pools whole: twenty requests right after still pass."""
        policy = self.build()
        for delay in (0.0, 0.002, 0.01, 0.03):
            waits = [policy.on_request(context("bob", "bob-pw")) for _ in range(20)]
            for d in waits:
                d.addErrback(lambda _: None)
            await task.deferLater(reactor, delay, lambda: None)
            for d in waits:
                d.cancel()
        results = await defer.gatherResults([
            defer.ensureDeferred(self.call(policy, "bob", "bob-pw")) for _ in range(20)])
        self.assertEqual(results, [None] * 20)

    async def test_service_user_refused(self) -> None:
        """A wrong service password is a 503 naming it, not a 401."""
        policy = self.build(ldapServerUserPassword="wrong")
        self.assertUnavailable(await self.call(policy, "alice", "alice-pw"),
                               "ldap_service_bind_failed")


class StalledTests(DirectoryCase):
    """A stopped (SIGSTOP) slapd: a timeout and a 503, the reactor stays responsive."""

    timeout_ms = 600

    async def test_stalled_directory(self) -> None:
        """While slapd is stopped the request waits, the reactor running on, and ends in 503
        ldap_timeout when the timeout has passed on the policy's clock, not before; once slapd
        runs again, requests pass again. (A clock the test advances: no race between the
        timeout and a loaded machine.)"""
        self.server = SlapdServer().start()
        self.addCleanup(self.server.stop)
        clock = task.Clock()
        policy = self.build(clock=clock)
        self.assertIsNone(await self.call(policy, "alice", "alice-pw"))
        self.server.signal(signal.SIGSTOP)
        pending = defer.ensureDeferred(self.call(policy, "alice", "alice-pw"))
        await poll_until(lambda: [c.getTime() for c in clock.getDelayedCalls()] == [0.6])
        clock.advance(0.598)
        self.assertNoResult(pending)
        clock.advance(0.002)
        self.assertUnavailable(self.successResultOf(pending), "ldap_timeout")
        self.server.signal(signal.SIGCONT)
        self.assertIsNone(await self.call(policy, "alice", "alice-pw"))


class _Misbehaving(protocol.Protocol):
    """A fake directory: answers whatever arrives with `reply` (or closes at once)."""

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply

    def connectionMade(self) -> None:
        """Close at once when there is nothing to say (a reset)."""
        if self.reply is None:
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        """Answer anything with the reply."""
        self.transport.write(self.reply)


class BadDirectoryTests(DirectoryCase):
    """Directories that reset, answer garbage or too much, or are not there: 503 with a cause."""

    timeout_ms = 1000

    def fake(self, reply: bytes | None) -> str:
        """A listening fake directory; its URL."""
        factory = protocol.Factory.forProtocol(lambda: _Misbehaving(reply))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"ldap://127.0.0.1:{port.getHost().port}"

    async def test_garbage(self) -> None:
        """Bytes that are not BER: ldap_bad_response."""
        policy = self.build(self.fake(b"\xff\xff\xff\xffHTTP/1.1 200 OK\r\n\r\n"))
        self.assertUnavailable(await self.call(policy, "alice", "pw"), "ldap_bad_response")

    async def test_oversized(self) -> None:
        """A message announcing 16 MiB and sending more than the bound: ldap_bad_response."""
        huge = b"\x30\x84\x01\x00\x00\x00" + b"\x00" * (ldapclient.MAX_MESSAGE_BYTES + 10)
        policy = self.build(self.fake(huge))
        self.assertUnavailable(await self.call(policy, "alice", "pw"), "ldap_bad_response")

    async def test_reset_and_refused(self) -> None:
        """A reset and a refused connection: ldap_unavailable."""
        policy = self.build(self.fake(None))
        self.assertUnavailable(await self.call(policy, "alice", "pw"), "ldap_unavailable")
        refused = self.build(f"ldap://127.0.0.1:{free_port()}")
        self.assertUnavailable(await self.call(refused, "alice", "pw"), "ldap_unavailable")

    async def test_silent(self) -> None:
        """A directory that accepts and never answers: ldap_timeout."""
        policy = self.build(self.fake(b""))
        self.assertUnavailable(await self.call(policy, "alice", "pw"), "ldap_timeout")


class TLSTests(DirectoryCase):
    """ldaps:// and StartTLS against slapd with a test CA's certificate."""

    def setUp(self) -> None:
        """slapd with a test CA's certificate for 127.0.0.1 (shared by the module)."""
        self.ca = CertificateAuthority(rsa=True)

        def make() -> SlapdServer:
            certs = tempfile.mkdtemp(prefix="flexgw-ldap-certs-")
            atexit.register(shutil.rmtree, certs, True)
            cert, key = self.ca.issue("127.0.0.1", dns=["localhost"], ips=["127.0.0.1"],
                                      rsa=True).write(certs, "slapd")
            os.chmod(key, 0o644)  # slapd reads it; a temporary test key
            server = SlapdServer(tls=(cert, key, self.ca.write(certs)))
            server.ca_pem = self.ca.pem  # type: ignore[attr-defined]
            return server

        self.server = shared_slapd("tls", make)

    def trusting(self) -> TLSSettings:
        """outboundPolicyCalls settings trusting the test CA."""
        return attrs.evolve(TLSSettings(), trusted_ca=(self.server.ca_pem,))

    async def test_ldaps_and_starttls(self) -> None:
        """Both work with the CA trusted; both are 503 against the system trust store."""
        ldaps = self.build(self.server.tls_url, self.trusting())
        self.assertIsNone(await self.call(ldaps, "alice", "alice-pw"))
        self.assertUnauthorized(await self.call(ldaps, "alice", "nope"))
        start = self.build(self.server.url + "/????StartTLS", self.trusting())
        self.assertIsNone(await self.call(start, "alice", "alice-pw"))
        untrusted = self.build(self.server.tls_url)
        self.assertUnavailable(await self.call(untrusted, "alice", "alice-pw"), "ldap_unavailable")


class GatewayTests(TestCase):
    """ldap-authentication-flex through a real gateway, against a real slapd."""

    async def test_end_to_end(self) -> None:
        """401 with the challenge, 200 for a directory user (the upstream sees the request),
        503 naming the cause when the directory is gone; the gateway stop closes the pool."""
        server = SlapdServer().start()
        self.addCleanup(server.stop)
        upstream = RecordingUpstream(reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()
        start_api_gateway(self, port, upstream.address[1], (
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
            "metadata: {name: ldap}\n"
            "spec:\n  targetRef: {kind: ApiInstance, name: test-api}\n"
            "  policyRef: {name: ldap-authentication-flex}\n"
            "  config:\n"
            f"    ldapServerURL: {server.url}\n"
            f"    ldapServerUserDn: '{SERVICE_DN}'\n"
            f"    ldapServerUserPassword: {SERVICE_PASSWORD}\n"
            f"    ldapSearchBase: '{PEOPLE}'\n"
            "    ldapTimeout: 30000\n"  # (waits for answers only: a stopped slapd refuses)
        ))

        async def get(user: str | None, password: str = "") -> client.Response:
            auth = b""
            if user is not None:
                auth = b"Authorization: Basic " + base64.b64encode(
                    f"{user}:{password}".encode()) + b"\r\n"
            raw = b"GET /x HTTP/1.1\r\nHost: t\r\n" + auth + b"\r\n"
            return await client.request(reactor, "127.0.0.1", port, raw)

        missing = await get(None)
        self.assertEqual(missing.status, 401)
        self.assertEqual(missing.header("www-authenticate"), [REALM])
        self.assertEqual((await get("alice", "bad")).status, 401)
        self.assertEqual(upstream.received, [])
        ok = await get("alice", "alice-pw")
        self.assertEqual(ok.status, 200)
        self.assertEqual(len(upstream.received), 1)
        server.stop()
        gone = await get("alice", "alice-pw")
        self.assertEqual(gone.status, 503)
        self.assertIn(gone.header("x-flexgw-error")[0], (b"ldap_unavailable", b"ldap_timeout"))
        self.assertEqual(len(upstream.received), 1)
