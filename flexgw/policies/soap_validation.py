"""`soap-validation`: validate SOAP 1.1/1.2 requests against a WSDL's schema; answer SOAP faults.

Flex (docs `policies-included-soap-schema-validation.adoc`, 1.10+): keys `wsdlUrl` (where the
WSDL is), `encoding` (default `UTF-8`), `serviceName`, `servicePort` (the service and port of
the WSDL whose binding requests are checked against). The body is buffered (1 MiB limit, 413
over it); a request without a body is a fault; `GET ...?wsdl` is answered with the WSDL itself;
other methods get a "Method not allowed" fault. Faults are SOAP standard responses whose
version comes from the port's binding: SOAP 1.1 `soap:Client` faults with HTTP 500, SOAP 1.2
`env:Sender` faults with HTTP 400 (Flex: "400 for a client error or 500 for a server error").

How: at load time the WSDL is read with lxml (libxml2) with entity substitution, DTD loading
and network access off, the port's binding is found with its SOAP version, style and
operations, and the `<types>` schemas are compiled once into one libxml2 `XMLSchema` (schema
imports resolve only to the WSDL's own embedded schemas or to files below the WSDL's
directory). Per request the envelope is parsed the same hardened way (a DOCTYPE is refused
outright: SOAP forbids DTDs), its namespace
must be the binding's SOAP version, `Body` must hold the input element of one of the binding's
operations (document style) and that element is validated against the schema.

Deliberate differences from Flex:
- `wsdlUrl` must be a local file (`file://` URL or a path): flexgw does not fetch a WSDL over
  the network while loading a config (a slow or hostile host would stall or poison it).
- `rpc`-style bindings are checked for the operation element only (its parts are not typed
  against the schema); document/literal, the common case, is validated in full.
- The fault string names what failed (`Body element {ns}Name is not an input of port P`,
  libxml2's reason and path with the quoted request values taken out).
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from flexgw.policies.base import (
    BuildContext,
    IPolicy,
    IPolicyKind,
    LocalResponse,
    PolicyConfigError,
    PolicyContext,
)
from flexgw.policies.registry import register

NAME = "soap-validation"
_log = Logger(namespace="flexgw.policies.soap_validation")

WSDL = "http://schemas.xmlsoap.org/wsdl/"
WSDL_SOAP11 = "http://schemas.xmlsoap.org/wsdl/soap/"
WSDL_SOAP12 = "http://schemas.xmlsoap.org/wsdl/soap12/"
XSD = "http://www.w3.org/2001/XMLSchema"
ENVELOPE = {"1.1": "http://schemas.xmlsoap.org/soap/envelope/",
            "1.2": "http://www.w3.org/2003/05/soap-envelope"}

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "wsdlUrl": {"type": "string", "minLength": 1},
        "encoding": {"type": "string", "default": "UTF-8"},
        "serviceName": {"type": "string", "minLength": 1},
        "servicePort": {"type": "string", "minLength": 1},
    },
    "required": ["wsdlUrl", "serviceName", "servicePort"],
    "additionalProperties": False,
}


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


@attrs.frozen
class Port:
    """What requests to one WSDL port are checked against."""

    version: str  # "1.1" or "1.2"
    style: str  # "document" or "rpc"
    inputs: frozenset[str]  # document style: the operations' input elements ({ns}name)
    operations: frozenset[str]  # operation names (rpc style: the body element's local name)
    schema: Any  # lxml XMLSchema of the WSDL's types (None when it has none)
    wsdl: bytes  # the WSDL as read, served to `?wsdl`


def _parser(resolver: Any = None) -> Any:
    """libxml2 with every external access off: no entity substitution, no DTD loading, no
    network; `resolver` (the WSDL's sandbox) is the only way to another file. (lxml is imported
    on first use: a gateway without this policy does not pay its import time.)"""
    from lxml import etree

    parser = etree.XMLParser(
        resolve_entities=False, load_dtd=False, no_network=True, huge_tree=False, dtd_validation=False
    )
    if resolver is not None:
        parser.resolvers.add(resolver)
    return parser


def _sandbox(root: str, embedded: dict[str, bytes]) -> Any:
    """A resolver for schema imports: the WSDL's own embedded schemas by location, files only
    below the WSDL's directory; anything else is refused."""
    from lxml import etree

    top = os.path.realpath(root)

    class Sandbox(etree.Resolver):
        def resolve(self, url: str, pubid: str | None, context: Any) -> Any:
            if url in embedded:
                return self.resolve_string(embedded[url], context)
            path = os.path.realpath(unquote(urlsplit(url).path) if url.startswith("file:") else url)
            if os.path.commonpath([path, top]) != top or not os.path.isfile(path):
                raise etree.XMLSchemaParseError(f"schema import outside the WSDL's directory: {url}")
            return self.resolve_filename(path, context)

    return Sandbox()


