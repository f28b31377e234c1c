"""gRPC transport: `genrec.v1.NextEpisode`, a thin adapter over the shared use case, with
standard health checking and server reflection. Errors map to codes through the one table
in `service.api.errors`."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service import metrics
from service.api.auth import authorized, presented_key
from service.api.errors import kind_of
from service.proto import next_episode_pb2 as pb
from service.proto import next_episode_pb2_grpc as pb_grpc
from service.recommendations import Recommendations
from service.schemas import RecommendationRequest, RecommendationResponse

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NextEpisode"].full_name
ENDPOINT = f"/{SERVICE_NAME}/Next"


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


class NextEpisodeServicer(pb_grpc.NextEpisodeServicer):
    def __init__(self, recommendations: Recommendations, api_keys: list[str]) -> None:
        self.recommendations = recommendations
        self.api_keys = api_keys

    async def Next(
        self, request: pb.NextRequest, context: grpc.aio.ServicerContext
    ) -> pb.NextResponse:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if self.api_keys:
                metadata = {k.lower(): str(v) for k, v in context.invocation_metadata() or ()}
                if not authorized(presented_key(metadata), self.api_keys):
                    code = grpc.StatusCode.UNAUTHENTICATED
                    await context.abort(code, "missing or unknown API key (authorization metadata)")
            try:
                resp = await self.recommendations.recommend(_request(request))
            except Exception as e:
                kind = kind_of(e)
                if kind is None:
                    code = grpc.StatusCode.INTERNAL  # counted as what the client will see
                    raise
                code = kind.code
                await context.abort(code, kind.message(e))
            return _response(resp)
        finally:
            metrics.REQUESTS.labels(ENDPOINT, code.name).inc()
            metrics.REQUEST_SECONDS.labels(ENDPOINT).observe(time.perf_counter() - start)


async def start_grpc(
    recommendations: Recommendations, host: str, port: int, api_keys: list[str]
) -> tuple[grpc.aio.Server, int]:
    """Starts the server on (host, port) and returns it with the port it bound."""
    server = grpc.aio.server()
    pb_grpc.add_NextEpisodeServicer_to_server(
        NextEpisodeServicer(recommendations, api_keys), server
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
