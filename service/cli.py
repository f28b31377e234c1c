"""The `genrec` command line: the model store's offline commands and the serving ones,
composed into one app."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from model_store import cli as offline
from model_store.bundle import Bundle
from model_store.cli import (
    DEFAULT_REDIS_DB,
    HistoryLen,
    Preset,
    RedisCluster,
    RedisDb,
    RedisUrl,
    Threads,
    fail,
    load_named_dataset,
    redis_failures,
    set_threads,
)
from model_store.userstate.connect import command_redis
from service.schemas import MAX_K
from service.settings import Settings

DEFAULT_BUNDLE = Path("bundles/ml-100k")

online = typer.Typer()


def _settings(**overrides: Any) -> Settings:
    """Settings from the environment, with the command line's non-empty options on top; a
    bad one exits with its message (2), never a traceback."""
    from pydantic import ValidationError

    given: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as e:
        raise fail(str(e)) from e


@online.command("publish-embeddings")
def publish_embeddings(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle directory.")] = DEFAULT_BUNDLE,
    redis_url: RedisUrl = None,
    redis_db: RedisDb = DEFAULT_REDIS_DB,
    redis_cluster: RedisCluster = False,
    history_len: HistoryLen = 1000,
    force: Annotated[
        bool, typer.Option(help="Publish even when a version of this bundle is current.")
    ] = False,
) -> None:
    """The daily job's first run, without Ray: the bundle's own user embeddings and histories
    under a new version, made current in one step. Skipped when a version of this bundle is
    already current, so a redeploy never undoes what `embed-users` runs have consumed."""
    from model_store.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(bundle_dir)
    except BundleError as e:
        raise fail(str(e)) from e
    typer.echo(_first_run(redis_url, redis_db, bundle, history_len, force, redis_cluster))


def _first_run(
    redis_url: str | None,
    redis_db: Path,
    bundle: Bundle,
    history_len: int,
    force: bool,
    cluster: bool = False,
) -> str:
    """Publishes the bundle's users unless a version of this bundle is current already.

    An embedded Redis (no `redis_url`) is closed before this returns: the gateway opens its
    own on the same file, and uvicorn ends a process stopped by a signal by raising the
    signal again, past any `finally` of a caller, so a server held there would outlive it."""
    with redis_failures(redis_url), command_redis(redis_url, redis_db) as url:
        return _publish_unless_current(url, bundle, history_len, force, cluster)


def _publish_unless_current(
    url: str, bundle: Bundle, history_len: int, force: bool, cluster: bool
) -> str:
    from model_store.userstate.connect import sync_client
    from model_store.userstate.keys import bundle_of
    from model_store.userstate.publish import current_version, publish_bundle

    client = sync_client(url, cluster=cluster)
    current = current_version(client)
    if current is not None and bundle_of(current) == bundle.version and not force:
        return f"kept {current}: a version of this bundle is current (--force to replace)"
    report = publish_bundle(client, bundle, history_len)
    return (
        f"published {report.users} users as {report.version} in {report.seconds:.3f} s "
        f"({report.users_per_s:,.0f} users/s); deleted old versions: {report.deleted_versions}"
    )


def _serve(settings: Settings, announce: str | None = None) -> None:
    from service.api.app import create_app
    from service.api.runtime import run_server

    # What a start would only find out past uvicorn (a traceback, then "startup failed"):
    # said here in one line instead. Checksums and the rest are the runtime's to verify.
    if not (settings.bundle / "manifest.json").is_file():
        raise fail(f"{settings.bundle}: no bundle here (no manifest.json); see genrec build")
    if settings.availability_file is not None and not settings.availability_file.is_file():
        raise fail(f"GENREC_AVAILABILITY_FILE {settings.availability_file}: no such file")

    # The engine core in the gateway's process: the simplest shape, and ~3x faster to start.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    run_server(create_app(settings, announce=announce))


@online.command()
def serve(
    bundle: Annotated[Path | None, typer.Option(help="Bundle directory [GENREC_BUNDLE].")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address [GENREC_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="REST port [GENREC_PORT].")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port [GENREC_GRPC_PORT].")] = None,
    engine: Annotated[str | None, typer.Option(help="inprocess or remote [GENREC_ENGINE].")] = None,
    engine_url: Annotated[
        str | None, typer.Option(help="vLLM server for engine=remote [GENREC_ENGINE_URL].")
    ] = None,
) -> None:
    """Serve a bundle over REST and gRPC (settings from GENREC_* variables or .env)."""
    settings = _settings(
        bundle=bundle,
        host=host,
        port=port,
        grpc_port=grpc_port,
        engine=engine,
        engine_url=engine_url,
    )
    _serve(settings)


@online.command("engine-server")
def engine_server(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle directory.")] = DEFAULT_BUNDLE,
    host: str = "127.0.0.1",
    port: int = 8100,
    kv_cache_gib: float = 1.0,
) -> None:
    """Run the vLLM OpenAI server over the bundle's LLM, with the flags engine=remote needs."""
    import sys

    from model_store.bundle import BundleError, load_bundle
    from model_store.engines.remote import server_args

    try:
        bundle = load_bundle(bundle_dir)
    except BundleError as e:
        raise fail(str(e)) from e
    args = server_args(bundle.llm_dir, host, port, kv_cache_bytes=int(kv_cache_gib * 2**30))
    os.execv(sys.executable, [sys.executable, *args])


