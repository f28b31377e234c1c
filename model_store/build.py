"""`genrec build`: real interactions → one versioned, checksummed serving bundle.

Read top to bottom: split → content vectors → user model → Semantic IDs → LLM + projector
→ reranker (validation split) → published embeddings and histories → evaluation → manifest.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import structlog
import torch

from model_store import ann, content, data, llm, semantic_ids, user_model
from model_store.bundle import ITEMS_DIR, Bundle, Histories, write_manifest
from model_store.catalog import facet_codes, single_codes, write_items
from model_store.config import BuildConfig
from model_store.data import Dataset
from model_store.distill import Teacher
from model_store.item_graph import build_item_graph, save_item_graph
from model_store.projector import Projector, save_projector
from model_store.prompts import MODES, context_words
from model_store.recommend import Recommender
from model_store.reranker import candidate_features, save_reranker, train_reranker
from model_store.trie import SIDTrie
from model_store.vocab import Vocab, text_vocabulary

log = structlog.get_logger()


@dataclass(frozen=True)
class Plan:
    """Which items each stage may see, by holdout mode (see README, 'Holdout')."""

    fit: list[np.ndarray]  # sequences the user model and LLM train on
    rerank_targets: np.ndarray  # per user: the item the reranker learns to rank (-1: none)
    published: list[np.ndarray]  # histories the gateway serves from (end before holdout)
    holdout: np.ndarray | None  # per user: held-out test item (-1: none)


HELD_OUT = {
    "test": "last interaction per user (test); histories end before it",
    "validation": "second-last interaction per user (validation; the test item is dropped)",
    "none": "nothing",
}


def plan_split(seqs: list[np.ndarray], holdout: str) -> Plan:
    """`validation` is `test` one step earlier: each user's test item is dropped before the
    split, so tuning runs the whole protocol without ever reading the test split."""
    if holdout == "validation":
        return plan_split([s[:-1] if len(s) >= 3 else s for s in seqs], "test")
    split = data.leave_one_out(seqs)
    if holdout == "test":
        published = [
            np.concatenate([t, [v]]) if v >= 0 else t
            for t, v in zip(split.train, split.valid, strict=True)
        ]
        return Plan(list(split.train), split.valid, published, split.test)
    if holdout == "none":
        fit = [s[:-1] if len(s) >= 2 else s for s in seqs]
        last = np.array([s[-1] if len(s) >= 2 else -1 for s in seqs], dtype=np.int64)
        return Plan(fit, last, list(seqs), None)
    raise ValueError(f"--holdout must be one of {sorted(HELD_OUT)}, not {holdout!r}")


def split_users(ds: Dataset, cfg: BuildConfig, holdout: str) -> tuple[Plan, list[list[str]]]:
    """The build's split of the (first `max_users`) users and each user's context words."""
    seqs = data.sequences(ds)
    if cfg.max_users is not None:
        seqs = seqs[: cfg.max_users]
    return plan_split(seqs, holdout), _users(ds)["context"].tolist()[: len(seqs)]


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        log.info("stage.start", stage=name)
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)
        log.info("stage.done", stage=name, seconds=self.seconds[name])


def _states_per_position(model: user_model.UserModel, seqs: list[np.ndarray]) -> list[np.ndarray]:
    """For each user, row p = the user state after the first p items (row 0: zeros)."""
    prefixes = [s[:p] for s in seqs for p in range(len(s))]
    flat = user_model.user_states(model, prefixes)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    return [flat[offsets[u] : offsets[u + 1]] for u in range(len(seqs))]


def _fused_vectors(content_vecs: np.ndarray, collab: np.ndarray, cfg: BuildConfig) -> np.ndarray:
    fused = np.concatenate([content_vecs * cfg.content_weight, collab * cfg.collab_weight], axis=1)
    return (fused / np.linalg.norm(fused, axis=1, keepdims=True)).astype(np.float32)


def _catalog(ds: Dataset, codes: np.ndarray, popularity: np.ndarray) -> pd.DataFrame:
    cat = ds.items[["item_id", "uri", "title", "kind", "creator", "year", "genres"]].copy()
    cat["genres"] = [list(g) for g in cat["genres"]]
    cat["popularity"] = popularity.astype(np.int64)
    cat["sid"] = [list(map(int, row)) for row in codes]
    return cat.reset_index(drop=True)


def _write_items(out: Path, ds: Dataset, popularity: np.ndarray, sid_tokens: np.ndarray) -> None:
    """The catalog's per-item columns as the gateway maps them (`items/`)."""
    items = ds.items
    write_items(
        out / ITEMS_DIR,
        uris=items["uri"].astype(str).tolist(),
        titles=items["title"].astype(str).tolist(),
        kinds=single_codes(items["kind"]),
        creators=single_codes(items["creator"]),
        genres=facet_codes([list(g) for g in items["genres"]]),
        year=items["year"].to_numpy(dtype=np.float32),
        popularity=popularity,
        sid_tokens=sid_tokens,
    )


