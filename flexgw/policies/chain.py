"""Running a compiled policy chain for one request: request phase in order, response in reverse."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from flexgw.plan import BoundPolicy
from flexgw.policies.base import LocalResponse, PolicyContext

_log = Logger(namespace="flexgw.policies")


def policy_error(binding: str, failure: Failure | None = None) -> LocalResponse:
    """The 500 for a policy that raised: a correlation id in the body and in the log."""
    correlation = uuid.uuid4().hex
    _log.failure(
        "Policy {binding} failed (correlation id {correlation})",
        failure,
        binding=binding,
        correlation=correlation,
    )
    body = (
        b'{"error":"Internal policy error","correlationId":"' + correlation.encode("ascii") + b'"}'
    )
    return LocalResponse(
        500,
        (
            (b"Content-Type", b"application/json"),
            (b"x-flexgw-error", b"policy_error"),
            (b"x-correlation-id", correlation.encode("ascii")),
        ),
        body,
    )


class ChainRun:
    """The request phase of one chain for one request; remembers what ran for the response phase."""

    __slots__ = ("cancelled", "ctx", "finishers", "policies", "ran", "waiting")

    def __init__(self, policies: Sequence[BoundPolicy], ctx: PolicyContext) -> None:
        self.policies = policies
        self.ctx = ctx
        self.ran: list[BoundPolicy] = []
        self.waiting: Deferred[Any] | None = None  # the policy Deferred being waited for
        self.cancelled = False
        # Policies with `on_done` that let the request through (None: none so far).
        self.finishers: list[BoundPolicy] | None = None

    def run(self, start: int = 0) -> LocalResponse | None | Deferred[Any]:
        """Run from policy `start`: None (go on to the upstream), a LocalResponse, or a Deferred."""
        policies = self.policies
        ctx = self.ctx
        trace = ctx.trace
        started = 0.0
        for index in range(start, len(policies)):
            bound = policies[index]
            if bound.responds:
                self.ran.append(bound)
            if trace is not None:  # a traced request: when the policy started, for its span
                started = trace.clock.seconds()
            try:
                result = bound.policy.on_request(ctx)
            except Exception:  # noqa: BLE001 (any policy failure is a 500, never a crash)
                return policy_error(bound.name, Failure())
            if result is None:
                if bound.finishes:
                    self._finishes(bound)
                continue
            if isinstance(result, Deferred):
                self.waiting = result
                if trace is not None:  # a span for the wait, from the policy's start
                    trace.policy_waiting(bound.name, bound.kind, started)
                return result.addCallbacks(
                    self._resumed,
                    self._failed,
                    callbackArgs=(index,),
                    errbackArgs=(bound.name,),
                )
            return result
        return None

    def _finishes(self, bound: BoundPolicy) -> None:
        """Remember a policy whose `on_done` must hear how the request ended."""
        if self.finishers is None:
            self.finishers = [bound]
        else:
            self.finishers.append(bound)

    def _resumed(self, result: Any, index: int) -> Any:
        self.waiting = None
        if self.ctx.trace is not None:
            self.ctx.trace.policy_done(None if result is None else "rejected")
        if result is None and not self.cancelled:
            bound = self.policies[index]
            if bound.finishes:
                self._finishes(bound)
            return self.run(index + 1)
        return result

    def finish(self, status: int, cause: str | None) -> None:
        """The request has ended: tell every policy that asked (`on_done`), last first."""
        finishers, self.finishers = self.finishers, None
        for bound in reversed(finishers or ()):
            try:
                bound.policy.on_done(self.ctx, status, cause)
            except Exception:  # noqa: BLE001 (the response is gone; log and go on)
                _log.failure("Policy {binding} failed in on_done", binding=bound.name)

    def _failed(self, failure: Failure, binding: str) -> LocalResponse | None:
        self.waiting = None
        if self.ctx.trace is not None:
            self.ctx.trace.policy_done("policy_error")
        if self.cancelled:
            return None  # the client went away and cancel() was called: nothing to report
        return policy_error(binding, failure)

    def cancel(self) -> None:
        """The client went away: cancel the policy Deferred being waited for (its canceller
        frees whatever it held, e.g. a queue slot or a timer); run no further policies."""
        self.cancelled = True
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.cancel()

    def respond(self) -> LocalResponse | None:
        """The response phase: every policy that ran, in reverse order."""
        ctx = self.ctx
        for bound in reversed(self.ran):
            try:
                bound.policy.on_response(ctx)
            except Exception:  # noqa: BLE001 (any policy failure is a 500, never a crash)
                return policy_error(bound.name, Failure())
        return None
