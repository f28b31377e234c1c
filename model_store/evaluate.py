"""The evaluation protocol (leave-one-out, full ranking, history excluded) over a bundle.

Every row goes through `Recommender`, the object the gateway serves with: the generative
ablations (baseline / prompt / soft / soft+prompt / random-context control), the served
pipeline (generation → reranker → no-repeats rule), and the non-generative baselines.

`genrec eval` reports each row as mean ± std over build seeds (sibling bundles
`BUNDLE-seed<K>` that differ only in `--seed`, built when missing) and, given peers'
per-user scores, a paired bootstrap interval of `served − peer` (see `model_store.stats`).

Per-user score file (`per_user.json`): one format, written by `genrec eval` and by `genrec
build` (in the bundle), by `loadtest/score_api.py` (the REST API scored from outside) and by
`loadtest/peer_recbole_sasrec.py --per-user` (a peer), and read by `genrec eval --peer`:

    {
      "format": "genrec-per-user/1",
      "name": "RecBole 1.2.1 SASRec",           # how reports name this system
      "user_id": ["1", "2", ...],               # the dataset's raw user ids, as strings
      "rows": {                                 # one or more systems over those users
        "served": {"HR@10": [1.0, 0.0, ...], "NDCG@10": [0.63, 0.0, ...],
                   "HR@30": [...], "NDCG@30": [...]}
      },
      "meta": {...}                             # optional, free-form (seeds, target, ...)
    }

Columnar (each list aligned with `user_id`) because it is 4 numbers per user and row: a
row of 943 users is ~100 KB of JSON, readable by any tool without genrec installed. Values
are the user's own HR@k (0 or 1) and NDCG@k (1 / log2(rank + 2) on a hit, else 0) under the
protocol; the mean of a column is the row's figure. A peer compares by its row `served` if
it has one, else by its only row.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from model_store import metrics, stats
from model_store.bundle import Bundle
from model_store.config import PRESETS, BuildConfig
from model_store.generation import Beam, Engine, Prompt
from model_store.progress import progress_bar
from model_store.prompts import MODES
from model_store.recommend import Recommender, unseen

ROWS = (
    "popularity",
    "ann",
    "baseline",
    "prompt",
    "soft",
    "soft+prompt",
    "random-context",
    "served",
)
TOP_K = max(metrics.CUTOFFS)
METRICS = tuple(f"{name}@{k}" for k in metrics.CUTOFFS for name in ("HR", "NDCG"))
PER_USER_FORMAT = "genrec-per-user/1"
PER_USER_FILE = "per_user.json"
PROTOCOL = "leave-one-out, full ranking over all items, the user's history excluded"

Scores = dict[str, np.ndarray]
"""metric → one value per user."""
Table = dict[str, dict[str, float]]
"""row → metric → value."""


# ---------------------------------------------------------------------------- per-user scores


@dataclass(frozen=True)
class PerUserScores:
    """Per-user metrics of one or more rows over the same users (the file format above)."""

    name: str
    user_ids: list[str]
    rows: dict[str, Scores]
    meta: dict[str, Any] = field(default_factory=dict)

    def comparison_row(self) -> str:
        """The row a peer is compared by: `served` if present, else its only row."""
        if "served" in self.rows:
            return "served"
        if len(self.rows) == 1:
            return next(iter(self.rows))
        raise ValueError(f"{self.name}: rows {sorted(self.rows)}, none of them 'served'")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PER_USER_FORMAT,
            "name": self.name,
            "user_id": self.user_ids,
            "rows": {
                row: {m: values.tolist() for m, values in scores.items()}
                for row, scores in self.rows.items()
            },
            "meta": self.meta,
        }


def write_per_user(path: Path, scores: PerUserScores) -> None:
    path.write_text(json.dumps(scores.to_json()))


def read_per_user(path: Path) -> PerUserScores:
    """A per-user score file, checked here so a malformed peer file fails with its name and
    the problem, not as a shape error inside the bootstrap."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a per-user score file ({e})") from e
    if not isinstance(data, dict) or data.get("format") != PER_USER_FORMAT:
        raise ValueError(f"{path}: not a per-user score file (format {PER_USER_FORMAT!r})")
    ids = [str(u) for u in data.get("user_id") or []]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: a user id appears twice")
    rows = {str(row): _columns(path, str(row), cols, len(ids)) for row, cols in _rows(data)}
    if not rows:
        raise ValueError(f"{path}: no rows")
    return PerUserScores(
        str(data.get("name") or Path(path).stem), ids, rows, data.get("meta") or {}
    )


