"""The access log (an observer of finished exchanges): one JSON line per request, buffered and
flushed on a short period; and the runtime and message logs written the same way."""

from __future__ import annotations

import json
import sys
import time
from typing import IO, TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import formatEvent
from zope.interface import implementer

from flexgw.config.logconf import FLEX_VARIABLES
from flexgw.http.errors import GatewayError
from flexgw.ingress.contract import IExchangeObserver
from flexgw.plan import Listener, LogOutput, Template

if TYPE_CHECKING:
    from collections.abc import Callable

    from flexgw.ingress.exchange import ProxyExchange
    from flexgw.ingress.peer import Peer

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
        self.path: str | None = None  # the file `open` appended to; None: not reopenable
        self._date_second = -1
        self._date_text = ""

    @classmethod
    def open(cls, clock: IReactorTime, target: str, *args: Any) -> Any:
        """A log writing to `target`: a file path (appended), or "-" for stdout."""
        stream: IO[bytes] = sys.stdout.buffer if target == "-" else open(target, "ab")  # noqa: SIM115
        log = cls(clock, stream, *args)
        if target != "-":
            log.path = target
        return log

    def reopen(self) -> None:
        """Write what is buffered, then reopen the file by its path (after logrotate moved it).

        A log not opened from a path (stdout, a stream given to the constructor) is only flushed.
        If the file cannot be opened, the old stream is kept (and the error raised).
        """
        self.flush()
        if self.path is None:
            return
        stream = open(self.path, "ab")  # noqa: SIM115
        old, self.stream = self.stream, stream
        old.close()

    def close(self) -> None:
        """Stop, and close the file if this log opened one."""
        self.stop()
        if self.path is not None:
            self.stream.close()

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

    def _flex_date(self, now: float) -> str:
        """Flex's template {date}, e.g. 17/11/2022-09:48:27AM (UTC), formatted once a second."""
        second = int(now)
        if second != self._date_second:
            self._date_second = second
            self._date_text = time.strftime("%d/%m/%Y-%I:%M:%S%p", time.gmtime(second))
        return self._date_text

    def _timestamp(self, now: float) -> str:
        second = int(now)
        return f"{self._second_of(second)}.{_THREE_DIGITS[int((now - second) * 1000)]}Z"

    def _second_of(self, second: int) -> str:
        """A whole second's text (UTC, ISO 8601 without the fraction), made once per second."""
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self._second_text



def _text(value: str) -> str:
    """A JSON string literal; plain printable ASCII without quote or backslash is used as is."""
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'
    return _dumps(value)


_UNSET = object()  # (no batch value seen yet)
#: "000" to "999": a table lookup costs less than formatting an integer with a format spec.
_THREE_DIGITS = tuple(f"{i:03d}" for i in range(1000))


def _ms(seconds: float) -> str:
    """Milliseconds with three decimals (whole microseconds), as JSON: "250.000", "1.234".

    An integer and a table lookup: float `round` and `repr` cost several times more."""
    micros = int(seconds * 1_000_000)
    if micros < 0:
        return repr(round(seconds * 1000, 3))  # (a clock that went back)
    return f"{micros // 1000}.{_THREE_DIGITS[micros % 1000]}"


