"""gRPC transport: `genrec.v1.NextEpisode`, a thin adapter over the shared use case, with
standard health checking and server reflection. Errors map to codes through the one table
in `service.api.errors`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service import metrics
from service.api.auth import Guard, presented_key
from service.api.errors import kind_of
from service.api.serving import Serving
from service.events import EventsAccepted, EventsRequest
from service.proto import next_episode_pb2 as pb
from service.proto import next_episode_pb2_grpc as pb_grpc
from service.schemas import RecommendationRequest, RecommendationResponse

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NextEpisode"].full_name
ENDPOINT = f"/{SERVICE_NAME}/Next"
REPORT_ENDPOINT = f"/{SERVICE_NAME}/Report"

T = TypeVar("T")


def _request(message: pb.NextRequest) -> RecommendationRequest:
    return RecommendationRequest(
        user_id=message.user_id,
        surface="next-episode",
        k=message.k or 10,
        current_item=message.current_item_uri or None,
    )


def _response(resp: RecommendationResponse) -> pb.NextResponse:
    return pb.NextResponse(
        request_id=resp.request_id,
        bundle_version=resp.bundle_version,
        served_by=resp.served_by,
        degraded=resp.degraded,
        items=[pb.Item(**item.model_dump()) for item in resp.items],
    )


def _events(message: pb.EventsRequest) -> EventsRequest:
    """The same body as REST's (ts 0: the time of arrival); validation happens per event."""
    return EventsRequest(
        events=[
            {
                "event_id": e.event_id,
                "user_id": e.user_id,
                "item": e.item_uri,
                "type": e.type,
                **({"ts": e.ts} if e.ts else {}),
            }
            for e in message.events
        ]
    )


def _accepted(resp: EventsAccepted) -> pb.EventsResponse:
    return pb.EventsResponse(
        accepted=resp.accepted,
        duplicates=resp.duplicates,
        rejected=[pb.Rejected(index=r.index, error=r.error) for r in resp.rejected],
    )


Lease = Callable[[], AbstractContextManager[Serving]]


class NextEpisodeServicer(pb_grpc.NextEpisodeServicer):
    """Each call leases the bundle serving when it starts (a rollout never cuts it off)."""

    def __init__(self, lease: Lease, guard: Guard) -> None:
        self.lease = lease
        self.guard = guard

    async def Next(
        self, request: pb.NextRequest, context: grpc.aio.ServicerContext
    ) -> pb.NextResponse:
        async def call(serving: Serving) -> pb.NextResponse:
            return _response(await serving.recommendations.recommend(_request(request)))

        return await self._handle(ENDPOINT, "read", context, call)

    async def Report(
        self, request: pb.EventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.EventsResponse:
        async def call(serving: Serving) -> pb.EventsResponse:
            return _accepted(await serving.events.ingest(_events(request).events))

        return await self._handle(REPORT_ENDPOINT, "write", context, call)

    async def _handle(
        self,
        endpoint: str,
        scope: str,
        context: grpc.aio.ServicerContext,
        call: Callable[[Serving], Awaitable[T]],
    ) -> T:
        """The guard (key, scope, rate), the error table's codes (with `retry-after` in the
        trailing metadata when the table has one), and the request metrics."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            try:
                metadata = {k.lower(): str(v) for k, v in context.invocation_metadata() or ()}
                await self.guard.check(presented_key(metadata), scope, _peer_host(context))
                with self.lease() as serving:
                    return await call(serving)
            except Exception as e:
                kind = kind_of(e)
                if kind is None:
                    code = grpc.StatusCode.INTERNAL  # counted as what the client will see
                    raise
                code, failure = kind.code, e
            headers = kind.headers(failure)
            if headers:
                context.set_trailing_metadata(tuple((k.lower(), v) for k, v in headers.items()))
            await context.abort(code, kind.message(failure))
            raise AssertionError("context.abort returned")  # not reached: abort raises
        finally:
            metrics.REQUESTS.labels(endpoint, code.name).inc()
            metrics.REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - start)


def _peer_host(context: grpc.aio.ServicerContext) -> str:
    """The caller's address without its port (`ipv4:10.0.0.7:51234` → `ipv4:10.0.0.7`)."""
    return str(context.peer() or "").rsplit(":", 1)[0]


@dataclass
class Grpc:
    """The running server and its health service (NOT_SERVING while draining)."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    loop: asyncio.AbstractEventLoop
    _marking: set[asyncio.Task[None]] = field(default_factory=set)

    def not_serving(self) -> None:
        """Marks every service NOT_SERVING; safe to call from a signal handler."""
        status = health_pb2.HealthCheckResponse.NOT_SERVING

        def mark() -> None:
            for name in (SERVICE_NAME, ""):
                task = self.loop.create_task(self.health.set(name, status))
                self._marking.add(task)
                task.add_done_callback(self._marking.discard)

        self.loop.call_soon_threadsafe(mark)

    async def stop(self, grace: float) -> None:
        """Refuses new calls and lets those in flight finish for up to `grace` seconds."""
        await self.server.stop(grace=grace)


@dataclass(frozen=True)
class _Undecodable:
    """What the bytes of a request became when they were no message of the method's type."""

    error: Exception


class RefuseUndecodable(grpc.aio.ServerInterceptor):
    """Bytes that do not decode as the method's request message get INVALID_ARGUMENT naming
    the problem: gRPC itself answers UNKNOWN ("Unexpected DecodeError"), which reads as a
    server fault. Unary methods only (the streaming one, reflection, is gRPC's own)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        decode, behavior = handler.request_deserializer, handler.unary_unary
        method = handler_call_details.method

        def tolerant(data: bytes) -> object:
            try:
                return decode(data)
            except Exception as e:  # protobuf's DecodeError, or anything a decoder raises
                return _Undecodable(e)

        async def checked(request: object, context: grpc.aio.ServicerContext) -> object:
            if isinstance(request, _Undecodable):
                why = f"{type(request.error).__name__}: {request.error}"
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{method}: undecodable request ({why})"
                )
            return await behavior(request, context)

        return handler._replace(request_deserializer=tolerant, unary_unary=checked)


async def start_grpc(lease: Lease, guard: Guard, host: str, port: int) -> Grpc:
    """Starts the server on (host, port); the port it bound is in the answer."""
    # Without SO_REUSEPORT (gRPC turns it on): a second gateway on a taken port fails to
    # start instead of quietly taking half the calls of the first.
    server = grpc.aio.server(interceptors=[RefuseUndecodable()], options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_NextEpisodeServicer_to_server(NextEpisodeServicer(lease, guard), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    await health_servicer.set(SERVICE_NAME, serving)
    await health_servicer.set("", serving)
    return Grpc(server, bound, health_servicer, asyncio.get_running_loop())
