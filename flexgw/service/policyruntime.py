"""The policy runtime: what the running gateway lends its policies (flexgw.policies.base.
PolicyServices), and the clients it makes for each plan: the side-call Agent (TLS settings,
forward proxy) and the Redis client of the shared storage (imported when first needed)."""

from __future__ import annotations

from typing import Any

import attrs

from flexgw.policies.base import PolicyServices


@attrs.define
class PolicyRuntime(PolicyServices):
    """The gateway's PolicyServices: one per gateway process, kept across reloads; each new
    plan's settings (side-call TLS, forward proxy, shared storage) remake the clients policies
    get before the plan's policies are built."""

    shared_storage: Any = None  # the flexgw.plan.SharedStorage `redis` was made for
    side_tls: Any = None  # TLSSettings of Configuration.defaultTLS.outboundPolicyCalls, or None
    forward_proxy: Any = None  # Configuration.spec.forwardProxy, or None

    def use_side_tls(self, settings: Any) -> None:
        """Called with each new plan's `defaultTLS.outboundPolicyCalls` settings (before its
        policies are built): a new Agent for side calls when they changed."""
        if settings == self.side_tls:
            return
        self.side_tls = settings
        self._make_side_agent()

    def use_forward_proxy(self, proxy: Any) -> None:
        """Called with each new plan's forward proxy (before its policies are built): side
        calls go through it (flexgw.sidecalls.proxy) while one is configured."""
        if proxy == self.forward_proxy:
            return
        self.forward_proxy = proxy
        self._make_side_agent()

    def _make_side_agent(self) -> None:
        """The side-call Agent for the current TLS settings and forward proxy."""
        tls_policy = direct = None
        if self.side_tls is not None:
            from twisted.web.client import Agent

            from flexgw.tls.contexts import SideCallTLSPolicy

            tls_policy = SideCallTLSPolicy(self.side_tls)
            direct = Agent(self.reactor, contextFactory=tls_policy)
        if self.forward_proxy is not None:
            from flexgw.sidecalls.proxy import ForwardProxyAgent

            self.side_agent = ForwardProxyAgent(self.reactor, self.forward_proxy, direct, tls_policy)
        else:
            self.side_agent = direct

    def close_shared(self) -> Any:
        """The gateway stops: close what policies keep across reloads and asked to be closed
        (a `close_with_gateway` method, e.g. the LDAP policy's pooled connections); a Deferred
        firing when they are closed."""
        from twisted.internet.defer import gatherResults, maybeDeferred

        closing = []
        for value in list(self.shared.values()):
            close = getattr(value, "close_with_gateway", None)
            if close is not None:
                closing.append(maybeDeferred(close))
        return gatherResults(closing, consumeErrors=True)

    def use_shared_storage(self, settings: Any) -> None:
        """Called with each new plan's shared storage (before its policies are built): a new
        client when the settings changed (the old one is closed), none without settings."""
        if settings == self.shared_storage:
            return
        old, self.redis, self.shared_storage = self.redis, None, settings
        if old is not None:
            old.close()
        if settings is not None:
            from flexgw.storage.redis import RedisClient

            tls = None
            if settings.tls is not None:
                from flexgw.tls.contexts import client_creator

                no_alpn = attrs.evolve(settings.tls, alpn=())  # Redis speaks no ALPN

                def tls(host: str) -> Any:
                    """TLS for one host (a sentinel or the master), SNI and check for it."""
                    return client_creator(no_alpn, host)

            self.redis = RedisClient(
                self.reactor,
                settings.host,
                settings.port,
                username=settings.username,
                password=settings.password,
                db=settings.db,
                sentinel=settings.sentinel,
                tls=tls,
                connect_timeout=settings.command_timeout,
                command_timeout=settings.command_timeout,
                max_backoff=settings.probe_interval,
                summary_interval=settings.summary_interval,
            )
