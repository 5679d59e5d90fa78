"""`ldap-authentication-flex`: Basic credentials checked against an LDAP directory, as Flex Gateway.

Flex behaviour reproduced (docs `policies-included-basic-auth-ldap`, reference §2.2): keys
`ldapServerURL` (default `ldap://127.0.0.1:389`), `ldapServerUserDn`, `ldapServerUserPassword`,
`ldapSearchBase` (all three required), `ldapSearchFilter` (default `(uid={0})`, `{0}` is the
username), `ldapSearchInSubtree` (default false: one level under the base; true: the whole
subtree, base included). The client sends `Authorization: Basic base64(user:password)`; the
gateway searches the directory as the service user for the entry the filter names, then binds
as that entry's DN with the given password. Any failure is a 401 with
`WWW-Authenticate: Basic realm="mule-realm"` (the docs' only status); the 401's body and
content type are those of `http-basic-authentication-flex` (same family, same realm; Flex's
LDAP body is not documented). On success `authentication.principal` is the username and
`authentication.properties.dn` the entry's DN. Flex documents no cache of successful binds, so
there is none: every request searches and binds (on pooled connections).

The username is put into the filter as an LDAP value, never as filter text: the filter is
parsed once at compile time and the username replaces the placeholder inside the parsed
assertion values, which is what RFC 4515 escaping (`*` `(` `)` `\\` NUL) achieves on text, so a
username like `*)(uid=*` matches only an entry whose uid is literally that.

Deliberate differences from Flex:
- A directory that cannot answer (refused, reset, TLS failure, stalled past the timeout,
  garbage or oversized replies, the service user's own bind refused) is a 503 with
  `x-flexgw-error` naming the cause (`ldap_unavailable`, `ldap_timeout`, `ldap_bad_response`,
  `ldap_service_bind_failed`), not a 401: an outage must not look like bad credentials to
  clients or to monitoring. Nothing is let through.
- An empty password is refused without asking the directory (an LDAP bind with an empty password
  is an unauthenticated bind that many servers accept, RFC 4513 §5.1.2); so is a search that
  finds several entries (ambiguous) and a username with a NUL or over 256 bytes.
- `ldapServerURL` may ask for StartTLS (RFC 4513 §3) with the RFC 4516 extension field:
  `ldap://host:389/????StartTLS` (or `!StartTLS`, or the OID `1.3.6.1.4.1.1466.20037`). TLS
  (ldaps:// and StartTLS) uses `Configuration.defaultTLS.outboundPolicyCalls` when set, else
  the system trust store; the certificate is checked against the URL's host.
- flexgw key `ldapTimeout` (milliseconds, default 10000): the bound on connecting and on each
  directory operation (Flex documents none).
- Referrals are not followed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from flexgw.http.tracecontext import side_call
from flexgw.policies.base import (
    BuildContext,
    IPolicy,
    IPolicyKind,
    LocalResponse,
    PolicyConfigError,
    PolicyContext,
    UsesRuntime,
)
from flexgw.policies.basic_auth import UNAUTHORIZED, basic_credentials
from flexgw.policies.registry import register

_log = Logger(namespace="flexgw.policies.ldap")

NAME = "ldap-authentication-flex"
DEFAULT_URL = "ldap://127.0.0.1:389"
DEFAULT_FILTER = "(uid={0})"
DEFAULT_TIMEOUT_MS = 10000
#: What the URL's extension field may say to ask for StartTLS.
START_TLS = {"starttls", "!starttls", "1.3.6.1.4.1.1466.20037", "!1.3.6.1.4.1.1466.20037"}
#: A username longer than this (UTF-8 bytes) is refused without a search.
MAX_USERNAME = 256
#: Stands for `{0}` while the filter is parsed (letters only: valid inside any filter value).
SENTINEL = "FlexgwLdapUsernamePlaceholder"

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "ldapServerURL": {"type": "string", "pattern": "^(?i:ldaps?)://", "default": DEFAULT_URL},
        "ldapServerUserDn": {"type": "string", "minLength": 1},
        "ldapServerUserPassword": {"type": "string"},
        "ldapSearchBase": {"type": "string"},
        "ldapSearchFilter": {"type": "string", "minLength": 1, "default": DEFAULT_FILTER},
        "ldapSearchInSubtree": {"type": "boolean", "default": False},
        "ldapTimeout": {"type": "integer", "minimum": 1, "default": DEFAULT_TIMEOUT_MS},
    },
    "required": ["ldapServerUserDn", "ldapServerUserPassword", "ldapSearchBase"],
    "additionalProperties": False,
}


# -- the filter template -------------------------------------------------------------------------


def filter_template(text: str) -> Callable[[str], Any]:
    """Parse `ldapSearchFilter` once; the returned function builds the filter for a username
    (the placeholder `{0}` replaced inside the parsed values: no text is parsed per request)."""
    from ldaptor import ldapfilter

    if SENTINEL in text:
        raise PolicyConfigError("the filter holds a reserved word", "ldapSearchFilter")
    try:
        parsed = ldapfilter.parseFilter(text.replace("{0}", SENTINEL))
    except Exception as e:  # noqa: BLE001 (pyparsing's errors vary)
        raise PolicyConfigError(f"not an LDAP filter (RFC 4515): {e}", "ldapSearchFilter") from None
    build = _template(parsed)
    if build is None:
        return lambda username: parsed
    return build


def _has(value: Any) -> bool:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return SENTINEL in text


def _sub(value: Any, username: str) -> str:
    text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
    return text.replace(SENTINEL, username)


def _template(node: Any) -> Callable[[str], Any] | None:
    """A builder for `node` with the username put in, or None when `node` has no placeholder."""
    from ldaptor.protocols import pureldap as p

    if isinstance(node, (p.LDAPFilter_and, p.LDAPFilter_or)):
        kids = list(node)
        builders = [_template(k) for k in kids]
        if not any(builders):
            return None
        cls = type(node)
        pairs = list(zip(kids, builders, strict=True))
        return lambda u: cls([b(u) if b else k for k, b in pairs])
    if isinstance(node, p.LDAPFilter_not):
        inner = _template(node.value)
        return None if inner is None else (lambda u: p.LDAPFilter_not(inner(u)))
    if isinstance(node, p.LDAPAttributeValueAssertion):
        _no_placeholder_in_name(node.attributeDesc.value)
        if not _has(node.assertionValue.value):
            return None
        cls, desc, value = type(node), node.attributeDesc, node.assertionValue.value
        return lambda u: cls(attributeDesc=desc, assertionValue=p.LDAPAssertionValue(_sub(value, u)))
    if isinstance(node, p.LDAPFilter_substrings):
        _no_placeholder_in_name(node.type)
        parts = [(type(s), s.value) for s in node.substrings]
        if not any(_has(v) for _, v in parts):
            return None
        kind = node.type
        return lambda u: p.LDAPFilter_substrings(
            type=kind, substrings=[c(_sub(v, u)) for c, v in parts]
        )
    if isinstance(node, p.LDAPFilter_present):
        _no_placeholder_in_name(node.value)
        return None
    if isinstance(node, p.LDAPFilter_extensibleMatch):
        if node.type is not None:
            _no_placeholder_in_name(node.type.value)
        if not _has(node.matchValue.value):
            return None
        rule, kind, dn_attrs = node.matchingRule, node.type, node.dnAttributes
        value = node.matchValue.value
        return lambda u: p.LDAPFilter_extensibleMatch(
            matchingRule=rule, type=kind, matchValue=_sub(value, u), dnAttributes=dn_attrs
        )
    raise PolicyConfigError(f"unsupported filter item {type(node).__name__}", "ldapSearchFilter")


def _no_placeholder_in_name(name: Any) -> None:
    if _has(name):
        raise PolicyConfigError(
            "{0} may only stand in a value, not in an attribute name", "ldapSearchFilter"
        )


# -- settings ------------------------------------------------------------------------------------


@attrs.frozen
class Settings:
    """The binding's config, normalised."""

    url: str
    host: str
    port: int
    tls: bool
    start_tls: bool
    service_dn: str
    service_password: str = attrs.field(repr=False)
    base: str
    filter_text: str
    subtree: bool
    timeout: float


