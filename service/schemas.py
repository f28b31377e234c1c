"""Request and response types shared by REST and gRPC (validation lives here, once)."""

from __future__ import annotations

import sys
import unicodedata
from itertools import groupby
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints
from pydantic import Strict as PydanticStrict

USER_ID = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}$"
ITEM_URI = r"^[a-z0-9][a-z0-9\-]*:[a-z]+:[A-Za-z0-9_.\-]{1,64}$"
MAX_PROMPT_CHARS = 500
ItemUri = Annotated[str, StringConstraints(pattern=ITEM_URI)]
MAX_K = 100

ServedBy = Literal["generative", "prompt-only", "ann", "popularity"]


INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})
"""Unicode categories with nothing to see: controls, format characters (the zero-width space,
bidi marks, tags), spaces and separators."""


def _invisible_class() -> str:
    """Ranges of every invisible code point, read alike by pydantic's Rust regex, Python's
    `re` (the contract test's) and JSON Schema's: escaped in the BMP, literal above it (no
    escape of an astral code point is read by all three)."""
    points = [p for p in range(sys.maxunicode + 1) if unicodedata.category(chr(p)) in INVISIBLE]
    runs = [[p for _, p in run] for _, run in groupby(enumerate(points), lambda ip: ip[1] - ip[0])]
    return "".join(_char(run[0]) + (f"-{_char(run[-1])}" if len(run) > 1 else "") for run in runs)


def _char(point: int) -> str:
    return f"\\u{point:04X}" if point <= 0xFFFF else chr(point)


VISIBLE = f"[^{_invisible_class()}]"
"""Some character to see: text of blanks, zero-width or other invisible characters alone asks
for nothing."""


def _whole(value: object) -> object:
    """JSON Schema's integer is 5 or 5.0; pydantic's lax mode would also take "5" and true."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Whole = Annotated[int, BeforeValidator(_whole), PydanticStrict()]
"""An integer as JSON Schema has it: a number with no fraction, not a string or a boolean."""

Age = Annotated[int, Field(ge=1, le=120), BeforeValidator(_whole), PydanticStrict()]
"""A whole number of years. Bounds that a union's member carries (`Age | None`) reach the
JSON Schema only when they come before the validator."""

Real = Annotated[float, PydanticStrict()]
"""A number as JSON Schema has it (5 or 5.5), not a string or a boolean."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequestContext(Strict):
    """Facts about the user for this request; each overrides what the bundle knows."""

    market: str | None = Field(None, pattern=r"^[A-Za-z]{2}$", description="ISO country code.")
    age: Age | None = None
    gender: Literal["m", "f"] | None = None
    occupation: str | None = Field(None, pattern=r"^[a-z][a-z \-]{0,39}$")
    region: str | None = Field(None, pattern=r"^[a-z0-9]{1,8}$", description="Zip-code region.")


class RecommendationRequest(Strict):
    user_id: str = Field(pattern=USER_ID, examples=["196"])
    surface: str = Field("home", pattern=r"^[a-z][a-z0-9_\-]{0,31}$", examples=["home"])
    k: Whole = Field(10, ge=1, le=MAX_K)
    context: RequestContext | None = None
    prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="The user's own words, if any."
    )
    exclude: list[ItemUri] = Field(
        default_factory=list, max_length=1000, description="Item URIs to leave out."
    )
    current_item: ItemUri | None = Field(
        None, description="What the user is consuming now (next-episode)."
    )


class PlaylistRequest(Strict):
    user_id: str = Field(pattern=USER_ID, examples=["196"])
    prompt: str = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        pattern=VISIBLE,  # some words: blanks alone ask for nothing
        examples=["a dark sci-fi thriller"],
    )
    length: Whole = Field(20, ge=1, le=MAX_K)
    context: RequestContext | None = None


class Item(BaseModel):
    uri: str = Field(examples=["ml-100k:movie:50"])
    title: str
    kind: str
    score: float
    semantic_id: str = Field(description="Codes per level, dash-separated.", examples=["3-17-4-0"])
    why: str = Field(description="Which stage produced the item and which rules touched it.")


class RecommendationResponse(BaseModel):
    request_id: str
    bundle_version: str
    served_by: ServedBy
    degraded: list[str] = Field(description="Why a lesser path served, if it did.")
    items: list[Item]
    timings_ms: dict[str, float]


class ErrorBody(BaseModel):
    error: str
    detail: object = None
