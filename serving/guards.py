"""What every gRPC call passes before it reaches a servicer: the bearer token, admission (load
shedding) and the call metrics.

Admission is ours, not grpc's `maximum_concurrent_rpcs`: that cap counts every RPC, so under
overload it refuses health checks too. Here only Ranker calls count against
`ranker.max_in_flight`; health checks (and reflection) pass beside them.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from fusionrec import metrics
from fusionrec.loop import Backlog, Budget, ranker_share

log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SHARE_SPENT = "the ranker has used its share of the event loop"

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class Guard(grpc.aio.ServerInterceptor):
    """Token check for every service but health; admission and metrics for `limited`.

    A call counts as in flight from the moment it is admitted until its task ends, however it
    ends. When calls run `inline` (Qdrant local mode: on the loop, one after another) their
    share of the loop is capped too, at a share that depends on the stream worker's backlog
    (`worker`), a lone call over it waiting for room rather than being shed: fusionrec.loop.
    """

    def __init__(
        self,
        *,
        limited: str,
        max_in_flight: int,
        token: str | None = None,
        inline: bool = False,
        worker: Backlog | None = None,
    ) -> None:
        self._limited = limited
        self._max_in_flight = max_in_flight
        self._token = f"Bearer {token}".encode() if token else None
        self.inline = inline
        self._budget = Budget()  # of loop time, for inline calls
        self._worker = worker or Backlog()
        self._pacer: asyncio.Task[Any] | None = None  # the call waiting for the budget
        self.in_flight = 0

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        _, service, method = details.method.split("/", 2)
        if handler is None or service == HEALTH_SERVICE:
            return handler
        if self._token is not None and not self._authorized(details.invocation_metadata):
            log.debug("refused a call to %s without a valid bearer token", details.method)
            return _refusal(
                handler, grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is needed"
            )
        if service != self._limited:
            return handler
        full, wait = self._admission()
        if full:
            return _refusal(handler, grpc.StatusCode.RESOURCE_EXHAUSTED, _shed(method, full))
        self._admit(pacer=wait > 0)
        return grpc.unary_unary_rpc_method_handler(
            self._observed(method, handler.unary_unary, wait),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _authorized(self, metadata: Any) -> bool:
        assert self._token is not None
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._token)
        return False

    def _admission(self) -> tuple[str | None, float]:
        """Why no call can be admitted now (None: it is), and how long an admitted call waits
        before it runs (an inline call over the share, while no other call waits)."""
        if self.in_flight >= self._max_in_flight:
            return f"the ranker is at its limit of {self._max_in_flight} calls in flight", 0.0
        if not self.inline:
            return None, 0.0
        share = ranker_share(self._worker.recent())
        wait = self._budget.wait(share)
        if wait == 0.0 or self._pacer is None:
            return None, wait
        return f"{SHARE_SPENT} ({share:.0%})", 0.0

    def _admit(self, pacer: bool) -> None:
        # Interceptors run in the call's own task: its end releases the slot whatever happens
        # (a client that cancels before its request is read included).
        self.in_flight += 1
        metrics.RANKER_IN_FLIGHT.set(self.in_flight)
        task = asyncio.current_task()
        assert task is not None
        task.add_done_callback(self._release)
        if pacer:
            self._pacer = task

    def _release(self, task: asyncio.Task[Any]) -> None:
        self.in_flight -= 1
        metrics.RANKER_IN_FLIGHT.set(self.in_flight)
        if self._pacer is task:
            self._pacer = None

    def _observed(
        self, method: str, behavior: Callable[..., Awaitable[Any]], wait: float = 0.0
    ) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if wait:
                # One call at a time waits for the budget (the pacer); the calls grpc hands
                # over meanwhile (the loop is free) are shed, and so is the pacer if its
                # deadline comes first.
                remaining = context.time_remaining()
                late = remaining is not None and remaining <= wait
                if not late:
                    await asyncio.sleep(wait)
                if self._pacer is asyncio.current_task():
                    self._pacer = None
                if late:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED, _shed(method, SHARE_SPENT)
                    )
            start = time.perf_counter()
            try:
                return await behavior(request, context)
            finally:
                took = time.perf_counter() - start
                if self.inline:
                    self._budget.spend(took, ranker_share(self._worker.recent()))
                metrics.RANK_SECONDS.labels(method).observe(took)
                code = context.code() or grpc.StatusCode.OK
                metrics.RANKER_CALLS.labels(method, getattr(code, "name", str(code))).inc()

        return call


def _shed(method: str, reason: str) -> str:
    """Count a call to `method` shed (RESOURCE_EXHAUSTED) for `reason`; the message it gets."""
    metrics.RANKER_CALLS.labels(method, grpc.StatusCode.RESOURCE_EXHAUSTED.name).inc()
    return f"{reason}; retry later"


def _refusal(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` (its request still has to be read) that ends
    the call with `code` and never reaches the servicer."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    kinds = (
        (handler.unary_unary, grpc.unary_unary_rpc_method_handler),
        (handler.unary_stream, grpc.unary_stream_rpc_method_handler),
        (handler.stream_unary, grpc.stream_unary_rpc_method_handler),
        (handler.stream_stream, grpc.stream_stream_rpc_method_handler),
    )
    make = next(make for behavior, make in kinds if behavior is not None)
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