def settings_from(config: dict[str, Any]) -> Settings:
    """Check the config (URL, filter); errors name the field."""
    url = config.get("ldapServerURL", DEFAULT_URL)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("ldap", "ldaps") or not parts.hostname:
        raise PolicyConfigError(f"not an ldap:// or ldaps:// URL: {url!r}", "ldapServerURL")
    try:
        port = parts.port or (636 if scheme == "ldaps" else 389)
    except ValueError:
        raise PolicyConfigError(f"bad port in {url!r}", "ldapServerURL") from None
    # RFC 4516: ldap://host:port/dn?attributes?scope?filter?extensions
    fields = parts.query.split("?") if parts.query else []
    extensions = [unquote(e).strip().lower() for e in (fields[3].split(",") if len(fields) > 3 else [])]
    start_tls = any(e in START_TLS for e in extensions)
    unknown = [e for e in extensions if e and e not in START_TLS]
    if [e for e in unknown if e.startswith("!")]:
        raise PolicyConfigError(f"unsupported critical URL extension in {url!r}", "ldapServerURL")
    if start_tls and scheme == "ldaps":
        raise PolicyConfigError("StartTLS on an ldaps:// URL: TLS already", "ldapServerURL")
    text = config.get("ldapSearchFilter", DEFAULT_FILTER)
    filter_template(text)  # parse now: a bad filter is a config error at its position
    return Settings(
        url=url,
        host=parts.hostname,
        port=port,
        tls=scheme == "ldaps",
        start_tls=start_tls,
        service_dn=config["ldapServerUserDn"],
        service_password=config["ldapServerUserPassword"],
        base=config["ldapSearchBase"],
        filter_text=text,
        subtree=bool(config.get("ldapSearchInSubtree", False)),
        timeout=config.get("ldapTimeout", DEFAULT_TIMEOUT_MS) / 1000.0,
    )


