"""Configuration.spec.logging: parsing, the runtime level at reload, templates, reopen, --log-level."""

from __future__ import annotations

import io
import json
import os

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import LogLevel, LogLevelFilterPredicate, LogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import TestCase

from flexgw.config.logconf import compile_template
from flexgw.config.pipeline import load_config
from flexgw.plan import Listener
from flexgw.service.accesslog import AccessLog, RuntimeLog, TemplatedAccessLog
from flexgw.service.gateway import GatewayService
from flexgw.tap import Options, _install_log_level
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream
from tests.conftools import HEADER, write_conf
from tests.harness import free_port, simple_api
from tests.test_accesslog import _Exchange

LISTENER = Listener(scheme="http", host="0.0.0.0", port=8080, apis=())


def configuration(logging: str) -> str:
    """A Configuration document whose spec.logging is `logging` (indented four spaces)."""
    return f"{HEADER}kind: Configuration\nmetadata:\n  name: logs\nspec:\n  logging:\n{logging}"


def problems(case: TestCase, logging: str, environ: dict[str, str] | None = None) -> list[str]:
    """The problems of a configuration holding only `logging`, as printed."""
    root = write_conf(case, {"c.yaml": configuration(logging)})
    return [str(p) for p in load_config([root], environ or {}).plan.problems]


def settings(case: TestCase, logging: str, environ: dict[str, str] | None = None):
    """The plan's logging settings for a configuration holding only `logging`."""
    root = write_conf(case, {"c.yaml": configuration(logging)})
    return load_config([root], environ or {}).plan.logging


FILE_OUTPUT = """\
    outputs:
      - name: default
        type: file
        parameters:
          file: /tmp/flexgw-test.log
          format: template
          template: "[{date}][{level}][{kind}] {method} {path} {status}"
    runtimeLogs:
      logLevel: debug
      outputs: [default]
    accessLogs:
      outputs: [default]
"""


class ParseTests(TestCase):
    """spec.logging becomes plan.logging; bad values are errors at their line."""

    def test_flex_example(self) -> None:
        """The §5.1 shape: level, a file output with a template, referenced by both sections."""
        result = settings(self, FILE_OUTPUT)
        self.assertEqual(result.runtime_level, "debug")
        (output,) = result.access_outputs
        self.assertEqual((output.name, output.type, output.path), ("default", "file", "/tmp/flexgw-test.log"))
        self.assertEqual(output.template.names, ("date", "level", "kind", "method", "path", "status"))
        self.assertEqual(result.runtime_outputs, (output,))
        self.assertEqual(problems(self, FILE_OUTPUT), [])

    def test_path_and_file_joined(self) -> None:
        """Newer docs split the file into `path` (directory) and `file`."""
        result = settings(
            self,
            "    outputs:\n      - {name: o, type: file, parameters: {path: /var/log, file: a.log}}\n"
            "    accessLogs: {outputs: [o]}\n",
        )
        self.assertEqual(result.access_outputs[0].path, "/var/log/a.log")
        self.assertIsNone(result.access_outputs[0].template)

    def test_bad_level_error_at_its_line(self) -> None:
        """An unknown logLevel is an error located at its value."""
        found = problems(self, "    runtimeLogs:\n      logLevel: chatty\n")
        self.assertEqual(len(found), 1, found)
        self.assertIn("c.yaml:8:17: error:", found[0])
        self.assertIn("spec.logging.runtimeLogs.logLevel: 'chatty' is not a log level", found[0])

    def test_unknown_template_variable_error_with_position(self) -> None:
        """An unknown template variable is an error at the template's line naming its position."""
        found = problems(self, FILE_OUTPUT.replace("{status}", "{colour}"))
        self.assertEqual(len(found), 1, found)
        self.assertIn("c.yaml:13:21: error:", found[0])
        self.assertIn("unknown template variable {colour} at character 43", found[0])

    def test_undefined_output_reference(self) -> None:
        """Naming an output that is not defined is an error at the reference."""
        found = problems(self, "    accessLogs:\n      outputs: [nowhere]\n")
        self.assertEqual(len(found), 1, found)
        self.assertIn("c.yaml:8:", found[0])
        self.assertIn("'nowhere' is not the name of an output", found[0])

    def test_unsupported_output_type_warns(self) -> None:
        """A third-party output type is a warning and is not served; no 'logging' warning."""
        logging = (
            "    outputs:\n      - name: splunk\n        type: splunk\n        parameters: {host: h}\n"
            "    accessLogs: {outputs: [splunk]}\n"
        )
        found = problems(self, logging)
        self.assertEqual(len(found), 1, found)
        self.assertIn("c.yaml:9:15: warning:", found[0])
        self.assertIn("output type 'splunk' is not supported yet", found[0])
        self.assertEqual(settings(self, logging).access_outputs, ())

    def test_env_level_when_config_has_none(self) -> None:
        """FLEX_LOG_LEVEL (Flex's numbers or a name) applies unless logLevel is configured."""
        self.assertEqual(settings(self, "    accessLogs: {}\n", {"FLEX_LOG_LEVEL": "8"}).runtime_level, "debug")
        self.assertEqual(settings(self, "    accessLogs: {}\n", {"FLEX_LOG_LEVEL": "1"}).runtime_level, "error")
        self.assertEqual(settings(self, "    accessLogs: {}\n", {"FLEX_LOG_LEVEL": "warn"}).runtime_level, "warn")
        configured = "    runtimeLogs: {logLevel: error}\n"
        self.assertEqual(settings(self, configured, {"FLEX_LOG_LEVEL": "8"}).runtime_level, "error")
        root = write_conf(self, {"a.yaml": simple_api(8080, 9000)})
        self.assertEqual(load_config([root], {"FLEX_LOG_LEVEL": "2"}).plan.logging.runtime_level, "warn")


