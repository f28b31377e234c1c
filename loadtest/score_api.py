"""Scores the running gateway's REST API under genrec's evaluation protocol, from outside.

The offline `served` row runs the serving code in-process; this asks the deployed API the
way a client would. For every test user of the bundle (those with a held-out item) it sends
`POST /v1/recommendations` with `{"user_id": ..., "k": 30}`, maps the returned URIs to
catalog items, drops the user's history (`unseen`, exactly as the protocol does; the
gateway already never repeats a consumed item) and scores the held-out item: HR@10,
NDCG@10, HR@30 and NDCG@30 per user. It writes the per-user score file (format in the
`model_store.scores` docstring; the row is named `served`, so the file is a valid
`genrec eval --peer` input) and prints the four metrics next to the bundle's `served` row
from eval.json, their difference and whether it is within `--tolerance`. With `--peer` it
also prints the paired bootstrap interval of `API − peer` on the users both scored.

    python -m loadtest.score_api --bundle bundles/ml-100k --target http://127.0.0.1:8000 \\
        --out /tmp/api/per_user.json [--peer /tmp/recbole-peer/per_user.json]

The gateway must serve the same bundle, with the embeddings it published (`genrec serve
--bundle`), for the figures to match. Like `loadtest.load`, this only talks to a service on
this machine (loopback).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import httpx
import numpy as np
import typer

from loadtest.load import (
    REFUSED,
    REST_PATH,
    LoadError,
    RequestSpec,
    RestClient,
    require_loopback,
    rest_body,
)
from model_store.bundle import Bundle, BundleError, load_bundle
from model_store.eval_report import compare, served_figures
from model_store.evaluate import TOP_K, held_out
from model_store.recommend import unseen
from model_store.scores import (
    METRICS,
    PER_USER_FILE,
    PerUserScores,
    per_user_metrics,
    read_per_user,
    write_per_user,
)

RETRIES = 3


@dataclass(frozen=True)
class Answer:
    """One user's recommendations as the API returned them."""

    uris: list[str]
    served_by: str


async def fetch_one(client: httpx.AsyncClient, user_id: str, k: int) -> Answer:
    """The API's list for one user; a refusal (429, 503) or a dropped connection is tried
    again after a pause (the Retry-After it sent, else a growing one), anything else fails."""
    problem, retry_after = "", None
    for attempt in range(RETRIES + 1):
        try:
            r = await client.post(REST_PATH, json=rest_body(RequestSpec("known", user_id), k))
        except httpx.TransportError as e:
            problem, retry_after = f"{type(e).__name__}: {e}", None
        else:
            if r.status_code == 200:
                body = r.json()
                return Answer([item["uri"] for item in body["items"]], str(body["served_by"]))
            problem, retry_after = (
                f"HTTP {r.status_code}: {r.text[:200]}",
                r.headers.get("retry-after"),
            )
            if str(r.status_code) not in REFUSED:
                break
        if attempt < RETRIES:
            await asyncio.sleep(pause_s(retry_after, attempt))
    raise LoadError(f"user {user_id}: {problem}")


def pause_s(retry_after: str | None, attempt: int) -> float:
    """Seconds to wait before another try: the server's Retry-After when it gave seconds,
    else 0.5 s doubling per attempt."""
    try:
        return max(0.0, float(retry_after)) if retry_after else 0.5 * 2**attempt
    except ValueError:  # an HTTP date: not worth parsing for a pause this short
        return 0.5 * 2**attempt