# -- the policy ----------------------------------------------------------------------------------


def _unavailable(failure: Failure) -> LocalResponse:
    """The directory could not answer: 503 with the cause."""
    from flexgw.sidecalls.ldap import LdapError

    error = failure.value
    cause = error.cause if isinstance(error, LdapError) else "ldap_unavailable"
    _log.warn("LDAP authentication failed: {cause}: {error}", cause=cause,
              error=failure.getErrorMessage())
    return LocalResponse.gateway_error(503, cause, "Authentication service unavailable")


@implementer(IPolicy)
class LdapAuthPolicy(UsesRuntime):
    """One binding: the settings, the compiled filter and (from first use) the directory."""

    def __init__(
        self,
        settings: Settings,
        reactor: Any = None,
        shared: dict[Any, Any] | None = None,
        tls_settings: Any = None,
        clock: Any = None,
    ) -> None:
        self.settings = settings
        self._reactor = reactor
        self._clock = clock
        self._shared = shared if shared is not None else {}
        self._tls_settings = tls_settings  # defaultTLS.outboundPolicyCalls, or None
        self._filter = filter_template(settings.filter_text)
        self._directory: Any = None

    @property
    def directory(self) -> Any:
        """The pooled directory client, shared by bindings (and reloads) with the same server,
        service user and timeout."""
        if self._directory is None:
            from flexgw.sidecalls.ldap import DirectoryAddress

            s = self.settings
            secret = hashlib.sha256(s.service_password.encode("utf-8")).hexdigest()
            tls = self._tls_settings
            key = (NAME, s.host, s.port, s.tls, s.start_tls, s.service_dn, secret, s.timeout, tls)
            directory = self._shared.get(key)
            if directory is None or directory.closed:
                creator = None
                if tls is not None:
                    from flexgw.tls.contexts import client_creator

                    no_alpn = attrs.evolve(tls, alpn=())  # LDAP speaks no ALPN

                    def creator(host: str) -> Any:
                        return client_creator(no_alpn, host)

                address = DirectoryAddress(s.host, s.port, s.tls, s.start_tls, creator)
                directory = self._shared[key] = SharedDirectory(
                    self._runtime_reactor(), address, s.service_dn, s.service_password, s.timeout,
                    clock=self.clock,
                )
            self._directory = directory
        return self._directory

    def on_request(self, ctx: PolicyContext) -> Any:
        """401 at once for missing credentials; else search, bind, and decide."""
        credentials = basic_credentials(ctx)
        if credentials is None:
            return UNAUTHORIZED
        raw_user, raw_password = credentials
        try:
            username = raw_user.decode("utf-8")
            password = raw_password.decode("utf-8")
        except UnicodeDecodeError:
            return UNAUTHORIZED
        if not username or not password or "\0" in username or len(raw_user) > MAX_USERNAME:
            return UNAUTHORIZED
        s = self.settings
        directory = self.directory
        # A traced request gets a child span for the search and one for the bind (LDAP carries
        # no trace context: the directory is not told).
        trace = ctx.trace
        where = (("server.address", s.host), ("server.port", s.port))
        d = side_call(trace, "ldap search",
                      lambda _: directory.find(s.base, s.subtree, self._filter(username)),
                      "ldap_unavailable", where)

        def found(result: tuple[list[str], bool]) -> Any:
            dns, more = result
            if len(dns) != 1 or more:
                return None  # nobody, or ambiguous
            dn = dns[0]
            bound = side_call(trace, "ldap bind", lambda _: directory.authenticate(dn, password),
                              "ldap_unavailable", where)
            return bound.addCallback(lambda ok: dn if ok else None)

        def decided(dn: str | None) -> LocalResponse | None:
            if dn is None:
                return UNAUTHORIZED
            ctx.authentication = {
                "principal": username,
                "clientId": None,
                "clientName": None,
                "properties": {"dn": dn},
            }
            return None

        return d.addCallback(found).addCallbacks(decided, _unavailable)

    #: Its on_response does nothing: the chain does not call it (see IPolicy).
    response_phase = False

    def on_response(self, ctx: PolicyContext) -> None:
        """Nothing to do on the response."""


def SharedDirectory(*args: Any, **kwargs: Any) -> Any:
    """An LdapDirectory the gateway closes when it stops (`close_with_gateway`)."""
    from flexgw.sidecalls.ldap import LdapDirectory

    directory = LdapDirectory(*args, **kwargs)
    directory.close_with_gateway = directory.close  # type: ignore[attr-defined]
    return directory


@implementer(IPolicyKind)
class LdapAuthKind:
    """The `ldap-authentication-flex` policy kind."""

    name = NAME
    schema = SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> LdapAuthPolicy:
        """Check the config; connections are made at the first request."""
        services = context.services
        return LdapAuthPolicy(
            settings_from(config),
            context.reactor or services.reactor,
            services.shared,
            getattr(services, "side_tls", None),  # the gateway's PolicyRuntime has it
            context.clock or services.clock,
        )


KIND = register(LdapAuthKind())