def _rows(data: dict[str, Any]) -> list[tuple[str, Any]]:
    rows = data.get("rows")
    return list(rows.items()) if isinstance(rows, dict) else []


def _columns(path: Path, row: str, columns: Any, users: int) -> Scores:
    missing = [m for m in METRICS if not isinstance(columns, dict) or m not in columns]
    if missing:
        raise ValueError(f"{path}: row {row!r} lacks {missing}")
    scores = {m: np.asarray(columns[m], dtype=np.float64) for m in METRICS}
    if any(values.shape != (users,) for values in scores.values()):
        raise ValueError(f"{path}: row {row!r} does not have one value per user_id")
    return scores


def per_user_metrics(ranked: Sequence[Sequence[int]], targets: Sequence[int]) -> Scores:
    """Each user's own HR@k and NDCG@k: the `metrics` functions applied to one user at a
    time, so the definitions live in one place and each column's mean is `metrics.summary`."""
    ranks = metrics.target_ranks(ranked, targets)
    one_each = [ranks[u : u + 1] for u in range(len(ranks))]
    scores: Scores = {}
    for k in metrics.CUTOFFS:
        scores[f"HR@{k}"] = np.array([metrics.hit_rate(r, k) for r in one_each], np.float64)
        scores[f"NDCG@{k}"] = np.array([metrics.ndcg(r, k) for r in one_each], np.float64)
    return scores


# ---------------------------------------------------------------------------- one bundle


@dataclass(frozen=True)
class Evaluation:
    """One bundle's evaluation: the summary the manifest stores, and the per-user scores
    behind it (what seed averaging and paired comparisons need)."""

    summary: Table
    per_user: PerUserScores


@dataclass(frozen=True)
class HeldOut:
    """The users the protocol scores: those with a held-out test item, in user order."""

    users: np.ndarray  # user indices
    user_ids: list[str]  # the dataset's raw ids
    targets: list[int]  # the held-out item of each
    histories: list[list[int]]  # what each has consumed before it (published history)

    @property
    def seen(self) -> list[set[int]]:
        """Items excluded from each user's ranking (the protocol's history exclusion)."""
        return [set(h) for h in self.histories]


def held_out(bundle: Bundle, max_users: int | None = None) -> HeldOut:
    """The first `max_users` test users of a bundle; shared by the offline evaluation and
    the outside scoring of the API (`loadtest/score_api.py`), so both score the same users."""
    if bundle.holdout is None:
        raise ValueError(f"{bundle.dir}: built with --holdout none, nothing to evaluate on")
    users = np.flatnonzero(bundle.holdout >= 0)[:max_users]
    return HeldOut(
        users,
        bundle.users["user_id"].iloc[users].astype(str).tolist(),
        bundle.holdout[users].tolist(),
        [bundle.histories[int(u)].tolist() for u in users],
    )


