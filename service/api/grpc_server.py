"""gRPC transport: `genrec.v1.NextEpisode`, a thin adapter over the shared use case, with
standard health checking and server reflection. Errors map to codes through the one table
in `service.api.errors`."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service import metrics
from service.api.auth import authorized, presented_key
from service.api.errors import kind_of
from service.events import Events, EventsAccepted, EventsRequest
from service.proto import next_episode_pb2 as pb
from service.proto import next_episode_pb2_grpc as pb_grpc
from service.recommendations import Recommendations
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


class NextEpisodeServicer(pb_grpc.NextEpisodeServicer):
    def __init__(
        self, recommendations: Recommendations, events: Events, api_keys: list[str]
    ) -> None:
        self.recommendations = recommendations
        self.events = events
        self.api_keys = api_keys

    async def Next(
        self, request: pb.NextRequest, context: grpc.aio.ServicerContext
    ) -> pb.NextResponse:
        async def call() -> pb.NextResponse:
            return _response(await self.recommendations.recommend(_request(request)))

        return await self._handle(ENDPOINT, context, call)

    async def Report(
        self, request: pb.EventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.EventsResponse:
        async def call() -> pb.EventsResponse:
            return _accepted(await self.events.ingest(_events(request).events))

        return await self._handle(REPORT_ENDPOINT, context, call)

    async def _handle(
        self,
        endpoint: str,
        context: grpc.aio.ServicerContext,
        call: Callable[[], Awaitable[T]],
    ) -> T:
        """Auth, the error table's codes, and the request metrics, for every method."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if self.api_keys:
                metadata = {k.lower(): str(v) for k, v in context.invocation_metadata() or ()}
                if not authorized(presented_key(metadata), self.api_keys):
                    code = grpc.StatusCode.UNAUTHENTICATED
                    await context.abort(code, "missing or unknown API key (authorization metadata)")
            try:
                return await call()
            except Exception as e:
                kind = kind_of(e)
                if kind is None:
                    code = grpc.StatusCode.INTERNAL  # counted as what the client will see
                    raise
                code = kind.code
                await context.abort(code, kind.message(e))
                raise  # not reached: abort raises
        finally:
            metrics.REQUESTS.labels(endpoint, code.name).inc()
            metrics.REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - start)


async def start_grpc(
    recommendations: Recommendations, events: Events, host: str, port: int, api_keys: list[str]
) -> tuple[grpc.aio.Server, int]:
    """Starts the server on (host, port) and returns it with the port it bound."""
    server = grpc.aio.server()
    pb_grpc.add_NextEpisodeServicer_to_server(
        NextEpisodeServicer(recommendations, events, api_keys), server
    )
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
    return server, bound