async def fetch_all(
    client: httpx.AsyncClient, user_ids: list[str], k: int, concurrency: int
) -> dict[str, Answer]:
    """Every user's answer, `concurrency` requests in flight (a client, not a load test)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(user_id: str) -> Answer:
        async with gate:
            return await fetch_one(client, user_id, k)

    answers = await asyncio.gather(*(one(u) for u in user_ids))
    return dict(zip(user_ids, answers, strict=True))


async def score_api(
    bundle: Bundle,
    client: httpx.AsyncClient,
    *,
    name: str,
    concurrency: int = 4,
    max_users: int | None = None,
) -> PerUserScores:
    """The API's per-user scores over the bundle's test users (row `served`)."""
    held = held_out(bundle, max_users)
    answers = await fetch_all(client, held.user_ids, TOP_K, concurrency)
    item_of = {uri: i for i, uri in enumerate(bundle.catalog["uri"].astype(str))}
    unknown = sum(u not in item_of for a in answers.values() for u in a.uris)
    ranked = [
        unseen((item_of[u] for u in answers[user].uris if u in item_of), seen, TOP_K)
        for user, seen in zip(held.user_ids, held.seen, strict=True)
    ]
    meta = {
        "bundle": bundle.version,
        "k": TOP_K,
        "served_by": dict(Counter(a.served_by for a in answers.values())),
        "unknown_uris": unknown,
        # lists left under k after the history is cut (the gateway repeated consumed items)
        "short_lists": sum(len(r) < TOP_K for r in ranked),
    }
    return PerUserScores(
        name, held.user_ids, {"served": per_user_metrics(ranked, held.targets)}, meta
    )


def offline_served(eval_json: Path, users: list[str]) -> tuple[dict[str, float], str]:
    """The offline `served` figures over `users` (what the API was asked for), and where they
    come from: the per-user file beside `eval_json` when there is one, else its summary,
    which covers every test user (so only a run over all of them compares like with like)."""
    per_user_file = eval_json.with_name(PER_USER_FILE)
    if per_user_file.is_file():
        offline = read_per_user(per_user_file)
        index = {u: i for i, u in enumerate(offline.user_ids)}
        missing = [u for u in users if u not in index]
        if not missing:
            rows = np.array([index[u] for u in users], dtype=np.int64)
            served = offline.rows["served"]
            figures = {m: float(served[m][rows].mean()) for m in METRICS}
            return figures, f"{per_user_file}, the same {len(users)} users"
    summary = served_figures(json.loads(eval_json.read_text()))
    return summary, f"{eval_json} (every test user: compare runs over all of them)"


def comparison_lines(api: PerUserScores, offline: dict[str, float], tolerance: float) -> list[str]:
    """The API's figures beside the offline `served` row, and whether each is within
    `tolerance` of it."""
    lines = [f"{'metric':<8} {'API':>8} {'served':>8} {'API−served':>11}  within {tolerance}"]
    for m in METRICS:
        ours = float(api.rows["served"][m].mean())
        diff = ours - offline[m]
        ok = "yes" if abs(diff) <= tolerance else "NO"
        lines.append(f"{m:<8} {ours:8.4f} {offline[m]:8.4f} {diff:+11.4f}  {ok}")
    return lines


def peer_lines(api: PerUserScores, peer_file: Path) -> list[str]:
    """Paired bootstrap of `API − peer` (the same `compare` `genrec eval --peer` uses)."""
    result = compare(api, read_per_user(peer_file), str(peer_file))
    lines = [f"API − {result.name} on {result.users} paired users (95% paired bootstrap):"]
    for m, iv in result.intervals.items():
        lines.append(
            f"  {m:<8} {iv.mean:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}]  "
            f"excludes zero: {'yes' if iv.excludes_zero else 'no'}"
        )
    return lines


async def _run(
    bundle: Bundle,
    target: str,
    api_key: str | None,
    concurrency: int,
    max_users: int | None,
    timeout_s: float,
) -> PerUserScores:
    rest = RestClient(target, TOP_K, timeout_s, concurrency, api_key)
    try:
        await rest.ready()
        return await score_api(
            bundle,
            rest.client,
            name=f"REST API {target}",
            concurrency=concurrency,
            max_users=max_users,
        )
    finally:
        await rest.aclose()


app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0] if __doc__ else None)


@app.command()
def main(
    bundle: Annotated[Path, typer.Option(help="The bundle the gateway serves.")],
    out: Annotated[Path, typer.Option(help="The per-user score file to write.")],
    target: Annotated[str, typer.Option(help="REST base URL.")] = "http://127.0.0.1:8000",
    api_key: Annotated[
        str | None, typer.Option(envvar="GENREC_API_KEY", help="Sent as Bearer.")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight.", min=1)] = 4,
    max_users: Annotated[
        int | None, typer.Option(help="Only the first N test users.", min=1)
    ] = None,
    timeout: Annotated[float, typer.Option(help="Per-request timeout (s).", min=0.001)] = 30.0,
    eval_json: Annotated[
        Path | None, typer.Option(help="eval.json with the `served` row (default BUNDLE's).")
    ] = None,
    tolerance: Annotated[float, typer.Option(help="Allowed |API − served|.")] = 0.005,
    peer: Annotated[
        Path | None, typer.Option(help="A peer's per-user score file: API − peer interval.")
    ] = None,
) -> None:
    """Score the gateway's REST API under the evaluation protocol; write per-user scores."""
    try:
        require_loopback(target, "rest")
        loaded = load_bundle(bundle)
        scores = asyncio.run(_run(loaded, target, api_key, concurrency, max_users, timeout))
    except (LoadError, BundleError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    out.parent.mkdir(parents=True, exist_ok=True)
    write_per_user(out, scores)
    offline, source = offline_served(eval_json or bundle / "eval.json", scores.user_ids)
    meta = scores.meta
    typer.echo(
        f"{len(scores.user_ids)} users; served by {meta['served_by']}; lists under k={TOP_K} "
        f"after the history cut: {meta['short_lists']}; unknown URIs: {meta['unknown_uris']}"
    )
    typer.echo(f"served: {source}")
    typer.echo("\n".join(comparison_lines(scores, offline, tolerance)))
    if peer is not None:
        typer.echo("\n".join(peer_lines(scores, peer)))
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    app()
