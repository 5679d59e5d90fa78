"""soap-validation: the WSDL compiled at load, SOAP 1.1/1.2 faults, XXE never resolved, end to end."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from flexgw.policies import registry
from flexgw.policies.base import BuildContext, PolicyConfigError
from flexgw.policies.soap_validation import KIND, SoapValidationKind
from flexgw.testing import client
from tests.harness import PolicyGatewayCase, assert_loads_cleanly

WSDL = """\
<?xml version="1.0" encoding="UTF-8"?>
<definitions xmlns="http://schemas.xmlsoap.org/wsdl/" xmlns:soap="http://schemas.xmlsoap.org/wsdl/soap/"
  xmlns:soap12="http://schemas.xmlsoap.org/wsdl/soap12/" xmlns:tns="http://example.com/calc"
  xmlns:xsd="http://www.w3.org/2001/XMLSchema" targetNamespace="http://example.com/calc" name="Calculator">
  <types>
    <xsd:schema targetNamespace="http://example.com/calc" elementFormDefault="qualified">
      <xsd:element name="Add"><xsd:complexType><xsd:sequence>
        <xsd:element name="a" type="xsd:int"/><xsd:element name="b" type="xsd:int"/>
      </xsd:sequence></xsd:complexType></xsd:element>
      <xsd:element name="AddResponse"><xsd:complexType><xsd:sequence>
        <xsd:element name="result" type="xsd:int"/></xsd:sequence></xsd:complexType></xsd:element>
    </xsd:schema>
  </types>
  <message name="AddRequest"><part name="parameters" element="tns:Add"/></message>
  <message name="AddReply"><part name="parameters" element="tns:AddResponse"/></message>
  <portType name="Calc"><operation name="Add"><input message="tns:AddRequest"/><output message="tns:AddReply"/></operation></portType>
  <binding name="Calc11" type="tns:Calc"><soap:binding style="document" transport="http://schemas.xmlsoap.org/soap/http"/>
    <operation name="Add"><soap:operation soapAction="urn:Add"/><input><soap:body use="literal"/></input></operation></binding>
  <binding name="Calc12" type="tns:Calc"><soap12:binding style="document" transport="http://schemas.xmlsoap.org/soap/http"/>
    <operation name="Add"><soap12:operation soapAction="urn:Add"/><input><soap12:body use="literal"/></input></operation></binding>
  <service name="CalculatorService">
    <port name="Port11" binding="tns:Calc11"><soap:address location="http://localhost/calc"/></port>
    <port name="Port12" binding="tns:Calc12"><soap12:address location="http://localhost/calc"/></port>
  </service>
