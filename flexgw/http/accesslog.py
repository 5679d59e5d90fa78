"""The access log: one JSON line per request, buffered and flushed on a short period."""

from __future__ import annotations

import json
import sys
import time
from typing import IO, TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from flexgw.config.plan import Listener
from flexgw.http.errors import GatewayError

if TYPE_CHECKING:
    from flexgw.ingress.exchange import ProxyExchange
    from flexgw.ingress.front import IngressProtocol

_dumps = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode


class BufferedLog:
    """JSON lines to a binary stream, buffered; `flush` runs every `flush_interval` seconds.

    Per line this costs a dict and one JSON encoding: no logging framework, no per-line clock
    formatting (the second is formatted once per second), no write syscall.
    """

    def __init__(self, clock: IReactorTime, stream: IO[bytes], flush_interval: float = 0.5) -> None:
        self.clock = clock
        self.stream = stream
        self.flush_interval = flush_interval
        self._lines: list[bytes] = []
        self._flusher: LoopingCall | None = None
        self._second = -1
        self._second_text = ""

    @classmethod
    def open(cls, clock: IReactorTime, target: str) -> Any:
        """An access log writing to `target`: a file path (appended), or "-" for stdout."""
        stream: IO[bytes] = sys.stdout.buffer if target == "-" else open(target, "ab")  # noqa: SIM115
        return cls(clock, stream)

    def start(self) -> None:
        """Start the periodic flush."""
        self._flusher = LoopingCall(self.flush)
        self._flusher.clock = self.clock
        self._flusher.start(self.flush_interval, now=False)

    def stop(self) -> None:
        """Stop the periodic flush and write what is buffered."""
        if self._flusher is not None and self._flusher.running:
            self._flusher.stop()
        self.flush()

    def flush(self) -> None:
        """Write buffered lines to the stream."""
        if self._lines:
            lines, self._lines = self._lines, []
            self.stream.write(b"".join(lines))
            self.stream.flush()

    def _timestamp(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1000):03d}Z"



def _text(value: str) -> str:
    """A JSON string literal; plain printable ASCII without quote or backslash is used as is."""
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'
    return _dumps(value)


def _ms(seconds: float) -> str:
    """Milliseconds with at most three decimals, as JSON (same as round(x * 1000, 3))."""
    return repr(round(seconds * 1000, 3))


class AccessLog(BufferedLog):
    """The access log: one JSON line per request."""

    def __init__(self, clock: IReactorTime, stream: IO[bytes], flush_interval: float = 0.5) -> None:
        super().__init__(clock, stream, flush_interval)
        self._known: dict[Any, str] = {}

    def exchange(self, exchange: ProxyExchange, listener: Listener) -> None:
        """Record a proxied (or gateway-answered) request.

        The line is assembled from pieces rather than by encoding a dict: names that come from
        the configuration are JSON-encoded once and remembered; only the request's own strings
        are checked (and escaped when they need it) each time. The output is the same JSON.
        """
        now = self.clock.seconds()
        head = exchange.head
        destination = exchange.destination
        route = exchange.route
        upstream_ms = exchange.upstream_elapsed
        known = self._known
        address = (listener.host, listener.port)
        listener_json = known.get(address)
        if listener_json is None:
            listener_json = known[address] = _dumps(f"{listener.host}:{listener.port}")
        api = exchange.api_key
        status = exchange.response_status
        error = exchange.error_cause
        self._lines.append(
            (
                f'{{"time":"{self._timestamp(now)}","client":{_text(exchange.front.client_ip)}'
                f',"listener":{listener_json},"method":{_text(head.method.decode("latin-1"))}'
                f',"path":{_text(head.path)},"version":"{head.version.decode("ascii")}"'
                f',"api":{self._name(api) if api is not None else "null"}'
                f',"route":{self._name(route.name) if route is not None else "null"}'
                f',"upstream":'
                f"{self._name(destination.upstream.key) if destination is not None else 'null'}"
                f',"status":{status or "null"},"bytes_in":{exchange.bytes_in}'
                f',"bytes_out":{exchange.bytes_out}'
                f',"duration_ms":{_ms(now - exchange.started)}'
                f',"upstream_ms":{_ms(upstream_ms) if upstream_ms is not None else "null"}'
                f',"error":{_text(error) if error is not None else "null"}}}\n'
            ).encode("ascii")
        )

    def _name(self, name: str) -> str:
        """A configuration name as JSON, encoded once."""
        encoded = self._known.get(name)
        if encoded is None:
            if len(self._known) > 10_000:  # names come from the configuration: a bound anyway
                self._known.clear()
            encoded = self._known[name] = _dumps(name)
        return encoded

    def refusal(self, protocol: IngressProtocol, error: GatewayError, listener: Listener) -> None:
        """Record a request refused before its head was complete or valid."""
        record = {
            "time": self._timestamp(self.clock.seconds()),
            "client": protocol.client_ip,
            "listener": f"{listener.host}:{listener.port}",
            "method": None,
            "path": None,
            "status": error.status,
            "error": error.cause,
        }
        self._lines.append(_dumps(record).encode("ascii") + b"\n")


class MessageLog(BufferedLog):
    """Where message-logging-flex lines go when the gateway runs: JSON lines on the runtime
    output, as cheap as access log lines (the Twisted log system costs several times more)."""

    def __init__(self, clock: IReactorTime, stream: IO[bytes], flush_interval: float = 0.5) -> None:
        super().__init__(clock, stream, flush_interval)
        self._middles: dict[tuple[Any, ...], str] = {}

    def emit(
        self,
        level: str,
        category: str | None,
        binding: str,
        api: str | None,
        item: str,
        section: str,
        text: str,
    ) -> None:
        """Record one message-logging item.

        Everything but the time and the message is the same for every line of an item: that
        part is encoded once and kept.
        """
        key = (level, category, binding, api, item, section)
        middle = self._middles.get(key)
        if middle is None:
            fields = {
                "level": level,
                "logger": "flexgw.messagelogging",
                "category": category,
                "binding": binding,
                "api": api,
                "item": item,
                "section": section,
            }
            middle = self._middles[key] = _dumps(fields)[1:-1]
        start = f'{{"time":"{self._timestamp(self.clock.seconds())}",{middle}'
        self._lines.append(f'{start},"message":{_text(text)}}}\n'.encode("ascii"))
