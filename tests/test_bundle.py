"""A tiny bundle built from real ML-100K: contract, refusal of tampered bundles, valid IDs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from model_store.bundle import BundleError, load_bundle, verify
from model_store.cli import app
from model_store.config import PRESETS
from model_store.data import load_dataset, sequences
from model_store.engines.torch_engine import TorchEngine
from model_store.evaluate import ROWS
from model_store.prompts import MODES
from model_store.recommend import Recommender
from tests.build_threads import build_threads

pytestmark = pytest.mark.slow


def test_manifest_lists_every_file_and_the_evaluation(tiny_bundle: Path) -> None:
    manifest = verify(tiny_bundle)
    on_disk = sorted(
        p.relative_to(tiny_bundle).as_posix()
        for p in tiny_bundle.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    )
    assert sorted(manifest["files"]) == on_disk
    assert manifest["bundle_version"].startswith("ml-100k-")
    assert manifest["holdout"] == "test"
    assert len(manifest["dataset_checksum"]) == 64
    evaluation = json.loads((tiny_bundle / "eval.json").read_text())
    assert evaluation == manifest["evaluation"]
    assert set(evaluation) == set(ROWS)
    for figures in evaluation.values():
        assert set(figures) == {"HR@10", "NDCG@10", "HR@30", "NDCG@30"}
        assert 0.0 <= figures["NDCG@10"] <= figures["HR@10"] <= figures["HR@30"] <= 1.0
    assert (tiny_bundle / "eval.png").stat().st_size > 1000


def _edit_manifest(directory: Path, **changes: object) -> None:
    """The manifest with keys changed (None: removed), as a hand edit would leave it."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key)
        else:
            manifest[key] = value
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "reranker.txt").write_text("tampered"), "does not match"),
        (lambda d: (d / "sid_trie.npz").unlink(), "missing"),
        (lambda d: (d / "manifest.json").unlink(), "missing manifest"),
        (lambda d: (d / "manifest.json").write_text("{"), "not valid JSON"),
        (lambda d: (d / "manifest.json").write_text("[]"), "not a JSON object"),
        (lambda d: (d / "manifest.json").write_bytes(b"\xff\xfe{}"), "not UTF-8"),
        (lambda d: _edit_manifest(d, dataset=None), "no dataset name"),
        (lambda d: _edit_manifest(d, bundle_version=None), "bundle_version None is not"),
        (lambda d: _edit_manifest(d, bundle_version="ml-100k-mine"), "'ml-100k-mine' is not"),
    ],
)
def test_damaged_bundle_is_refused(tiny_bundle: Path, tmp_path: Path, damage, message) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    damage(copy)
    with pytest.raises(BundleError, match=message):
        load_bundle(copy)
    result = CliRunner().invoke(app, ["eval", str(copy)])
    assert result.exit_code == 2
    assert message in result.output


def test_generated_ids_are_valid_and_distinct(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    rec = Recommender(bundle)
    engine = TorchEngine.from_dir(bundle.llm_dir)
    users = range(12)
    for name, mode in MODES.items():
        prompts = [
            rec.prompt(
                mode,
                bundle.histories[u].tolist(),
                bundle.user_embeddings[u],
                list(bundle.users["context"][u]),
            )
            for u in users
        ]
        for beams in rec.generate(engine, prompts, beam_width=15):
            assert len(beams) == 15, name
            items = [b.item for b in beams]
            assert len(set(items)) == len(items)
            for b in beams:
                assert bundle.trie.is_valid(b.sid)
                assert list(b.sid) == list(bundle.catalog["sid"][b.item])
            scores = [b.logprob for b in beams]
            assert scores == sorted(scores, reverse=True)


def test_histories_end_before_the_held_out_item(tiny_bundle: Path, ml100k_dir: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    full = sequences(load_dataset(ml100k_dir, "ml-100k"))
    assert bundle.holdout is not None
    for user in range(len(bundle.histories)):
        published = bundle.histories[user].tolist()
        assert [*published, int(bundle.holdout[user])] == full[user].tolist()


def test_build_is_deterministic_for_a_seed(tiny_bundle: Path, ml100k_dir: Path, tmp_path: Path):
    from model_store.build import build
    from model_store.data import default_cache_dir

    with build_threads():  # as the fixture's build, whatever earlier tests set
        again = build(
            load_dataset(ml100k_dir, "ml-100k"),
            tmp_path / "again",
            PRESETS["tiny"],
            show_progress=False,
            cache_dir=default_cache_dir(),
        )
    first = verify(tiny_bundle)
    assert again["files"] == first["files"]
    assert again["bundle_version"] == first["bundle_version"]


def test_every_catalog_item_has_a_unique_semantic_id(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    codes = bundle.sid_codes
    assert len(np.unique(codes, axis=0)) == len(codes) == len(bundle.catalog)
    assert bundle.catalog["uri"][0] == "ml-100k:movie:1"
