"""Peers and the report: what `genrec eval` and `genrec build` write from evaluations.

Kept apart from the protocol (`model_store.evaluate`) and the score file
(`model_store.scores`): comparing with peers and presenting figures (tables, plots, the
report's files) is its own job, and the only one that needs matplotlib.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model_store import stats
from model_store.evaluate import PROTOCOL, Evaluation, mean_over_seeds
from model_store.scores import METRICS, PER_USER_FILE, PerUserScores, Table, write_per_user

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