@implementer(IExchangeObserver)
class AccessLog(BufferedLog):
    """The access log: one JSON line per request.

    A finished exchange costs one tuple of its fields on the request path; the lines are
    formatted when the log is flushed (every `flush_interval`, on reopen and stop), a batch at a
    time: names from the configuration and the second's text are looked up once per batch run
    of equal values, and the request's own strings are checked together, once per line.
    """

    def __init__(self, clock: IReactorTime, stream: IO[bytes], flush_interval: float = 0.5) -> None:
        super().__init__(clock, stream, flush_interval)
        self._known: dict[Any, str] = {}
        self._pending: list[tuple[Any, ...]] = []  # finished exchanges' fields, not yet lines

    def exchange_finished(self, exchange: ProxyExchange, listener: Listener) -> None:
        """Record a proxied (or gateway-answered) request: its fields now, its line at flush."""
        head = exchange.head
        self._pending.append(
            (
                self.clock.seconds(),
                exchange.front.peer.address,
                listener,
                head.method,
                head.path,
                head.version,
                exchange.api_key,
                exchange.route,
                exchange.destination,
                exchange.response_status,
                exchange.bytes_in,
                exchange.bytes_out,
                exchange.started,
                exchange.upstream_elapsed,
                exchange.error_cause,
                exchange.attempts,
                exchange.trace,
            )
        )

    def flush(self) -> None:
        """Format the pending lines, then write what is buffered."""
        if self._pending:
            self._format_pending()
        super().flush()

    def _format_pending(self) -> None:
        """Turn the pending exchanges into lines, in order (one bytes object per batch)."""
        pending, self._pending = self._pending, []
        self._lines.append("".join(self._format(pending)).encode("ascii"))

    def _format(self, pending: list[tuple[Any, ...]]) -> list[str]:
        """The JSON lines (newline included) of `pending`'s exchanges.

        The line is assembled from pieces rather than by encoding a dict: names that come from
        the configuration are JSON-encoded once and remembered; the request's own strings are
        used as they are when together they are printable ASCII without quote or backslash,
        else each is JSON-encoded. The output is the same JSON.
        """
        lines: list[str] = []
        append = lines.append
        name = self._name
        last_listener: Any = None
        last_api: Any = _UNSET
        last_route: Any = _UNSET
        last_destination: Any = _UNSET
        listener_json = api_json = route_json = upstream_json = ""
        second = -1
        second_text = ""
        for (
            now,
            client,
            listener,
            method_bytes,
            path,
            version,
            api,
            route,
            destination,
            status,
            bytes_in,
            bytes_out,
            started,
            upstream_elapsed,
            error,
            attempts,
            trace,
        ) in pending:
            if listener is not last_listener:
                last_listener = listener
                listener_json = name(f"{listener.host}:{listener.port}")
            if api is not last_api:
                last_api = api
                api_json = name(api) if api is not None else "null"
            if route is not last_route:
                last_route = route
                route_json = name(route.name) if route is not None else "null"
            if destination is not last_destination:
                last_destination = destination
                upstream_json = (
                    name(destination.upstream.key) if destination is not None else "null"
                )
            whole = int(now)
            if whole != second:
                second = whole
                second_text = self._second_of(whole)
            tail = "" if attempts == 1 else f',"x-flexgw-attempts":{attempts}'  # (retried)
            if trace is not None:
                tail += ',"trace_id":"%s","span_id":"%s"' % trace.log_ids()  # noqa: UP031
            method = method_bytes.decode("latin-1")
            plain = client + method + path if error is None else client + method + path + error
            if plain.isascii() and plain.isprintable() and '"' not in plain and "\\" not in plain:
                client_json = f'"{client}"'
                method_json = f'"{method}"'
                path_json = f'"{path}"'
                error_json = "null" if error is None else f'"{error}"'
            else:
                client_json = _text(client)
                method_json = _text(method)
                path_json = _text(path)
                error_json = "null" if error is None else _text(error)
            append(
                f'{{"time":"{second_text}.{_THREE_DIGITS[int((now - whole) * 1000)]}Z"'
                f',"client":{client_json}'
                f',"listener":{listener_json},"method":{method_json}'
                f',"path":{path_json},"version":"{version.decode("ascii")}"'
                f',"api":{api_json},"route":{route_json},"upstream":{upstream_json}'
                f',"status":{status or "null"},"bytes_in":{bytes_in},"bytes_out":{bytes_out}'
                f',"duration_ms":{_ms(now - started)}'
                f',"upstream_ms":{_ms(upstream_elapsed) if upstream_elapsed is not None else "null"}'
                f',"error":{error_json}{tail}}}\n'
            )
        return lines

    def _name(self, name: str) -> str:
        """A configuration name as JSON, encoded once."""
        encoded = self._known.get(name)
        if encoded is None:
            if len(self._known) > 10_000:  # names come from the configuration: a bound anyway
                self._known.clear()
            encoded = self._known[name] = _dumps(name)
        return encoded

    def request_refused(self, peer: Peer, error: GatewayError, listener: Listener) -> None:
        """Record a request refused before its head was complete or valid."""
        if self._pending:
            self._format_pending()  # (the lines stay in order)
        record = {
            "time": self._timestamp(self.clock.seconds()),
            "client": peer.address,
            "listener": f"{listener.host}:{listener.port}",
            "method": None,
            "path": None,
            "status": error.status,
            "error": error.cause,
        }
        self._lines.append(_dumps(record).encode("ascii") + b"\n")

    def tunnel_opened(self, exchange: ProxyExchange, listener: Listener) -> None:
        """A tunnel's line is written when it closes."""

    def tunnel_closed(self, exchange: ProxyExchange, listener: Listener) -> None:
        """A tunnel ended: its line, with the tunnel's byte counts."""
        self.exchange_finished(exchange, listener)