def _search(
    rec: Recommender,
    engine: Engine,
    prompts: Sequence[Prompt],
    beam_width: int,
    chunk: int,
    show_progress: bool,
    label: str,
    seen: Sequence[set[int]],
) -> list[list[Beam]]:
    beams: list[list[Beam]] = []
    bar = progress_bar((len(prompts) + chunk - 1) // chunk, label, show_progress)
    for start in range(0, len(prompts), chunk):
        part = slice(start, start + chunk)
        beams += rec.generate(engine, prompts[part], beam_width, exclude=seen[part])
        bar.advance()
    bar.close()
    return beams


def evaluate(
    bundle: Bundle,
    engine: Engine,
    *,
    beam_width: int = 50,
    chunk: int = 128,
    seed: int = 0,
    max_users: int | None = None,
    show_progress: bool = True,
) -> Evaluation:
    """Metrics per row (`summary["served"] == {"HR@10": ..., ...}`) and per user."""
    held = held_out(bundle, max_users)
    users, targets, histories, seen = held.users, held.targets, held.histories, held.seen
    rec = Recommender(bundle)
    vectors = bundle.user_embeddings[users]
    contexts = [list(c) for c in bundle.users["context"].iloc[users]]
    rng = np.random.default_rng(seed)
    other = (np.arange(len(users)) + rng.integers(1, max(2, len(users)), len(users))) % len(users)

    ranked: dict[str, list[list[int]]] = {
        "popularity": [rec.popular(s, TOP_K) for s in seen],
        "ann": [
            [x.item for x in rec.nearest(v, s, TOP_K)] for v, s in zip(vectors, seen, strict=True)
        ],
    }
    beams_by_row: dict[str, list[list[Beam]]] = {}
    plans = {name: (mode, np.arange(len(users))) for name, mode in MODES.items()}
    plans["random-context"] = (MODES["soft+prompt"], other)
    for name, (mode, donor) in plans.items():
        prompts = [
            rec.prompt(mode, h, vectors[d], contexts[d])
            for h, d in zip(histories, donor, strict=True)
        ]
        beams_by_row[name] = _search(
            rec, engine, prompts, beam_width, chunk, show_progress, name, seen
        )
        ranked[name] = [
            unseen((b.item for b in bs), s, TOP_K)
            for bs, s in zip(beams_by_row[name], seen, strict=True)
        ]
    ranked["served"] = [
        unseen((x.item for x in rec.rerank(v, h, bs)), s, TOP_K)
        for v, h, bs, s in zip(vectors, histories, beams_by_row["soft+prompt"], seen, strict=True)
    ]
    per_user = PerUserScores(
        f"genrec (seed {seed})",
        held.user_ids,
        {row: per_user_metrics(ranked[row], targets) for row in ROWS},
        {"dataset": bundle.manifest.get("dataset"), "seed": seed, "beam_width": beam_width},
    )
    return Evaluation({row: metrics.summary(ranked[row], targets) for row in ROWS}, per_user)


# ---------------------------------------------------------------------------- seeds


def config_seed(manifest: Mapping[str, Any]) -> int:
    """The `--seed` a bundle was built with (`BuildConfig.seed`, in the manifest's config)."""
    return int(manifest["config"]["seed"])


def _without_seeds(value: Any) -> Any:
    """A config with every `seed` dropped: what must be equal between seed siblings."""
    if isinstance(value, dict):
        return {k: _without_seeds(v) for k, v in value.items() if k != "seed"}
    return value


def _config_json(cfg: BuildConfig) -> Any:
    """The config as the manifest stores it (JSON: tuples become lists)."""
    return json.loads(json.dumps(cfg.to_dict()))


def bundle_preset(manifest: Mapping[str, Any]) -> str | None:
    """The preset a bundle was built with: recorded by `genrec build`, else (older bundles,
    or ones built from Python) the preset whose config it matches, seeds aside."""
    if manifest.get("preset"):
        return str(manifest["preset"])
    config = manifest.get("config") or {}
    for name, cfg in PRESETS.items():
        candidate = replace(cfg, max_users=config.get("max_users"))
        if _without_seeds(_config_json(candidate)) == _without_seeds(config):
            return name
    return None


def default_seed_count(manifest: Mapping[str, Any]) -> int:
    """3 seeds for the full preset (the figures that are published), else 1 (tiny bundles
    are for tests, where one build is enough)."""
    return 3 if bundle_preset(manifest) == "full" else 1


def seed_dirs(bundle_dir: Path, manifest: Mapping[str, Any], n: int) -> dict[int, Path]:
    """seed → bundle directory: the given bundle's own seed first, then the siblings
    `BUNDLE-seed<K>` for the next n − 1 seeds."""
    own = config_seed(manifest)
    dirs = {own: bundle_dir}
    for seed in range(own + 1, own + n):
        dirs[seed] = bundle_dir.with_name(f"{bundle_dir.name}-seed{seed}")
    return dirs


def sibling_config(manifest: Mapping[str, Any], seed: int) -> BuildConfig:
    """The given bundle's build config (preset and `--set` overrides alike) with another
    seed; ValueError when another genrec version wrote it (then build siblings by hand)."""
    try:
        return BuildConfig.from_dict(manifest["config"]).with_seed(seed)
    except ValueError as e:
        raise ValueError(f"{e}: build the seed siblings with `--seed`") from None


def check_sibling(
    manifest: Mapping[str, Any], sibling: Mapping[str, Any], seed: int, path: Path
) -> None:
    """A sibling must differ from the given bundle only in its seed: same data, same options,
    same test split (else the seeds' figures, and the per-user averages, are not comparable)."""
    problems = []
    if config_seed(sibling) != seed:
        problems.append(f"built with seed {config_seed(sibling)}, not {seed}")
    if _without_seeds(sibling.get("config")) != _without_seeds(manifest.get("config")):
        problems.append("built with other options")
    for key in ("dataset_checksum", "holdout", "base_model"):
        if sibling.get(key) != manifest.get(key):
            problems.append(f"another {key}")
    if sibling["files"].get("holdout.npy") != manifest["files"].get("holdout.npy"):
        problems.append("another test split")
    if problems:
        raise ValueError(f"{path}: not a seed sibling ({'; '.join(problems)}); remove it")


def stored_evaluation(
    bundle: Bundle, *, beam_width: int, max_users: int | None
) -> Evaluation | None:
    """The evaluation `genrec build` ran and stored in the bundle, when it is the one asked
    for (torch engine, the config's beam width and seed, all test users): an evaluation
    costs minutes on the full preset, and the build has already paid for it."""
    manifest = bundle.manifest
    if "evaluation" not in manifest or PER_USER_FILE not in manifest.get("files", {}):
        return None
    if beam_width != int(manifest["config"]["beam_width"]):
        return None
    per_user = read_per_user(bundle.dir / PER_USER_FILE)
    if max_users is not None and max_users < len(per_user.user_ids):
        return None
    stored = manifest["evaluation"]  # the manifest is written with sorted keys
    summary = {row: {m: float(stored[row][m]) for m in METRICS} for row in ROWS}
    return Evaluation(summary, per_user)


def mean_over_seeds(evaluations: Sequence[Evaluation], seeds: Sequence[int]) -> PerUserScores:
    """Each user's scores averaged over the seeds (their expected score over training noise);
    the seeds must have evaluated the same users in the same order."""
    first = evaluations[0].per_user
    if len(evaluations) == 1:
        return first
    if any(e.per_user.user_ids != first.user_ids for e in evaluations):
        raise ValueError("the seeds' bundles evaluated different users (another test split?)")
    rows = {
        row: {m: np.mean([e.per_user.rows[row][m] for e in evaluations], axis=0) for m in METRICS}
        for row in first.rows
    }
    name = f"genrec (mean over seeds {', '.join(map(str, seeds))})"
    return PerUserScores(name, first.user_ids, rows, {"seeds": list(seeds)})


# ---------------------------------------------------------------------------- peers


@dataclass(frozen=True)
class PeerComparison:
    """`served − peer` per metric, on the users both scored."""

    name: str
    source: str
    peer_row: str
    ours: dict[str, float]  # served's mean over the paired users
    peer: dict[str, float]  # the peer's mean over the paired users
    intervals: dict[str, stats.Interval]

    @property
    def users(self) -> int:
        return next(iter(self.intervals.values())).n

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.source,
            "peer_row": self.peer_row,
            "paired_users": self.users,
            "served": self.ours,
            "peer": self.peer,
            "difference": {m: i.to_dict() for m, i in self.intervals.items()},
        }


