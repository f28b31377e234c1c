"""Build configuration: small dataclasses, two presets (`full` for ML-100K, `tiny` for tests)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any

from model_store.llm import LLMConfig
from model_store.semantic_ids import SIDConfig
from model_store.user_model import UserModelConfig


@dataclass(frozen=True)
class BuildConfig:
    user_model: UserModelConfig = field(default_factory=UserModelConfig)
    sid: SIDConfig = field(default_factory=SIDConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    content_weight: float = 1.0  # weight of the content vector in the fused SID input
    collab_weight: float = 1.0  # weight of the user-model item vector in the fused SID input
    # beams for reranker training and evaluation: what the gateway searches for the protocol's
    # top 30 (2 per item asked, `GENREC_CANDIDATES_PER_ITEM`), so `served` is the API's answer
    beam_width: int = 60
    # neighbours kept per item by the reranker's item graph (`item_graph.py`)
    item_neighbours: int = field(default=50, metadata={"absent": 0})
    reranker_rounds: int = 200
    max_users: int | None = None  # keep only the first N users (tests)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> BuildConfig:
        """The config a manifest stores, back as a BuildConfig (a seed sibling is built from
        it). A key missing or unknown means another genrec version wrote it: ValueError."""
        return _from_dict(cls(), config, "")

    def with_seed(self, seed: int) -> BuildConfig:
        return replace(
            self,
            seed=seed,
            user_model=replace(self.user_model, seed=seed),
            sid=replace(self.sid, seed=seed),
            llm=replace(self.llm, seed=seed),
        )


PRESETS: dict[str, BuildConfig] = {
    "full": BuildConfig(),
    "tiny": BuildConfig(
        user_model=UserModelConfig(dim=32, layers=1, heads=1, max_len=20, epochs=3),
        sid=SIDConfig(levels=3, codebook_size=16, kmeans_iters=10),
        llm=LLMConfig(hidden=64, layers=1, heads=2, intermediate=128, window=6, epochs=1),
        reranker_rounds=20,
        max_users=120,
    ),
}


def override(cfg: BuildConfig, assignment: str) -> BuildConfig:
    """`cfg` with one `section.field=value` applied (`llm.distill=0.5`, `beam_width=30`),
    the value read as the field's type: what `genrec build --set` tunes without a preset."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{assignment!r}: expected KEY=VALUE, e.g. llm.epochs=30")
    return _set_path(cfg, key.strip().split("."), raw.strip(), key.strip())


def _set_path(obj: Any, path: list[str], raw: str, key: str) -> Any:
    types = {f.name: str(f.type) for f in fields(obj)}
    if path[0] not in types:
        raise ValueError(f"unknown setting {key!r} (here: {', '.join(types)})")
    current = getattr(obj, path[0])
    if is_dataclass(current):
        if len(path) == 1:
            raise ValueError(f"{key!r} is a section: name one of its fields")
        value = _set_path(current, path[1:], raw, key)
    elif len(path) > 1:
        raise ValueError(f"{key!r}: {path[0]} has no fields")
    else:
        value = _parse(raw, current, key, optional="None" in types[path[0]])
    return replace(obj, **{path[0]: value})


def _parse(raw: str, current: Any, key: str, optional: bool) -> Any:
    """`raw` as the type of the field's current value (an optional field also takes none)."""
    try:
        if optional and raw.lower() == "none":
            return None
        if isinstance(current, bool):
            return {"true": True, "1": True, "false": False, "0": False}[raw.lower()]
        if current is None:  # the optional fields are ints (max_users)
            return int(raw)
        return type(current)(raw)
    except (KeyError, ValueError):
        kind = "bool" if isinstance(current, bool) else type(current).__name__
        raise ValueError(f"{key}={raw!r}: not a valid {kind}") from None


def _from_dict(default: Any, config: Mapping[str, Any], where: str) -> Any:
    """A field missing from `config` takes its `absent` metadata if it has one (the value
    that reproduces what genrec did before the field existed); any other gap is an error."""
    absent = {f.name: f.metadata["absent"] for f in fields(default) if "absent" in f.metadata}
    config = {**absent, **config}
    names = {f.name for f in fields(default)}
    missing, unknown = names - set(config), set(config) - names
    if missing or unknown:
        problems = [f"lacks {where}{k}" for k in sorted(missing)]
        problems += [f"has unknown {where}{k}" for k in sorted(unknown)]
        raise ValueError(f"the config {', '.join(problems)} (another genrec version built it)")
    values = {}
    for name in names:
        current, value = getattr(default, name), config[name]
        if is_dataclass(current):
            value = _from_dict(current, value, f"{where}{name}.")
        elif isinstance(current, tuple):
            value = tuple(value)
        values[name] = value
    return replace(default, **values)