class TemplatedAccessLog(AccessLog):
    """The access log rendered through a `template` (Configuration.spec.logging outputs).

    The JSON line is built as by AccessLog, then its fields fill the template; this costs more
    than JSON lines and is only used when a template is configured.
    """

    def __init__(
        self,
        clock: IReactorTime,
        stream: IO[bytes],
        template: Template,
        flush_interval: float = 0.5,
    ) -> None:
        super().__init__(clock, stream, flush_interval)
        self.template = template
        self._fields = bool(set(template.names) - FLEX_VARIABLES)

    def _format_pending(self) -> None:
        """The pending exchanges' JSON lines, each rendered through the template."""
        pending, self._pending = self._pending, []
        append = self._lines.append
        for record, line in zip(pending, self._format(pending), strict=True):
            append(self._render(line[:-1], record[0]))

    def request_refused(
        self, peer: Peer, error: GatewayError, listener: Listener
    ) -> None:
        """Record a refused request, rendered through the template."""
        super().request_refused(peer, error, listener)
        self._lines[-1] = self._render(self._lines[-1][:-1].decode("ascii"), self.clock.seconds())

    def _render(self, message: str, now: float) -> bytes:
        """A JSON line (`message`, logged at `now`) through the template."""
        record = json.loads(message) if self._fields else {}
        fixed = {
            "date": self._flex_date(now),
            "logger": "flexgw.access",
            "level": "info",
            "kind": "accessLog",
            "message": message,
        }
        return _render(self.template, fixed, record)


def _render(template: Template, fixed: dict[str, str], record: dict[str, Any]) -> bytes:
    """One line: `template` filled from `fixed` (Flex's variables), then `record` ('-' if absent)."""
    literals = template.literals
    parts = [literals[0]]
    for name, literal in zip(template.names, literals[1:], strict=True):
        value = fixed[name] if name in fixed else record.get(name)
        parts.append("-" if value is None else str(value))
        parts.append(literal)
    parts.append("\n")
    return "".join(parts).encode("utf-8", "backslashreplace")


class RuntimeLog(BufferedLog):
    """Runtime log events (a Twisted log observer) to a configured output: JSON lines, or a
    template with kind `runtimeLog` (access-log fields render as '-')."""

    def __init__(
        self,
        clock: IReactorTime,
        stream: IO[bytes],
        template: Template | None = None,
        flush_interval: float = 0.5,
    ) -> None:
        super().__init__(clock, stream, flush_interval)
        self.template = template

    def __call__(self, event: dict[str, Any]) -> None:
        """Record one Twisted log event."""
        level = event.get("log_level")
        level_name = level.name if level is not None else "info"
        message = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            message += "\n" + failure.getTraceback()
        namespace = event.get("log_namespace") or "-"
        now = event.get("log_time") or self.clock.seconds()
        if self.template is None:
            record = {
                "time": self._timestamp(now),
                "level": level_name,
                "logger": namespace,
                "message": message,
            }
            self._lines.append(_dumps(record).encode("ascii") + b"\n")
            return
        fixed = {
            "date": self._flex_date(now),
            "logger": namespace,
            "level": level_name,
            "kind": "runtimeLog",
            "message": message,
        }
        self._lines.append(_render(self.template, fixed, {}))


