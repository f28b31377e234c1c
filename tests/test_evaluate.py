"""The evaluation report: seed aggregation, the paired bootstrap, per-user score files,
the REST scoring client, and `genrec eval --seeds --peer` end to end on the tiny bundle."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from loadtest.score_api import offline_served, pause_s, score_api
from model_store import metrics
from model_store.bundle import load_bundle
from model_store.cli import app
from model_store.eval_report import compare
from model_store.evaluate import ROWS, check_sibling, held_out, stored_evaluation
from model_store.scores import (
    METRICS,
    PerUserScores,
    per_user_metrics,
    read_per_user,
    write_per_user,
)
from model_store.stats import aggregate, format_spread, mean_std, paired_bootstrap


def _scores(values: np.ndarray) -> dict[str, np.ndarray]:
    return {m: values for m in METRICS}


# ---------------------------------------------------------------------------- statistics


def test_identical_systems_give_an_interval_of_zero() -> None:
    values = np.random.default_rng(1).random(200)
    for iv in paired_bootstrap(_scores(values), _scores(values.copy())).values():
        assert iv.low <= 0.0 <= iv.high
        assert abs(iv.low) < 1e-12 and abs(iv.high) < 1e-12
        assert not iv.excludes_zero
        assert iv.n == 200


def test_a_clear_shift_excludes_zero() -> None:
    rng = np.random.default_rng(2)
    peer = rng.random(300)
    ours = peer + 0.1 + rng.normal(0, 0.05, 300)
    iv = paired_bootstrap(_scores(ours), _scores(peer))["NDCG@10"]
    assert iv.excludes_zero and iv.low > 0.05
    assert iv.mean == pytest.approx(float(np.mean(ours - peer)))
    assert iv.to_dict()["excludes_zero"] is True


def test_the_bootstrap_is_reproducible() -> None:
    rng = np.random.default_rng(3)
    a, b = _scores(rng.random(50)), _scores(rng.random(50))
    assert paired_bootstrap(a, b) == paired_bootstrap(a, b)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=40),
    st.integers(0, 2**16),
)
def test_the_interval_contains_the_observed_difference(
    pairs: list[tuple[float, float]], seed: int
) -> None:
    ours, peer = (np.array(side) for side in zip(*pairs, strict=True))
    iv = paired_bootstrap(_scores(ours), _scores(peer), resamples=500, seed=seed)["HR@10"]
    assert iv.low - 1e-9 <= iv.mean <= iv.high + 1e-9
    assert iv.mean == pytest.approx(float(np.mean(ours - peer)), abs=1e-12)


def test_one_seed_has_no_spread_three_seeds_the_sample_std() -> None:
    one = {"served": {"HR@10": 0.2}}
    mean, std = aggregate([one])
    assert mean == {"served": {"HR@10": 0.2}} and std == {"served": {"HR@10": None}}
    assert format_spread(0.2, None) == "0.2000"
    three = [{"served": {"HR@10": v}} for v in (0.1, 0.2, 0.3)]
    mean, std = aggregate(three)
    assert mean["served"]["HR@10"] == pytest.approx(0.2)
    assert std["served"]["HR@10"] == pytest.approx(0.1)  # sample std, ddof=1
    assert format_spread(0.2, 0.1) == "0.2000 ± 0.1000"
    assert mean_std([1.0, 1.0]) == (1.0, 0.0)
    reordered = [{"a": {"x": 1.0, "y": 2.0}}, {"a": {"y": 2.0, "x": 1.0}}]
    assert aggregate(reordered)[0] == {"a": {"x": 1.0, "y": 2.0}}
    with pytest.raises(ValueError, match="different rows"):
        aggregate([one, {"ann": {"HR@10": 0.1}}])


# ---------------------------------------------------------------------------- per-user files


def test_per_user_metrics_average_to_the_summary() -> None:
    ranked = [[5, 1, 2], [3, 4], list(range(40)), []]
    targets = [1, 7, 35, 0]
    per_user = per_user_metrics(ranked, targets)
    summary = metrics.summary(ranked, targets)
    assert {m: float(v.mean()) for m, v in per_user.items()} == pytest.approx(summary)
    assert per_user["HR@10"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert per_user["NDCG@10"][0] == pytest.approx(1 / np.log2(3))


def test_per_user_file_round_trip_and_pairing_by_user_id(tmp_path: Path) -> None:
    ours = PerUserScores("ours", ["1", "2", "3"], {"served": _scores(np.array([1.0, 0.0, 1.0]))})
    peer = PerUserScores("peer", ["3", "9", "1"], {"SASRec": _scores(np.array([0.0, 1.0, 0.0]))})
    write_per_user(tmp_path / "peer.json", peer)
    read = read_per_user(tmp_path / "peer.json")
    assert read.user_ids == peer.user_ids and read.comparison_row() == "SASRec"
    result = compare(ours, read, "peer.json")
    assert result.users == 2  # users 1 and 3; 2 and 9 are unpaired
    assert result.ours["HR@10"] == 1.0 and result.peer["HR@10"] == 0.0
    assert result.intervals["HR@10"].excludes_zero
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a per-user score file"):
        read_per_user(tmp_path / "bad.json")


def test_a_sibling_built_differently_is_refused() -> None:
    manifest = {
        "config": {"seed": 0, "beam_width": 20, "llm": {"seed": 0, "epochs": 1}},
        "dataset_checksum": "abc",
        "holdout": "test",
        "files": {"holdout.npy": "h"},
    }
    same = {**manifest, "config": {"seed": 1, "beam_width": 20, "llm": {"seed": 1, "epochs": 1}}}
    check_sibling(manifest, same, 1, Path("b-seed1"))
    other = {**same, "config": {**same["config"], "llm": {"seed": 1, "epochs": 2}}}
    with pytest.raises(ValueError, match="other options"):
        check_sibling(manifest, other, 1, Path("b-seed1"))
    with pytest.raises(ValueError, match="test split"):
        check_sibling(manifest, {**same, "files": {"holdout.npy": "x"}}, 1, Path("b-seed1"))


def test_pause_honours_retry_after_seconds() -> None:
    assert pause_s("2", 0) == 2.0
    assert pause_s(None, 2) == 2.0
    assert pause_s("Wed, 21 Oct 2015 07:28:00 GMT", 0) == 0.5


# ---------------------------------------------------------------------------- on the tiny bundle


@pytest.mark.slow
def test_the_build_stores_per_user_scores_for_reuse(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    stored = stored_evaluation(bundle, beam_width=60, max_users=None)
    assert stored is not None and stored.summary == bundle.manifest["evaluation"]
    assert list(stored.summary) == list(ROWS)  # in protocol order, not the manifest's sorted one
    assert stored.per_user.user_ids == held_out(bundle).user_ids
    for row, figures in stored.summary.items():
        means = {m: float(v.mean()) for m, v in stored.per_user.rows[row].items()}
        assert means == pytest.approx(figures)
    assert stored_evaluation(bundle, beam_width=50, max_users=None) is None


@pytest.mark.slow
def test_score_api_drops_history_and_scores_the_held_out_item(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    held = held_out(bundle, 20)
    uris = bundle.catalog["uri"].astype(str).tolist()
    answer = {
        u: [*h[-1:], t] for u, h, t in zip(held.user_ids, held.histories, held.targets, strict=True)
    }
    refused: set[str] = set()

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert request.url.path == "/v1/recommendations" and body["k"] == 30
        if body["user_id"] not in refused:  # each user is refused once, then served
            refused.add(body["user_id"])
            return httpx.Response(503, headers={"retry-after": "0"})
        items = [{"uri": uris[i]} for i in answer[body["user_id"]]]
        return httpx.Response(200, json={"items": items, "served_by": "generative"})

    async def run() -> PerUserScores:
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await score_api(bundle, client, name="api", max_users=20)

    scores = asyncio.run(run())
    assert scores.user_ids == held.user_ids and scores.meta["served_by"] == {"generative": 20}
    # the consumed item ranked first is dropped, so the held-out item is at rank 0
    assert scores.rows["served"]["NDCG@10"].tolist() == [1.0] * 20


def test_the_api_is_compared_with_served_over_the_same_users(tmp_path: Path) -> None:
    served = {m: np.array([1.0, 0.0, 0.0, 0.0]) for m in METRICS}
    write_per_user(tmp_path / "per_user.json", PerUserScores("b", list("abcd"), {"served": served}))
    (tmp_path / "eval.json").write_text(json.dumps({"served": {m: 0.25 for m in METRICS}}))
    figures, source = offline_served(tmp_path / "eval.json", ["a", "b"])  # --max-users 2
    assert figures == {m: 0.5 for m in METRICS} and "the same 2 users" in source
    (tmp_path / "per_user.json").unlink()
    figures, source = offline_served(tmp_path / "eval.json", ["a", "b"])
    assert figures == {m: 0.25 for m in METRICS} and "every test user" in source


@pytest.mark.slow
def test_eval_over_two_seeds_with_a_peer(tiny_bundle: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["eval", str(tiny_bundle), "--seeds", "2", "--max-users", "30", "--threads", "1"]
    first = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    sibling = load_bundle(tiny_bundle.with_name(tiny_bundle.name + "-seed1")).manifest
    assert sibling["config"]["seed"] == 1 and sibling["preset"] == "tiny"
    report = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert report["seeds"] == [0, 1] and report["users"] == 30
    assert set(report["per_seed"]) == {"0", "1"}
    assert all(v is not None for row in report["std"].values() for v in row.values())
    markdown = (tmp_path / "a" / "eval.md").read_text()
    assert " ± " in markdown and "## Per seed" in markdown

    peer = tmp_path / "a" / "per_user-seed1.json"
    second = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--peer", str(peer)])
    assert second.exit_code == 0, second.output
    (comparison,) = json.loads((tmp_path / "b" / "eval.json").read_text())["peers"]
    assert comparison["paired_users"] == 30
    for figures in comparison["difference"].values():
        assert figures["low"] <= figures["mean_diff"] <= figures["high"]
    markdown = (tmp_path / "b" / "eval.md").read_text()
    assert "95% interval" in markdown and "Does the 95% interval exclude zero?" in markdown
    assert (tmp_path / "b" / "eval.png").stat().st_size > 1000


def test_the_soft_row_by_beam_width_ranks_as_the_evaluation(tiny_bundle: Path) -> None:
    """`bench_soft_token --beam-widths` re-ranks `soft` and `ann` exactly as the build's
    evaluation did (60 beams, as every preset), so its wider beams compare like with like."""
    from loadtest.bench_soft_token import soft_row_by_beam
    from model_store.engines.torch_engine import TorchEngine
    from model_store.recommend import Recommender

    bundle = load_bundle(tiny_bundle)
    held = held_out(bundle)
    users = np.asarray(bundle.user_embeddings[held.users], dtype=np.float32)
    rec = Recommender(bundle, with_reranker=False)
    rows = soft_row_by_beam(rec, TorchEngine.from_dir(bundle.llm_dir), held, users, [60])
    evaluation = bundle.manifest["evaluation"]
    assert rows["ann"] == pytest.approx(evaluation["ann"])
    assert rows["soft, beam 60"] == pytest.approx(evaluation["soft"])