def load_port(path: str, encoding: str, service: str, port: str) -> Port:
    """Read the WSDL and compile what the port needs (PolicyConfigError when it cannot)."""
    from lxml import etree

    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        root = etree.fromstring(raw, _parser(), base_url=path)
    except OSError as exc:
        raise PolicyConfigError(f"cannot read the WSDL: {exc.strerror or exc}", "wsdlUrl") from None
    except etree.XMLSyntaxError as exc:
        raise PolicyConfigError(f"the WSDL is not well-formed XML: {exc}", "wsdlUrl") from None
    if root.tag != f"{{{WSDL}}}definitions":
        raise PolicyConfigError("not a WSDL 1.1 document (no wsdl:definitions)", "wsdlUrl")

    def qname(text: str, where: Any) -> str:
        prefix, sep, local = text.rpartition(":")
        ns = where.nsmap.get(prefix if sep else None, "")
        return f"{{{ns}}}{local}" if ns else local

    target = root.get("targetNamespace", "")
    messages = {}
    for message in root.iterfind(f"{{{WSDL}}}message"):
        parts = [part for part in message.iterfind(f"{{{WSDL}}}part") if part.get("element")]
        messages[f"{{{target}}}{message.get('name')}"] = [qname(p.get("element"), p) for p in parts]
    port_types = {}
    for port_type in root.iterfind(f"{{{WSDL}}}portType"):
        operations = {}
        for operation in port_type.iterfind(f"{{{WSDL}}}operation"):
            given = operation.find(f"{{{WSDL}}}input")
            operations[operation.get("name")] = (
                qname(given.get("message", ""), given) if given is not None else None
            )
        port_types[f"{{{target}}}{port_type.get('name')}"] = operations
    services = {s.get("name"): s for s in root.iterfind(f"{{{WSDL}}}service")}
    if service not in services:
        raise PolicyConfigError(f"no service {service!r} in the WSDL (it has {sorted(services)})", "serviceName")
    ports = {p.get("name"): p for p in services[service].iterfind(f"{{{WSDL}}}port")}
    if port not in ports:
        raise PolicyConfigError(f"no port {port!r} in service {service!r} (it has {sorted(ports)})", "servicePort")
    binding_name = qname(ports[port].get("binding", ""), ports[port])
    binding = next(
        (b for b in root.iterfind(f"{{{WSDL}}}binding") if f"{{{target}}}{b.get('name')}" == binding_name),
        None,
    )
    if binding is None:
        raise PolicyConfigError(f"port {port!r} names binding {binding_name} which the WSDL lacks", "servicePort")
    version = style = None
    for ns, soap_version in ((WSDL_SOAP11, "1.1"), (WSDL_SOAP12, "1.2")):
        marker = binding.find(f"{{{ns}}}binding")
        if marker is not None:
            version, style = soap_version, marker.get("style", "document")
    if version is None:
        raise PolicyConfigError(f"binding {binding_name} of port {port!r} is not a SOAP binding", "servicePort")
    operations = port_types.get(qname(binding.get("type", ""), binding), {})
    bound = [op.get("name") for op in binding.iterfind(f"{{{WSDL}}}operation")]
    inputs = set()
    for name in bound:
        message = operations.get(name)
        inputs.update(messages.get(message, []) if message else [])
    schema = _compile_types(root, os.path.dirname(os.path.abspath(path)))
    del encoding  # the WSDL declares its own encoding; Flex's key is accepted
    return Port(version, style or "document", frozenset(inputs), frozenset(bound), schema, raw)


def _compile_types(root: Any, directory: str) -> Any:
    """The `<types>` schemas as one libxml2 XMLSchema (None when there are none)."""
    from lxml import etree

    schemas = list(root.iterfind(f"{{{WSDL}}}types/{{{XSD}}}schema"))
    if not schemas:
        return None
    # Each embedded schema as its own document (its inherited namespace declarations kept),
    # reachable by `urn:flexgw:wsdl-schema:N`; imports by namespace alone are pointed there.
    locations = {s.get("targetNamespace", ""): f"urn:flexgw:wsdl-schema:{n}" for n, s in enumerate(schemas)}
    embedded = {}
    for n, schema in enumerate(schemas):
        copy = etree.fromstring(etree.tostring(schema), _parser())
        for imported in copy.iterfind(f"{{{XSD}}}import"):
            ns = imported.get("namespace", "")
            if not imported.get("schemaLocation") and ns in locations:
                imported.set("schemaLocation", locations[ns])
        embedded[f"urn:flexgw:wsdl-schema:{n}"] = etree.tostring(copy)
    wrapper = (
        f'<xs:schema xmlns:xs="{XSD}">'
        + "".join(
            f'<xs:import namespace="{escape(ns, {chr(34): "&quot;"})}" schemaLocation="{loc}"/>'
            for ns, loc in locations.items()
        )
        + "</xs:schema>"
    )
    parser = _parser(_sandbox(directory, embedded))
    try:
        document = etree.fromstring(
            embedded["urn:flexgw:wsdl-schema:0"] if len(schemas) == 1 else wrapper.encode(),
            parser,
            base_url=os.path.join(directory, "wsdl-types.xsd"),
        )
        return etree.XMLSchema(document)
    except (etree.XMLSchemaParseError, etree.XMLSyntaxError) as exc:
        raise PolicyConfigError(f"the WSDL's types do not compile: {exc}"[:500], "wsdlUrl") from None


