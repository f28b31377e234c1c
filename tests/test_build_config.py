"""Build configuration: `--set` overrides, the manifest round trip seed siblings are built
from, the validation holdout that tuning runs on, and which bundle the demo builds."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import typer

from model_store.build import plan_split
from model_store.config import PRESETS, BuildConfig, override


def test_a_setting_is_read_as_its_fields_type() -> None:
    cfg = override(PRESETS["tiny"], "llm.distill=0.5")
    cfg = override(cfg, "beam_width=30")
    cfg = override(cfg, "sid.kmeans_plus_plus=false")
    cfg = override(cfg, "max_users=none")
    assert cfg.llm.distill == 0.5 and cfg.beam_width == 30
    assert cfg.sid.kmeans_plus_plus is False and cfg.max_users is None
    assert cfg.llm.epochs == PRESETS["tiny"].llm.epochs  # the rest is untouched


@pytest.mark.parametrize(
    ("assignment", "reason"),
    [
        ("llm.distil=1", "unknown setting 'llm.distil'"),
        ("llm=1", "is a section"),
        ("beam_width.x=1", "has no fields"),
        ("beam_width=wide", "not a valid int"),
        ("sid.kmeans_plus_plus=maybe", "not a valid bool"),
        ("epochs", "expected KEY=VALUE"),
    ],
)
def test_a_bad_setting_says_why(assignment: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        override(PRESETS["full"], assignment)


def test_a_manifest_config_comes_back_as_it_was_built() -> None:
    cfg = override(override(PRESETS["full"].with_seed(2), "llm.distill=0.25"), "llm.soft_at=now")
    stored = json.loads(json.dumps(cfg.to_dict()))  # as the manifest keeps it
    assert BuildConfig.from_dict(stored) == cfg
    del stored["llm"]["soft_at"]  # before it existed the soft token stood at the head
    del stored["llm"]["sid_init"]  # and the SID tokens started at random
    before = replace(cfg.llm, soft_at="head", sid_init="random")
    assert BuildConfig.from_dict(stored) == replace(cfg, llm=before)
    del stored["llm"]["distill"]
    stored["llm"]["dropout"] = 0.1
    with pytest.raises(ValueError, match=r"lacks llm\.distill, has unknown llm\.dropout"):
        BuildConfig.from_dict(stored)


def test_the_validation_holdout_never_sees_the_test_item() -> None:
    seqs = [np.arange(10), np.array([7, 8, 9]), np.array([4, 5])]
    test, validation = plan_split(seqs, "test"), plan_split(seqs, "validation")
    assert test.holdout is not None and validation.holdout is not None
    assert test.holdout.tolist() == [9, 9, -1]
    assert validation.holdout.tolist() == [8, -1, -1]  # the validation item, scored as test
    assert validation.rerank_targets.tolist() == [7, -1, -1]
    for fit, published, seq in zip(validation.fit, validation.published, seqs, strict=True):
        assert seq[-1] not in fit.tolist() or len(seq) < 3
        assert seq[-1] not in published.tolist() or len(seq) < 3


def test_the_demo_keeps_one_bundle_per_preset(tmp_path: Path) -> None:
    """A tiny demo never stands in for the full one: its own directory by default, and a
    directory holding another preset's bundle is refused with the way out."""
    from service.cli import DEFAULT_BUNDLE, check_demo_bundle, demo_bundle

    assert demo_bundle("full") == DEFAULT_BUNDLE
    assert demo_bundle("tiny") != DEFAULT_BUNDLE
    (tmp_path / "manifest.json").write_text(json.dumps({"preset": "tiny"}))
    check_demo_bundle(tmp_path, "tiny")
    with pytest.raises(typer.Exit):
        check_demo_bundle(tmp_path, "full")