def compare(ours: PerUserScores, peer: PerUserScores, source: str) -> PeerComparison:
    """Paired bootstrap of `served − peer` over the users in both files.

    `ours` is served's per-user scores averaged over the seeds (`mean_over_seeds`), not the
    first seed's: its mean is the figure the report shows, and averaging removes part of the
    training noise per user instead of resting the comparison on one build's draw. The
    interval covers user sampling only; the seeds' std beside it shows the training noise."""
    peer_row = peer.comparison_row()
    index = {user: i for i, user in enumerate(peer.user_ids)}
    pairs = [(i, index[user]) for i, user in enumerate(ours.user_ids) if user in index]
    if not pairs:
        raise ValueError(f"{source}: no user in common with the evaluated users")
    mine_at, theirs_at = (np.array(side) for side in zip(*pairs, strict=True))
    mine = {m: ours.rows["served"][m][mine_at] for m in METRICS}
    theirs = {m: peer.rows[peer_row][m][theirs_at] for m in METRICS}
    return PeerComparison(
        peer.name,
        source,
        peer_row,
        {m: float(v.mean()) for m, v in mine.items()},
        {m: float(v.mean()) for m, v in theirs.items()},
        stats.paired_bootstrap(mine, theirs),
    )


# ---------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class SeedReport:
    """Every row over the seeds (mean, sample std, each seed), plus peer comparisons."""

    seeds: list[int]
    bundles: list[str]
    evaluations: list[Evaluation]
    mean: Table
    std: dict[str, dict[str, float | None]]
    per_user: PerUserScores  # averaged over the seeds
    peers: list[PeerComparison]

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL,
            "seeds": self.seeds,
            "bundles": dict(zip(map(str, self.seeds), self.bundles, strict=True)),
            "users": len(self.per_user.user_ids),
            "mean": self.mean,
            "std": self.std,
            "per_seed": {
                str(s): e.summary for s, e in zip(self.seeds, self.evaluations, strict=True)
            },
            "peers": [p.to_json() for p in self.peers],
            "bootstrap": {
                "resamples": stats.BOOTSTRAP_RESAMPLES,
                "rng_seed": stats.BOOTSTRAP_SEED,
                "interval": "percentile, 95%",
                "served": "per-user scores averaged over the seeds",
            },
        }