def open_runtime_output(clock: IReactorTime, output: LogOutput) -> RuntimeLog:
    """A runtime log for one configured file output (opened for appending)."""
    return RuntimeLog.open(clock, output.path or "-", output.template)  # type: ignore[no-any-return]


@implementer(IExchangeObserver)
class TeeLog:
    """Several access logs fed the same requests (more than one configured output)."""

    def __init__(self, logs: list[AccessLog]) -> None:
        self.logs = logs

    def exchange_finished(self, exchange: ProxyExchange, listener: Listener) -> None:
        """Record a request in every log."""
        for log in self.logs:
            log.exchange_finished(exchange, listener)

    def tunnel_opened(self, exchange: ProxyExchange, listener: Listener) -> None:
        """A tunnel's line is written when it closes."""

    tunnel_closed = exchange_finished

    def request_refused(
        self, peer: Peer, error: GatewayError, listener: Listener
    ) -> None:
        """Record a refused request in every log."""
        for log in self.logs:
            log.request_refused(peer, error, listener)


def open_output(clock: IReactorTime, output: LogOutput) -> AccessLog:
    """An access log for one configured output (a file is opened for appending)."""
    target = output.path if output.type == "file" and output.path is not None else "-"
    if output.template is not None:
        return TemplatedAccessLog.open(clock, target, output.template)  # type: ignore[no-any-return]
    return AccessLog.open(clock, target)  # type: ignore[no-any-return]


class MessageLog(BufferedLog):
    """Where message-logging-flex lines go when the gateway runs: JSON lines on the runtime
    output, as cheap as access log lines (the Twisted log system costs several times more)."""

    def __init__(self, clock: IReactorTime, stream: IO[bytes], flush_interval: float = 0.5) -> None:
        super().__init__(clock, stream, flush_interval)
        self._writers: dict[tuple[Any, ...], Callable[[str], None]] = {}

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
        """Record one message-logging item (through the item's `writer`, made on first use)."""
        key = (level, category, binding, api, item, section)
        write = self._writers.get(key)
        if write is None:
            write = self._writers[key] = self.writer(*key)
        write(text)

    def writer(
        self,
        level: str,
        category: str | None,
        binding: str,
        api: str | None,
        item: str,
        section: str,
    ) -> Callable[[str], None]:
        """What records the lines of one item in one section: a callable taking the message.

        Everything but the time and the message is the same for every line of an item: that
        part is encoded once, here (message-logging-flex asks for its items' writers when it is
        built, so a line costs no lookup of them either).
        """
        fields = {
            "level": level,
            "logger": "flexgw.messagelogging",
            "category": category,
            "binding": binding,
            "api": api,
            "item": item,
            "section": section,
        }
        tail = 'Z",' + _dumps(fields)[1:-1] + ',"message":"'
        seconds = self.clock.seconds

        def write(text: str) -> None:
            now = seconds()
            second = int(now)
            if second != self._second:
                self._timestamp(now)  # a new second: its text is made once
            if not (text.isascii() and text.isprintable() and '"' not in text and "\\" not in text):
                text = _dumps(text)[1:-1]  # the unusual case: escapes needed
            self._lines.append(
                f'{{"time":"{self._second_text}.{_THREE_DIGITS[int((now - second) * 1000)]}'
                f'{tail}{text}"}}\n'.encode("ascii")
            )

        return write
