"""Build configuration: small dataclasses, two presets (`full` for ML-100K, `tiny` for tests)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
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
    beam_width: int = 50  # beams for reranker training and evaluation
    reranker_rounds: int = 200
    max_users: int | None = None  # keep only the first N users (tests)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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
        beam_width=20,
        reranker_rounds=20,
        max_users=120,
    ),
}