def seed_report(
    seeds: Sequence[int],
    bundles: Sequence[str],
    evaluations: Sequence[Evaluation],
    peers: Sequence[tuple[str, PerUserScores]] = (),
) -> SeedReport:
    """The report over `evaluations` (one per seed, in `seeds` order); `peers` are
    (source, scores) pairs to compare `served` against."""
    mean, std = stats.aggregate([e.summary for e in evaluations])
    per_user = mean_over_seeds(evaluations, seeds)
    comparisons = [compare(per_user, scores, source) for source, scores in peers]
    return SeedReport(
        list(seeds), list(bundles), list(evaluations), mean, std, per_user, comparisons
    )


def lift_table(
    mean: Mapping[str, Mapping[str, float]],
    std: Mapping[str, Mapping[str, float | None]] | None = None,
) -> str:
    """Markdown table with each metric (`mean ± std` when a std is given) and the relative
    HR@30 lift over the generative baseline."""
    base = mean["baseline"]["HR@30"]
    names = list(next(iter(mean.values())))
    head = "| row | " + " | ".join(names) + " | HR@30 lift |\n|---|" + "---|" * (len(names) + 1)
    lines = [head]
    for row, figures in mean.items():
        lift = figures["HR@30"] / base - 1 if base else float("nan")
        spread = std[row] if std is not None else {}
        cells = " | ".join(stats.format_spread(figures[n], spread.get(n)) for n in names)
        lines.append(f"| {row} | {cells} | {lift:+.1%} |")
    return "\n".join(lines) + "\n"


def peer_section(peer: PeerComparison, seeds: int) -> str:
    """The comparison with one peer, ending in the plain sentence whether each interval
    excludes zero (the question a reader has)."""
    lines = [
        f"## Peer: {peer.name}",
        "",
        f"`served − peer` on the {peer.users} users both scored (`{peer.source}`, row "
        f"`{peer.peer_row}`); served's per-user scores "
        f"{f'averaged over {seeds} seeds' if seeds > 1 else 'of the one seed'}; paired "
        f"bootstrap, {stats.BOOTSTRAP_RESAMPLES:,} resamples of users, 95% percentile interval.",
        "",
        "| metric | served | peer | served − peer | 95% interval | excludes zero |",
        "|---|---|---|---|---|---|",
    ]
    for m, iv in peer.intervals.items():
        lines.append(
            f"| {m} | {peer.ours[m]:.4f} | {peer.peer[m]:.4f} | {iv.mean:+.4f} | "
            f"[{iv.low:+.4f}, {iv.high:+.4f}] | {'yes' if iv.excludes_zero else 'no'} |"
        )
    verdict = {
        answer: [m for m, iv in peer.intervals.items() if iv.excludes_zero == (answer == "yes")]
        for answer in ("yes", "no")
    }
    sentence = "; ".join(f"{a} for {', '.join(ms)}" for a, ms in verdict.items() if ms)
    lines += ["", f"Does the 95% interval exclude zero? {sentence}.", ""]
    return "\n".join(lines)