class TemplateTests(TestCase):
    """Templates render Flex's variables and the access-log fields."""

    def render(self, template: str) -> str:
        """One exchange logged at t=10.25 through `template`."""
        clock = Clock()
        clock.advance(10.25)
        stream = io.BytesIO()
        log = TemplatedAccessLog(clock, stream, compile_template(template))
        log.exchange_finished(_Exchange(b"/a/b", "10.0.0.1", "default/api", None), LISTENER)
        log.flush()
        return stream.getvalue().decode()

    def test_flex_variables(self) -> None:
        """{date} in Flex's format, {logger}, {level}, {kind}, and {message} the JSON line."""
        line = self.render("[{date}][{logger}][{level}][{kind}] {message}")
        prefix = "[01/01/1970-12:00:10AM][flexgw.access][info][accessLog] "
        self.assertTrue(line.startswith(prefix), line)
        self.assertEqual(json.loads(line[len(prefix):])["path"], "/a/b")

    def test_access_fields_and_aliases(self) -> None:
        """Fields by their JSON names; {latency} and {bytes} aliases; null renders as '-'."""
        line = self.render("{client} {method} {path} {status} {bytes} {latency} {error}")
        self.assertEqual(line, "10.0.0.1 GET /a/b 200 345 250.0 -\n")

    def test_unknown_variable_refused(self) -> None:
        """compile_template names the unknown variable and its position."""
        with self.assertRaises(ValueError) as caught:
            compile_template("ok {date} {nope}")
        self.assertIn("{nope} at character 11", str(caught.exception))


class ReopenTests(TestCase):
    """BufferedLog.reopen: after logrotate moved the file, new lines go to a new file."""

    def test_reopen_after_move(self) -> None:
        """Write, rename, reopen, write: the moved file has the old line, the new file the new."""
        path = os.path.abspath(self.mktemp())
        log = AccessLog.open(Clock(), path)
        self.addCleanup(log.close)
        log.exchange_finished(_Exchange(b"/first", "10.0.0.1", "a", None), LISTENER)
        log.flush()
        os.rename(path, path + ".1")
        log.exchange_finished(_Exchange(b"/second", "10.0.0.1", "a", None), LISTENER)
        log.reopen()  # what was buffered goes to the old file, as logrotate expects
        log.exchange_finished(_Exchange(b"/third", "10.0.0.1", "a", None), LISTENER)
        log.flush()
        with open(path + ".1", "rb") as old, open(path, "rb") as new:
            old_paths = [json.loads(line)["path"] for line in old]
            new_paths = [json.loads(line)["path"] for line in new]
        self.assertEqual(old_paths, ["/first", "/second"])
        self.assertEqual(new_paths, ["/third"])

    def test_stream_log_only_flushes(self) -> None:
        """A log over a given stream (no path) flushes on reopen and keeps its stream."""
        stream = io.BytesIO()
        log = AccessLog(Clock(), stream)
        log.exchange_finished(_Exchange(b"/x", "10.0.0.1", "a", None), LISTENER)
        log.reopen()
        self.assertIs(log.stream, stream)
        self.assertEqual(json.loads(stream.getvalue())["path"], "/x")


