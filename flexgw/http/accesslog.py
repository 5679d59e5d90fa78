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



class AccessLog(BufferedLog):
    """The access log: one JSON line per request."""

    def exchange(self, exchange: ProxyExchange, listener: Listener) -> None:
        """Record a proxied (or gateway-answered) request."""
        now = self.clock.seconds()
        head = exchange.head
        destination = exchange.destination
        upstream_ms = exchange.upstream_elapsed
        record = {
            "time": self._timestamp(now),
            "client": exchange.front.client_ip,
            "listener": f"{listener.host}:{listener.port}",
            "method": head.method.decode("latin-1"),
            "path": head.path,
            "version": head.version.decode("ascii"),
            "api": exchange.api_key,
            "route": exchange.route.name if exchange.route is not None else None,
            "upstream": destination.upstream.key if destination is not None else None,
            "status": exchange.response_status or None,
            "bytes_in": exchange.bytes_in,
            "bytes_out": exchange.bytes_out,
            "duration_ms": round((now - exchange.started) * 1000, 3),
            "upstream_ms": round(upstream_ms * 1000, 3) if upstream_ms is not None else None,
            "error": exchange.error_cause,
        }
        self._lines.append(_dumps(record).encode("ascii") + b"\n")

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
        self._middles: dict[tuple[Any, ...], bytes] = {}

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
            middle = self._middles[key] = _dumps(fields)[1:-1].encode("ascii")
        self._lines.append(
            b'{"time":"'
            + self._timestamp(self.clock.seconds()).encode("ascii")
            + b'",'
            + middle
            + b',"message":'
            + _dumps(text).encode("ascii")
            + b"}\n"
        )
