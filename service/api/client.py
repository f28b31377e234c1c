"""A small gRPC client for `genrec.v1.NextEpisode` (what an autoplay surface would call)."""

from __future__ import annotations

import grpc
from google.protobuf.json_format import MessageToDict

from service.proto import next_episode_pb2 as pb
from service.proto import next_episode_pb2_grpc as pb_grpc


def next_episode(
    target: str,
    user_id: str,
    current_item_uri: str = "",
    k: int = 10,
    timeout_s: float = 5.0,
    api_key: str | None = None,
) -> dict[str, object]:
    """One `Next` call; the response as a JSON-ready dict with every field, as REST answers
    (proto3 leaves out empty ones: `degraded: []`). Raises grpc.RpcError on failure."""
    metadata = [("authorization", f"Bearer {api_key}")] if api_key else None
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.NextEpisodeStub(channel)
        request = pb.NextRequest(user_id=user_id, current_item_uri=current_item_uri, k=k)
        response = stub.Next(request, timeout=timeout_s, metadata=metadata)
    return MessageToDict(
        response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