</definitions>
"""
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12 = "http://www.w3.org/2003/05/soap-envelope"


def envelope(ns: str, a: str = "1") -> bytes:
    """An Add request in the SOAP version whose envelope namespace is `ns`."""
    return (f'<e:Envelope xmlns:e="{ns}"><e:Body><c:Add xmlns:c="http://example.com/calc">'
            f"<c:a>{a}</c:a><c:b>2</c:b></c:Add></e:Body></e:Envelope>").encode()


class SoapTestCase(TestCase):
    """A WSDL and a secret file (an XXE target) in a temporary directory."""

    def setUp(self) -> None:
        """Write them."""
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir)
        self.wsdl = self.dir / "calc.wsdl"
        self.wsdl.write_text(WSDL)
        self.secret = self.dir / "secret.txt"
        self.secret.write_text("TOP-SECRET-VALUE")

    def build(self, port: str = "Port11", **extra: str) -> object:
        """The policy for `port`."""
        config = {"wsdlUrl": self.wsdl.as_uri(), "encoding": "UTF-8",
                  "serviceName": "CalculatorService", "servicePort": port, **extra}
        return KIND.build(config, BuildContext("default/soap", "default/api"))

    def xxe(self, ns: str) -> bytes:
        """A request whose DTD pulls the secret file into the operation element."""
        return (f'<?xml version="1.0"?><!DOCTYPE e:Envelope [<!ENTITY x SYSTEM "{self.secret.as_uri()}">]>'
                f'<e:Envelope xmlns:e="{ns}"><e:Body><c:Add xmlns:c="http://example.com/calc">'
                "<c:a>&x;</c:a><c:b>2</c:b></c:Add></e:Body></e:Envelope>").encode()


class PolicyTests(SoapTestCase):
    """The compiled port on hand-made bodies."""

    def test_valid_and_invalid_requests(self) -> None:
        """Valid Add passes; a bad int, an unknown operation, the wrong SOAP version, no body,
        broken XML and an XXE document are refused with a reason (content never echoed)."""
        from flexgw.policies.soap_validation import Refused

        policy = self.build()
        policy.check(envelope(SOAP11))
        cases = (
            (envelope(SOAP11, "x"), ("Schema validation failed at /c:Add/c:a: Element "
                                     "'{http://example.com/calc}a': the value is not a valid value "
                                     "of the atomic type 'xs:int'.")),
            (envelope(SOAP11).replace(b"c:Add", b"c:Sub"),
             "Body element {http://example.com/calc}Sub is not an input of port Port11"),
            (envelope(SOAP12), "Not a SOAP 1.1 Envelope"),
            (b"", "Missing SOAP request body"),
            (b"<e:Envelope", "The request is not well-formed XML"),
            (self.xxe(SOAP11), "A SOAP message must not contain a document type declaration"),
        )
        for body, reason in cases:
            with self.assertRaises(Refused) as caught:
                policy.check(body)
            self.assertEqual(str(caught.exception), reason)

    def test_config_errors(self) -> None:
        """Unknown service or port, a remote wsdlUrl and a missing file are located errors."""
        for extra, field in (({"serviceName": "Nope"}, "serviceName"), ({"servicePort": "Nope"}, "servicePort"),
                             ({"wsdlUrl": "https://example.com/calc?wsdl"}, "wsdlUrl"),
                             ({"wsdlUrl": str(self.dir / "missing.wsdl")}, "wsdlUrl")):
            with self.assertRaises(PolicyConfigError) as caught:
                self.build(**extra)
            self.assertEqual(caught.exception.field, field)

    def test_schema_imports_stay_in_the_sandbox(self) -> None:
        """A WSDL whose schema imports a file outside its directory is refused at load time."""
        outside = WSDL.replace(
            'elementFormDefault="qualified">',
            'elementFormDefault="qualified"><xsd:import namespace="urn:x" schemaLocation="/etc/passwd"/>',
        )
        self.wsdl.write_text(outside)
        with self.assertRaises(PolicyConfigError) as caught:
            self.build()
        self.assertIn("do not compile", caught.exception.message)

    def test_registered_and_flex_example_validates(self) -> None:
        """Registered under Flex's name; the pipeline accepts Flex's documented keys."""
        self.assertIsInstance(registry.lookup("soap-validation"), SoapValidationKind)
        assert_loads_cleanly(self, binding(self.wsdl.as_uri()))


def binding(wsdl_url: str, port: str = "Port11") -> str:
    """A PolicyBinding document for soap-validation on `test-api` (Flex's example's keys)."""
    return (
        "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
        "metadata: {name: soap}\n"
        "spec:\n  targetRef: {name: test-api}\n  policyRef: {name: soap-validation}\n"
        f"  config:\n    wsdlUrl: {wsdl_url}\n    encoding: UTF-8\n"
        f"    serviceName: CalculatorService\n    servicePort: {port}\n"
    )


class EndToEndTests(PolicyGatewayCase, SoapTestCase):
    """Through a real gateway and a recording upstream."""

    async def post(self, body: bytes, content_type: bytes = b"text/xml") -> client.Response:
        """POST a SOAP body through the gateway."""
        raw = (b"POST /calc HTTP/1.1\r\nHost: t\r\nContent-Type: " + content_type
               + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        return await client.request(reactor, "127.0.0.1", self.port, raw)

    async def test_soap11_faults_and_xxe(self) -> None:
        """1.1: a valid request passes intact; invalid ones get a soap:Client fault with 500;
        the XXE payload is refused and the secret appears nowhere; ?wsdl serves the WSDL."""
        self.start(binding(self.wsdl.as_uri()))
        ok = await self.post(envelope(SOAP11))
        self.assertEqual(ok.status, 200)
        bad = await self.post(envelope(SOAP11, "x"))
        self.assertEqual(bad.status, 500)
        self.assertIn(b"<faultcode>soap:Client</faultcode>", bad.body)
        attack = await self.post(self.xxe(SOAP11))
        self.assertEqual(attack.status, 500)
        self.assertNotIn(b"TOP-SECRET", attack.body)
        self.assertEqual([r.body for r in self.upstream.received], [envelope(SOAP11)])
        wsdl = await client.request(reactor, "127.0.0.1", self.port,
                                    b"GET /calc?wsdl HTTP/1.1\r\nHost: t\r\n\r\n")
        self.assertEqual((wsdl.status, wsdl.body), (200, WSDL.encode()))
        put = await client.request(reactor, "127.0.0.1", self.port,
                                   b"PUT /calc HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(put.status, 405)

    async def test_soap12_fault_is_400(self) -> None:
        """1.2: an invalid request gets an env:Sender fault with 400, as application/soap+xml."""
        self.start(binding(self.wsdl.as_uri(), "Port12"))
        bad = await self.post(envelope(SOAP12, "x"), b"application/soap+xml")
        self.assertEqual(bad.status, 400)
        self.assertEqual(bad.header("content-type"), [b"application/soap+xml; charset=UTF-8"])
        self.assertIn(b"<env:Value>env:Sender</env:Value>", bad.body)
        self.assertEqual((await self.post(envelope(SOAP12), b"application/soap+xml")).status, 200)