def write_vectors(
    out: Path, collab: np.ndarray, retrieval: np.ndarray, content_vecs: np.ndarray, seed: int
) -> list[str]:
    """Item and content vectors as float16 (exact enough: BENCHMARKS.md), retrieval vectors
    as float32 (the ANN's scores), and the ANN index when the catalog needs one."""
    np.save(out / "item_embeddings.npy", np.asarray(collab, dtype=np.float16))
    np.save(out / "item_retrieval.npy", np.asarray(retrieval, dtype=np.float32))
    np.save(out / "content_vectors.npy", np.asarray(content_vecs, dtype=np.float16))
    written = ["item_embeddings.npy", "item_retrieval.npy", "content_vectors.npy"]
    return written + ann.write_index(retrieval, out, seed)


def _users(ds: Dataset) -> pd.DataFrame:
    users = ds.users[["user_id", "age", "gender", "occupation", "region"]].copy()
    users["context"] = [
        context_words(int(a), str(g), str(o), str(r))
        for a, g, o, r in zip(
            users["age"], users["gender"], users["occupation"], users["region"], strict=True
        )
    ]
    return users.reset_index(drop=True)


def reranker_groups(
    rec: Recommender,
    plan: Plan,
    contexts: list[list[str]],
    fit_states: np.ndarray,
    beam_width: int,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One (features, labels) group per user with a reranker target: the candidates
    generated from the history that ends before that item, labelled 1 where they hit it."""
    from model_store.engines.torch_engine import TorchEngine

    engine = TorchEngine.from_dir(rec.bundle.llm_dir)
    users = np.flatnonzero(plan.rerank_targets >= 0)
    mode = MODES["soft+prompt"]
    groups = []
    for start in range(0, len(users), 128):
        chunk = users[start : start + 128]
        prompts = [rec.prompt(mode, plan.fit[u], fit_states[u], contexts[u]) for u in chunk]
        seen = [set(plan.fit[u].tolist()) for u in chunk]  # as served: no consumed items
        found_beams = rec.generate(engine, prompts, beam_width, exclude=seen)
        for u, beams in zip(chunk, found_beams, strict=True):
            items = [b.item for b in beams]
            x = candidate_features(
                rec.table, fit_states[u], plan.fit[u], items, [b.logprob for b in beams]
            )
            groups.append((x, (np.array(items) == plan.rerank_targets[u]).astype(np.float32)))
    return groups


def _train_reranker_stage(
    out: Path,
    plan: Plan,
    cfg: BuildConfig,
    contexts: list[list[str]],
    fit_states: np.ndarray,
) -> dict[str, Any]:
    """Candidates for histories ending before the validation item; labels = that item."""
    rec = Recommender(Bundle(out, verified=False), with_reranker=False)
    groups = reranker_groups(rec, plan, contexts, fit_states, cfg.beam_width)
    reranker = train_reranker(
        groups, cfg.user_model.temperature, seed=cfg.seed, rounds=cfg.reranker_rounds
    )
    save_reranker(reranker, out / "reranker.txt")
    return {
        "validation_users": len(groups),
        "target_in_candidates": sum(bool(y.any()) for _, y in groups) / max(1, len(groups)),
        "base": reranker.base,
        "rounds": reranker.booster.num_trees(),
    }


def build(
    ds: Dataset,
    out: Path,
    cfg: BuildConfig,
    *,
    holdout: str = "test",
    base_model: Path | None = None,
    run_eval: bool = True,
    show_progress: bool = True,
    cache_dir: Path | None = None,
    preset: str | None = None,
    dataset_source: str | None = None,
) -> dict[str, Any]:
    """Builds the bundle into `out` (replaced) and returns its manifest. `preset` and
    `dataset_source` (what `--dataset` named) are recorded so `genrec eval --seeds` can
    build the same bundle with another seed."""
    if base_model is not None:  # before anything is replaced or computed
        llm.check_base_model(base_model)
    torch.manual_seed(cfg.seed)
    timer = Timer()
    if out.exists():
        shutil.rmtree(out)
    (out / "llm").mkdir(parents=True)
    plan, contexts = split_users(ds, cfg, holdout)
    n_users = len(plan.fit)

    with timer.stage("content_vectors"):
        content_vecs = content.encode_cached(
            data.item_text(ds.items), cache_dir, progress=show_progress
        )
    with timer.stage("user_model"):
        umodel = user_model.train_user_model(plan.fit, ds.n_items, cfg.user_model, show_progress)
        collab = user_model.item_vectors(umodel)
        retrieval = user_model.retrieval_vectors(umodel)
    with timer.stage("semantic_ids"):
        sids = semantic_ids.assign_semantic_ids(_fused_vectors(content_vecs, collab, cfg), cfg.sid)
        purity = semantic_ids.purity_report(sids.codes, list(ds.items["genres"]))
        sid_stats = {**sids.stats, **purity}
        trie = SIDTrie.build(sids.codes)
        log.info("semantic_ids", **{k: v for k, v in sid_stats.items() if not isinstance(v, list)})

    with timer.stage("llm"):
        level_sizes = [int(sids.codes[:, lv].max()) + 1 for lv in range(sids.codes.shape[1])]
        words = text_vocabulary(
            {w for c in contexts for w in c},
            {g for gs in ds.items["genres"] for g in gs},
            set(ds.items["kind"]),
            ds.items["title"],
        )
        vocab = Vocab.build(words, level_sizes)
        tokenizer = None
        if base_model is not None:
            model, vocab, tokenizer = llm.extend_base_model(base_model, vocab)
        else:
            model = llm.new_model(vocab, cfg.llm)
        if cfg.llm.sid_init == "codebooks":
            llm.init_sid_embeddings(model, vocab, sids.codebooks, cfg.llm.seed)
        hidden = int(model.config.hidden_size)
        projector = Projector(cfg.user_model.dim, hidden, cfg.llm.n_soft, cfg.llm.soft_at)
        training = llm.TrainingData(
            train=plan.fit,
            states=_states_per_position(umodel, plan.fit),
            context=contexts,
            item_sid_ids=vocab.sid_ids(sids.codes),
            item_genres=list(ds.items["genres"]),
            teacher=Teacher(retrieval, cfg.user_model.temperature),
        )
        losses = llm.train_llm(model, projector, vocab, training, cfg.llm, show_progress)
        llm.save_llm(model, vocab, out / "llm", tokenizer)
        save_projector(projector, out)

    with timer.stage("write_artifacts"):
        popularity = np.bincount(np.concatenate(plan.published), minlength=ds.n_items)
        _catalog(ds, sids.codes, popularity).to_parquet(out / "catalog.parquet")
        _write_items(out, ds, popularity, vocab.sid_ids(sids.codes))
        _users(ds).iloc[:n_users].to_parquet(out / "users.parquet")
        np.save(out / "sid_codes.npy", sids.codes)
        np.save(out / "sid_codebooks.npy", sids.codebooks)
        trie.save(out / "sid_trie.npz")
        write_vectors(out, collab, retrieval, content_vecs, cfg.seed)
        user_model.save_user_model(umodel, out)
        np.save(out / "user_embeddings.npy", user_model.user_states(umodel, plan.published))
        published = Histories.from_lists(plan.published)
        np.savez(out / "histories.npz", items=published.items, offsets=published.offsets)
        if plan.holdout is not None:
            np.save(out / "holdout.npy", plan.holdout)

    with timer.stage("reranker"):
        if cfg.item_neighbours:  # 0: the reranker without item-to-item experts
            save_item_graph(build_item_graph(plan.fit, ds.n_items, cfg.item_neighbours), out)
        fit_states = user_model.user_states(umodel, plan.fit)
        reranker_stats = _train_reranker_stage(out, plan, cfg, contexts, fit_states)

    meta: dict[str, Any] = {
        "dataset": ds.name,
        "dataset_source": dataset_source,
        "preset": preset,
        "dataset_checksum": ds.checksum,
        "holdout": holdout,
        "held_out": HELD_OUT[holdout],
        "n_users": n_users,
        "n_items": ds.n_items,
        "config": cfg.to_dict(),
        "base_model": str(base_model) if base_model else None,
        "semantic_ids": sid_stats,
        "llm_losses": losses,
        "reranker": reranker_stats,
    }
    write_manifest(out, meta)
    if run_eval and plan.holdout is not None:
        with timer.stage("evaluation"):
            from model_store.engines.torch_engine import TorchEngine
            from model_store.eval_report import write_bundle_report
            from model_store.evaluate import evaluate

            bundle = Bundle(out)
            evaluation = evaluate(
                bundle,
                TorchEngine.from_dir(bundle.llm_dir),
                beam_width=cfg.beam_width,
                seed=cfg.seed,
                show_progress=show_progress,
            )
            write_bundle_report(evaluation, cfg.seed, out)
            meta["evaluation"] = evaluation.summary
    meta["build_seconds"] = timer.seconds
    manifest = write_manifest(out, meta)
    log.info(
        "bundle.written",
        out=str(out),
        version=manifest["bundle_version"],
        seconds=json.dumps(timer.seconds),
    )
    return manifest
