"""An external processing server for tests: grpcio `envoy.service.ext_proc.v3.ExternalProcessor`
with Envoy's own messages (xds-protos), scripted by the request's `x-proc` header, recording the
ProcessingRequests of every stream."""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any

from tests.extauthz_server import GrpcTestServer, grpc_modules


def header_map(headers: Any) -> dict[str, bytes]:
    """A HeaderMap as a dict (last value wins), raw values or text."""
    return {h.key: h.raw_value or h.value.encode() for h in headers.headers}


class ExtProcServer(GrpcTestServer):
    """A grpcio ext_proc server on 127.0.0.1. `x-proc` on the request headers picks a script:

    - (absent) `mutate`: request headers get `x-proc-added: 1`, `x-replace` overwritten,
      `x-secret` removed, and attempts on `host` and `:path` (ignored by the gateway); request
      bodies become `REPLACED:` + body; response headers get `x-resp-added: yes` and lose
      `x-upstream-secret`; each response body piece becomes `<` + piece + `>`; response
      trailers get `x-trailer-added: 1`.
    - `replace`: the answer to request headers is CONTINUE_AND_REPLACE with body `whole new`.
    - `immediate`: 418, `x-why: teapot`, body `short and stout`.
    - `immediate-response`: the response headers get an immediate 503 answer.
    - `override`: the answer to request headers turns the response body mode on (BUFFERED).
    - `hold`: the first answer waits for release(); `hold-response`: the answer to the
      response headers does; `slow`: asks for 1.5 s more
      (override_message_timeout), answers after 0.6 s.
    - `close`: the stream ends (grpc-status 0) without an answer; `abort`: grpc-status INTERNAL.
    - `garbage`: an answer that is not a ProcessingResponse; `huge`: a 3 MiB one.
    - `spurious`: a response_body answer to the request headers.
    """

    def __init__(self) -> None:
        grpc, pb = grpc_modules("envoy.service.ext_proc.v3.external_processor_pb2")
        super().__init__()
        self.pb = pb
        self.streams: list[list[Any]] = []
        self.metadata: list[dict[str, str]] = []  # each stream's gRPC metadata
        server = self

        def process(requests: Any, context: Any) -> Any:
            seen: list[Any] = []
            server.streams.append(seen)
            server.metadata.append(dict(context.invocation_metadata()))
            script = "mutate"
            for data in requests:
                request = pb.ProcessingRequest()
                request.ParseFromString(data)
                seen.append(request)
                if request.HasField("request_headers"):
                    script = header_map(request.request_headers.headers).get(
                        "x-proc", b"mutate").decode()
                replies = server.answer(script, request, context)
                if replies is None:
                    return
                for reply in replies if isinstance(replies, list) else [replies]:
                    if isinstance(reply, float):
                        threading.Event().wait(reply)  # a pause between two answers
                    else:
                        yield reply if isinstance(reply, bytes) else reply.SerializeToString()

        handler = grpc.method_handlers_generic_handler(
            "envoy.service.ext_proc.v3.ExternalProcessor",
            {"Process": grpc.stream_stream_rpc_method_handler(
                process, request_deserializer=None, response_serializer=None)},
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def answer(self, script: str, request: Any, context: Any) -> Any:
        """The answer to one ProcessingRequest (None: end the stream)."""
        import grpc
        from envoy.config.core.v3 import base_pb2
        from google.protobuf import wrappers_pb2

        pb = self.pb
        which = request.WhichOneof("request")
        reply = pb.ProcessingResponse()
        first = which == "request_headers"
        if (script == "hold" and first) or (script == "hold-response"
                                            and which == "response_headers"):
            self.hold()
        elif script == "slow" and first:
            slower = pb.ProcessingResponse()
            slower.override_message_timeout.FromMilliseconds(1500)
            return [slower, 0.6, self.answer("mutate", request, context)]
        elif script == "close" and first:
            return None
        elif script == "abort" and first:
            context.abort(grpc.StatusCode.INTERNAL, "processor broke")
        elif script == "garbage" and first:
            return b"\xff\xff\xff\xff"
        elif script == "huge" and first:
            reply.request_headers.response.body_mutation.body = b"x" * (3 << 20)
            return reply
        elif script == "spurious" and first:
            reply.response_body.SetInParent()
            return reply
        elif script == "immediate" and first:
            immediate = reply.immediate_response
            immediate.status.code = 418
            immediate.headers.set_headers.add(header=base_pb2.HeaderValue(key="x-why", value="teapot"))
            immediate.body = b"short and stout"
            return reply
        elif script == "immediate-response" and which == "response_headers":
            reply.immediate_response.status.code = 503
            reply.immediate_response.body = b"processor says no"
            return reply

        def setter(common: Any, key: str, value: str, append: bool | None = None) -> None:
            option = common.header_mutation.set_headers.add(
                header=base_pb2.HeaderValue(key=key, raw_value=value.encode()))
            if append is not None:
                option.append.CopyFrom(wrappers_pb2.BoolValue(value=append))

        if which == "request_headers":
            common = reply.request_headers.response
            setter(common, "x-proc-added", "1")
            setter(common, "x-replace", "new", append=False)
            setter(common, "host", "evil.example", append=False)
            setter(common, ":path", "/elsewhere", append=False)
            common.header_mutation.remove_headers.append("x-secret")
            common.clear_route_cache = True
            if script == "replace":
                common.status = 1  # CONTINUE_AND_REPLACE
                common.body_mutation.body = b"whole new"
            if script == "override":
                reply.mode_override.response_body_mode = 2  # BUFFERED
        elif which == "request_body":
            reply.request_body.response.body_mutation.body = b"REPLACED:" + request.request_body.body
        elif which == "response_headers":
            common = reply.response_headers.response
            setter(common, "x-resp-added", "yes")
            common.header_mutation.remove_headers.append("x-upstream-secret")
        elif which == "response_body":
            body = request.response_body.body
            reply.response_body.response.body_mutation.body = b"<" + body + b">"
        elif which == "response_trailers":
            reply.response_trailers.header_mutation.set_headers.add(
                header=base_pb2.HeaderValue(key="x-trailer-added", raw_value=b"1"))
        else:
            reply.request_trailers.SetInParent()
        return reply

    def kinds(self, stream: int = -1) -> list[str]:
        """The kinds of message a stream got, in order."""
        return [r.WhichOneof("request") for r in self.streams[stream]]