class GatewayLoggingTests(TestCase):
    """GatewayService applies plan.logging at every reload."""

    def gateway(self, files: dict[str, str], fixed: bool = False) -> tuple[GatewayService, str]:
        """A started gateway on `files` with a log filter at info; returns (service, conf dir)."""
        root = write_conf(self, files)
        self.default_stream = io.BytesIO()
        self.predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
        service = GatewayService(
            reactor,
            [root],
            {},
            access_log=AccessLog(reactor, self.default_stream),
            log_filter=self.predicate,
            log_level_fixed=fixed,
        )
        service.startService()
        self.addCleanup(service.stopService)
        return service, root

    def test_level_applied_at_reload(self) -> None:
        """The filter follows logLevel on each reload, back to info when it is removed."""
        service, root = self.gateway({"c.yaml": configuration("    runtimeLogs: {logLevel: error}\n")})
        self.assertEqual(self.predicate.logLevelForNamespace(""), LogLevel.error)
        write_conf_file(root, "c.yaml", configuration("    runtimeLogs: {logLevel: debug}\n"))
        service.reload()
        self.assertEqual(self.predicate.logLevelForNamespace(""), LogLevel.debug)
        os.remove(os.path.join(root, "c.yaml"))
        service.reload()
        self.assertEqual(self.predicate.logLevelForNamespace(""), LogLevel.info)

    def test_log_level_option_wins(self) -> None:
        """With --log-level given (fixed), the configuration does not change the filter."""
        self.gateway({"c.yaml": configuration("    runtimeLogs: {logLevel: error}\n")}, fixed=True)
        self.assertEqual(self.predicate.logLevelForNamespace(""), LogLevel.info)

    async def test_access_output_file_with_template(self) -> None:
        """Requests are written to the configured file through its template, not the default."""
        upstream = RecordingUpstream(reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()
        path = os.path.abspath(self.mktemp())
        logging = FILE_OUTPUT.replace("/tmp/flexgw-test.log", path)
        service, root = self.gateway({"a.yaml": simple_api(port, upstream.address[1]), "c.yaml": configuration(logging)})
        response = await client.request(
            reactor, "127.0.0.1", port, b"GET /items HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        self.assertEqual(response.status, 200)
        service.log_outputs[next(iter(service.log_outputs))].flush()
        line = read_text(path)
        self.assertRegex(line, r"^\[\d\d/\d\d/\d{4}-\d\d:\d\d:\d\d[AP]M\]\[info\]\[accessLog\] GET /items 200\n$")
        service.access_log.flush()
        self.assertEqual(self.default_stream.getvalue(), b"")
        # Without accessLogs the default log is used again, and the file is closed.
        write_conf_file(root, "c.yaml", configuration("    runtimeLogs: {logLevel: info}\n"))
        service.reload()
        self.assertEqual(service.log_outputs, {})
        await client.request(reactor, "127.0.0.1", port, b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
        service.access_log.flush()
        self.assertEqual(json.loads(self.default_stream.getvalue())["path"], "/again")

    def test_reopen_logs(self) -> None:
        """reopen_logs reopens configured output files (the SIGUSR1 handler calls it)."""
        path = os.path.abspath(self.mktemp())
        logging = f"    outputs:\n      - {{name: f, type: file, parameters: {{file: {path}}}}}\n    accessLogs: {{outputs: [f]}}\n"
        service, _ = self.gateway({"c.yaml": configuration(logging)})
        (log,) = service.log_outputs.values()
        os.rename(path, path + ".1")
        service.reopen_logs()
        self.assertTrue(os.path.exists(path))
        self.assertEqual(log.path, path)


def read_text(path: str) -> str:
    """A file's text."""
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def write_conf_file(root: str, name: str, text: str) -> None:
    """Replace one configuration file."""
    with open(os.path.join(root, name), "w", encoding="utf-8") as handle:
        handle.write(text)


class LogLevelOptionTests(TestCase):
    """`--log-level` still works, and is told apart from the default."""

    def test_option_parsed(self) -> None:
        """Not given: None (the configuration decides); given: kept; invalid: usage error."""
        conf = self.mktemp()
        os.makedirs(conf)
        options = Options()
        options.parseOptions(["--conf", conf])
        self.assertIsNone(options["log-level"])
        options = Options()
        options.parseOptions(["--conf", conf, "--log-level", "warn"])
        self.assertEqual(options["log-level"], "warn")
        with self.assertRaises(UsageError):
            Options().parseOptions(["--conf", conf, "--log-level", "loud"])

    def test_install_filters_below_level(self) -> None:
        """_install_log_level wraps every observer: events below the level are dropped."""
        publisher = LogPublisher()
        seen: list[str] = []
        publisher.addObserver(lambda event: seen.append(event["log_format"]))
        predicate = _install_log_level("warn", publisher)
        for level, text in ((LogLevel.info, "i"), (LogLevel.warn, "w"), (LogLevel.error, "e")):
            publisher({"log_level": level, "log_format": text, "log_namespace": "t"})
        self.assertEqual(seen, ["w", "e"])
        predicate.setLogLevelForNamespace("", LogLevel.debug)  # what a reload does
        publisher({"log_level": LogLevel.debug, "log_format": "d", "log_namespace": "t"})
        self.assertEqual(seen, ["w", "e", "d"])


class RuntimeOutputTests(TestCase):
    """runtimeLogs file outputs: runtime events written there, filtered by the level."""

    def test_runtime_log_json_and_template(self) -> None:
        """JSON lines by default; a template gets kind runtimeLog, the level and the namespace."""
        clock = Clock()
        stream = io.BytesIO()
        log = RuntimeLog(clock, stream)
        log({"log_level": LogLevel.warn, "log_format": "hi {who}", "who": "x", "log_namespace": "n", "log_time": 1.5})
        log.flush()
        self.assertEqual(
            json.loads(stream.getvalue()),
            {"time": "1970-01-01T00:00:01.500Z", "level": "warn", "logger": "n", "message": "hi x"},
        )
        stream = io.BytesIO()
        log = RuntimeLog(clock, stream, compile_template("[{date}][{logger}][{level}][{kind}] {message} {path}"))
        log({"log_level": LogLevel.error, "log_format": "boom", "log_namespace": "flexgw", "log_time": 0.0})
        log.flush()
        self.assertEqual(stream.getvalue(), b"[01/01/1970-12:00:00AM][flexgw][error][runtimeLog] boom -\n")

    def test_gateway_observes_into_file_at_level(self) -> None:
        """The gateway adds a filtered observer for a file output and removes it when dropped."""
        path = os.path.abspath(self.mktemp())
        logging = (
            f"    outputs:\n      - {{name: f, type: file, parameters: {{file: {path}}}}}\n"
            "    runtimeLogs: {logLevel: warn, outputs: [f]}\n"
        )
        root = write_conf(self, {"c.yaml": configuration(logging)})
        publisher = LogPublisher()
        predicate = LogLevelFilterPredicate()
        service = GatewayService(
            reactor, [root], {}, log_filter=predicate, log_publisher=publisher
        )
        service.startService()
        self.addCleanup(service.stopService)
        for level, text in ((LogLevel.info, "quiet"), (LogLevel.warn, "loud")):
            publisher({"log_level": level, "log_format": text, "log_namespace": "t"})
        ((log, _),) = service.runtime_outputs.values()
        log.flush()
        self.assertEqual([json.loads(line)["message"] for line in read_text(path).splitlines()], ["loud"])
        write_conf_file(root, "c.yaml", configuration("    runtimeLogs: {logLevel: warn}\n"))
        service.reload()
        self.assertEqual(service.runtime_outputs, {})
        publisher({"log_level": LogLevel.error, "log_format": "gone", "log_namespace": "t"})
        self.assertNotIn("gone", read_text(path))