@online.command("next-episode")
def next_episode_command(
    user: Annotated[str, typer.Option(help="User id.")],
    current: Annotated[str, typer.Option(help="Item URI being played now.")] = "",
    k: Annotated[int, typer.Option(min=1, max=MAX_K, help="Items to answer.")] = 10,
    target: Annotated[str, typer.Option(help="gRPC host:port.")] = "127.0.0.1:50051",
    api_key: Annotated[str | None, typer.Option(envvar="GENREC_API_KEY")] = None,
) -> None:
    """Call the gRPC NextEpisode service and print its answer as JSON."""
    import grpc

    from service.api.client import next_episode

    try:
        answer = next_episode(target, user, current, k, api_key=api_key)
        typer.echo(json.dumps(answer, indent=2))
    except grpc.RpcError as e:
        raise fail(f"{e.code().name}: {e.details()}") from e


def demo_bundle(preset: str) -> Path:
    """Where `genrec demo` keeps the bundle of `preset`: one directory per preset, so a tiny
    demo never stands in for the full one."""
    return DEFAULT_BUNDLE if preset == "full" else DEFAULT_BUNDLE.with_name(f"ml-100k-{preset}")


def check_demo_bundle(bundle: Path, preset: str) -> None:
    """Refuses to demo a bundle built with another preset than the one asked for."""
    from model_store.evaluate import bundle_preset

    built = bundle_preset(json.loads((bundle / "manifest.json").read_text()))
    if built is not None and built != preset:
        raise fail(
            f"{bundle} holds a {built} bundle, not {preset}: pass --preset {built}, another "
            f"--bundle, or remove {bundle} to build it again"
        )


@online.command()
def demo(
    bundle: Annotated[
        Path | None,
        typer.Option(
            help="Bundle directory (default: bundles/ml-100k; bundles/ml-100k-tiny for tiny)."
        ),
    ] = None,
    preset: Annotated[
        Preset, typer.Option(help="full: the measured model (~21 min); tiny: seconds.")
    ] = Preset.full,
    port: int = 8000,
    grpc_port: int = 50051,
    threads: Threads = None,
) -> None:
    """Everything a newcomer needs: data, a bundle (built once), embeddings in Redis, and
    the service, with a request to copy."""
    from model_store.config import PRESETS

    bundle = bundle or demo_bundle(preset.value)
    settings = _settings(bundle=bundle, port=port, grpc_port=grpc_port)
    if (bundle / "manifest.json").is_file():
        check_demo_bundle(bundle, preset.value)
    else:
        set_threads(threads)
        typer.echo(f"building a {preset.value} bundle into {bundle} (once) ...")
        offline.run_build(
            load_named_dataset("ml-100k"),
            bundle,
            PRESETS[preset.value],
            source=offline.dataset_source("ml-100k"),
            preset=preset.value,
        )
    from model_store.bundle import load_bundle

    loaded = load_bundle(bundle)  # checksums verified once
    s = settings
    typer.echo(_first_run(s.redis_url, s.redis_db, loaded, s.history_len, False, s.redis_cluster))
    users = set(loaded.users["user_id"].astype(str))
    sample = "196" if "196" in users else sorted(users)[0]
    body = json.dumps({"user_id": sample, "k": 10})
    announce = (
        "\ngenrec is ready. Try:\n"
        f"  curl -s localhost:{port}/v1/recommendations -H 'content-type: application/json' "
        f"-d {shlex.quote(body)}\n"
        f"  genrec next-episode --user {sample} --current ml-100k:movie:242 "
        f"--target 127.0.0.1:{grpc_port}\n"
        f"  open http://localhost:{port}/docs\n"
    )
    _serve(settings, announce)


app = typer.Typer(
    help="genrec: generative recommendations over Semantic IDs.", no_args_is_help=True
)
app.add_typer(offline.app)
app.add_typer(online)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