def wsdl_path(url: str) -> str:
    """The local file a `wsdlUrl` names (file:// URL or path); PolicyConfigError otherwise."""
    parts = urlsplit(url)
    if parts.scheme in ("", "file") and not (parts.scheme == "" and "://" in url):
        return unquote(parts.path) if parts.scheme == "file" else url
    raise PolicyConfigError(
        "only a local WSDL (file:// URL or path) is read; download it next to the config", "wsdlUrl"
    )


def fault(version: str, reason: str, status: int | None = None) -> LocalResponse:
    """A SOAP client fault in the binding's version (1.1: HTTP 500, 1.2: HTTP 400)."""
    text = escape(reason)
    if version == "1.2":
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f'<env:Envelope xmlns:env="{ENVELOPE["1.2"]}"><env:Body><env:Fault>'
            "<env:Code><env:Value>env:Sender</env:Value></env:Code>"
            f'<env:Reason><env:Text xml:lang="en">{text}</env:Text></env:Reason>'
            "</env:Fault></env:Body></env:Envelope>"
        )
        content_type = b"application/soap+xml; charset=UTF-8"
        default = 400
    else:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f'<soap:Envelope xmlns:soap="{ENVELOPE["1.1"]}"><soap:Body><soap:Fault>'
            f"<faultcode>soap:Client</faultcode><faultstring>{text}</faultstring>"
            "</soap:Fault></soap:Body></soap:Envelope>"
        )
        content_type = b"text/xml; charset=UTF-8"
        default = 500
    return LocalResponse(status or default, ((b"Content-Type", content_type),), body.encode("utf-8"))


#: `'x' is not a valid value` -> `the value is not a valid value`: faults never echo content.
_QUOTED_VALUE = re.compile(r"'[^']*' is")


class Refused(Exception):
    """The request is not a valid SOAP message for the port."""


@implementer(IPolicy)
class SoapValidationPolicy:
    """One binding's port: validates each SOAP request."""

    needs_body = True
    response_phase = False

    def __init__(self, port: Port, name: str, binding: str) -> None:
        from lxml import etree

        self.etree = etree
        self.parser = _parser()  # one hardened parser for every request of this binding
        self.port = port
        self.name = name
        self.binding = binding

    def check(self, body: bytes | None) -> None:
        """Raise Refused with the reason when `body` is not a valid request for the port."""
        port = self.port
        if not body:
            raise Refused("Missing SOAP request body")
        if b"<!doctype" in body[:4096].lower() or b"<!DOCTYPE" in body:
            raise Refused("A SOAP message must not contain a document type declaration")
        try:
            root = self.etree.fromstring(body, self.parser)
        except self.etree.XMLSyntaxError:
            raise Refused("The request is not well-formed XML") from None
        envelope = ENVELOPE[port.version]
        if root.tag != f"{{{envelope}}}Envelope":
            raise Refused(f"Not a SOAP {port.version} Envelope")
        soap_body = root.find(f"{{{envelope}}}Body")
        if soap_body is None:
            raise Refused("The Envelope has no Body")
        children = list(soap_body)
        if not children:
            raise Refused("The Body has no operation element")
        for child in children:
            if port.style == "rpc":
                if _local(child.tag) not in port.operations:
                    raise Refused(f"Body element {child.tag} is not an operation of port {self.name}")
                continue
            if child.tag not in port.inputs:
                raise Refused(f"Body element {child.tag} is not an input of port {self.name}")
            if port.schema is not None and not port.schema.validate(child):
                error = port.schema.error_log.last_error
                # libxml2's message without the values it quotes from the request
                reason = _QUOTED_VALUE.sub("the value is", error.message if error else "invalid")
                path = error.path if error else ""
                raise Refused(f"Schema validation failed at {path}: {reason}"[:300])

    def on_request(self, ctx: PolicyContext) -> LocalResponse | None:
        """A fault for an invalid request; the WSDL for `?wsdl`; None to go on."""
        head = ctx.head
        if head.method == b"GET" and head.query.lower() in (b"?wsdl", b"?wsdl="):
            return LocalResponse(200, ((b"Content-Type", b"text/xml; charset=UTF-8"),), self.port.wsdl)
        if head.method != b"POST":
            return fault(self.port.version, "Method not allowed", 405)
        try:
            self.check(ctx.body)
        except Refused as exc:
            _log.info("{binding}: SOAP request refused: {reason}", binding=self.binding, reason=str(exc))
            return fault(self.port.version, str(exc))
        return None

    def on_response(self, ctx: PolicyContext) -> None:
        """Responses pass unchanged."""


@implementer(IPolicyKind)
class SoapValidationKind:
    """The `soap-validation` policy kind."""

    name = NAME
    schema = SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> SoapValidationPolicy:
        """Read the WSDL and compile its schema once."""
        path = wsdl_path(config["wsdlUrl"])
        port = load_port(path, config.get("encoding", "UTF-8"), config["serviceName"], config["servicePort"])
        return SoapValidationPolicy(port, config["servicePort"], context.binding)


KIND = register(SoapValidationKind())
