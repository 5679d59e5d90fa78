"""The exchange contract: what an exchange needs from its front, and what observers of
finished exchanges receive.

A front is what serves exchanges to one client: an HTTP/1.1 connection (IngressProtocol, or
the forward proxy's ForwardProxyProtocol), or one HTTP/2 stream (H2Stream). An exchange reads
the front's attributes and calls only the methods written here; it never reaches the front's
factory, its connection set or its access log. The front reports each exchange that ends (and
each tunnel that opens or closes) to its observers: the policy chain's `on_done` hooks, the
access log, the metrics.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IExchangeFront(Interface):
    """What a ProxyExchange needs from the front that serves it."""

    clock = Attribute("IReactorTime for the exchange's timings.")
    wheel = Attribute("The clock's TimingWheel (flexgw.http.wheel).")
    watchdog = Attribute(
        "A flexgw.http.wheel.Watchdog on that wheel: the exchange's response and stream idle "
        "deadlines (an HTTP/1.1 connection's serves its exchanges one after the other)."
    )
    gate = Attribute(
        "The client side's read gate (flexgw.http.gate.ReadGate or alike): held while the "
        "request body must wait, registered as the upstream's producer while the body streams."
    )
    transport = Attribute(
        "The IConsumer the response goes to: the exchange writes to it (send_now) and registers "
        "the upstream connection's gate as its producer while the response streams."
    )
    pools = Attribute("The PoolManager: the exchange asks it for its upstream's pool.")
    http = Attribute("The listener's HttpSettings when the connection was made.")
    timeouts = Attribute("The gateway's Timeouts when the connection was made.")
    draining = Attribute("True once the gateway drains: responses close the connection.")
    peer = Attribute(
        "The Peer (flexgw.ingress.peer): client address, trust, scheme, forwarded lines."
    )

    def route(head):  # type: ignore[no-untyped-def]
        """The RouteMatch for a RequestHead on the listener's current plan, or None."""

    def answer(exchange, response, extra):  # type: ignore[no-untyped-def]
        """Answer `exchange` with a GatewayError or a policy's LocalResponse (no response head
        was sent yet), `extra` headers added; the exchange is over."""

    def finish(exchange, close):  # type: ignore[no-untyped-def]
        """The exchange's response is complete (`close`: it said Connection: close)."""

    def cut_off(exchange):  # type: ignore[no-untyped-def]
        """The exchange failed after its response head went out: cut the client off."""

    def tunnel_opened(exchange, tunnel):  # type: ignore[no-untyped-def]
        """The exchange became a byte tunnel: client bytes go to `tunnel` from now on."""

    def tunnel_closed(exchange):  # type: ignore[no-untyped-def]
        """The exchange's tunnel ended (its byte counts are on the exchange)."""


class IExchangeObserver(Interface):
    """Told by a front about each exchange that ends (and each tunnel that opens or closes)."""

    def exchange_finished(exchange, listener):  # type: ignore[no-untyped-def]
        """An exchange ended: answered (by the upstream, a policy or the gateway), cut off, or
        abandoned by the client. Called once per exchange that is not a tunnel."""

    def tunnel_opened(exchange, listener):  # type: ignore[no-untyped-def]
        """An exchange became a tunnel (its latency is the time to the switch)."""

    def tunnel_closed(exchange, listener):  # type: ignore[no-untyped-def]
        """A tunnel ended (its byte counts are on the exchange)."""

    def request_refused(peer, error, listener):  # type: ignore[no-untyped-def]
        """A request was refused before it was parsed whole or valid (no exchange)."""