def report_markdown(report: SeedReport) -> str:
    """eval.md: the mean ± std table, the per-seed tables, the peer sections."""
    n = len(report.seeds)
    spread = (
        f"each cell is the mean ± sample std over {n} builds (seeds "
        f"{', '.join(map(str, report.seeds))})"
        if n > 1
        else f"one build (seed {report.seeds[0]}): no spread over seeds (`--seeds N` gives one)"
    )
    parts = [
        "# genrec evaluation",
        "",
        f"{PROTOCOL}; {len(report.per_user.user_ids)} users; {spread}.",
        "",
        lift_table(report.mean, report.std if n > 1 else None),
    ]
    if n > 1:
        parts.append("## Per seed\n")
        for seed, bundle, e in zip(report.seeds, report.bundles, report.evaluations, strict=True):
            parts += [f"### seed {seed} (`{bundle}`)", "", lift_table(e.summary)]
    parts += [peer_section(p, n) for p in report.peers]
    return "\n".join(parts)


def plot_report(report: SeedReport, path: Path) -> None:
    """eval.png: bars at the mean with the seeds' std as error bars; with peers, a second
    panel with each peer's `served − peer` difference and its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if report.peers else 1
    fig, axes = plt.subplots(
        1,
        panels,
        figsize=(10 + 4 * (panels - 1), 4),
        squeeze=False,
        gridspec_kw={"width_ratios": [3, 1.4][:panels]},
    )
    _mean_bars(axes[0][0], report)
    if report.peers:
        _peer_intervals(axes[0][1], report.peers)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mean_bars(ax: Any, report: SeedReport) -> None:
    names = list(report.mean)
    x = np.arange(len(names))
    several = len(report.seeds) > 1
    for offset, metric in zip((-0.3, -0.1, 0.1, 0.3), METRICS, strict=True):
        heights = [report.mean[n][metric] for n in names]
        errors = [report.std[n][metric] or 0.0 for n in names] if several else None
        ax.bar(x + offset, heights, width=0.2, yerr=errors, capsize=2, label=metric)
    ax.set_xticks(x, names, rotation=20)
    spread = f", mean ± std over {len(report.seeds)} seeds" if several else ""
    ax.set_title(f"genrec evaluation (leave-one-out, full ranking, history excluded{spread})")
    ax.legend()


def _peer_intervals(ax: Any, peers: Sequence[PeerComparison]) -> None:
    x = np.arange(len(METRICS))
    for j, peer in enumerate(peers):
        ivs = [peer.intervals[m] for m in METRICS]
        centre = np.array([iv.mean for iv in ivs])
        below = centre - np.array([iv.low for iv in ivs])
        above = np.array([iv.high for iv in ivs]) - centre
        ax.errorbar(x + 0.15 * j, centre, yerr=[below, above], fmt="o", capsize=3, label=peer.name)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(x, METRICS, rotation=20)
    ax.set_title("served − peer, 95% paired bootstrap")
    ax.legend(fontsize="small")


def _write_views(report: SeedReport, out_dir: Path) -> list[str]:
    """eval.md, eval.png, per_user.json (averaged over seeds) and, with several seeds,
    each seed's per-user file."""
    (out_dir / "eval.md").write_text(report_markdown(report))
    plot_report(report, out_dir / "eval.png")
    write_per_user(out_dir / PER_USER_FILE, report.per_user)
    written = ["eval.md", "eval.png", PER_USER_FILE]
    if len(report.seeds) > 1:
        for seed, e in zip(report.seeds, report.evaluations, strict=True):
            name = f"per_user-seed{seed}.json"
            write_per_user(out_dir / name, e.per_user)
            written.append(name)
    return written


def write_report(report: SeedReport, out_dir: Path) -> list[str]:
    """`genrec eval`'s report: eval.json (seeds, per seed, mean, std, peers), eval.md,
    eval.png and the per-user files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report.to_json(), indent=2))
    return ["eval.json", *_write_views(report, out_dir)]


def write_bundle_report(evaluation: Evaluation, seed: int, out_dir: Path) -> list[str]:
    """The build's report, inside the bundle: one seed, and eval.json stays the plain
    row → metrics summary (the manifest's "evaluation"), which readers of bundles expect."""
    report = seed_report([seed], [str(out_dir)], [evaluation])
    (out_dir / "eval.json").write_text(json.dumps(evaluation.summary, indent=2))
    return ["eval.json", *_write_views(report, out_dir)]


def served_figures(eval_json: Mapping[str, Any]) -> dict[str, float]:
    """The `served` row of an eval.json of either kind: a bundle's (row → metrics) or
    `genrec eval`'s report (its mean over seeds)."""
    table = eval_json.get("mean", eval_json)
    return {m: float(table["served"][m]) for m in METRICS}
