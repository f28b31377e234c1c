"""Does steering work? Measured against a running service (loopback), over real users.

* steer precision: for playlist prompts naming a genre, the share of returned items of that
  genre, against the share of that genre in the same users' unprompted recommendations;
* forget: after a `forget` edit of a genre, how many returned items still have it (goal 0);
* more: the genre's share before and after a `more` edit;
* `/v1/playlists` latency at concurrency 1;
* plain language: for playlist prompts that name no genre word ("ghosts, monsters and
  things that go bump in the night"), the share of the genre they mean, per prompt;
* eras: for playlist prompts naming a decade ("movies from the 1970s"), the share of items
  released in it, per prompt.

    python -m loadtest.bench_steering --target http://127.0.0.1:8000 --bundle bundles/ml-100k \\
        --users 100 --out artifacts/steering.json

Edits made for the measurement are reset afterwards.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from model_store.bundle import load_bundle

GENRES = ("action", "comedy", "drama", "horror", "romance", "sci-fi", "thriller", "western",
          "documentary", "animation", "musical", "war", "crime", "children's")  # fmt: skip


PLAIN_LANGUAGE = (
    ("films that will make me laugh out loud", "comedy"),
    ("ghosts, monsters and things that go bump in the night", "horror"),
    ("a journey among the stars with space travel", "sci-fi"),
    ("gunslingers, saloons and the wild west", "western"),
    ("two people falling in love", "romance"),
    ("life in the trenches and on the front line", "war"),
    ("a whodunit with clues and suspects", "mystery"),
    ("a heist by a gang of criminals", "crime"),
    ("broadway show tunes", "musical"),
    ("magic, elves and enchanted kingdoms", "fantasy"),
    ("drawn and animated cartoons", "animation"),
    ("fistfights, shootouts and explosions", "action"),
    ("true events filmed as they happened, with interviews", "documentary"),
)
"""Prompts that name no genre word, and the genre each means. Written for the benchmark, apart
from the prompts the intent thresholds were chosen on (see `model_store.intent`)."""


ERAS = (
    ("movies from the 1970s", 1970),
    ("films from the 1980s", 1980),
    ("something from the nineties", 1990),
    ("1950s", 1950),
    ("a comedy from the 1960s", 1960),
    ("the 40s", 1940),
)
"""Prompts that name a decade, and the decade's first year."""


def meant_shares(
    client: httpx.Client,
    users: list[str],
    prompts: Sequence[tuple[str, Any]],
    meets: Callable[[str, Any], bool],
    length: int,
    path: str = "/v1/playlists",
) -> dict[str, dict[str, Any]]:
    """Per prompt: the share of each user's list (a playlist, or recommendations asked with
    the prompt) that `meets` what the prompt means."""
    size = "k" if path == "/v1/recommendations" else "length"
    out = {}
    for prompt, meant in prompts:
        shares = []
        for user in users:
            r = client.post(path, json={"user_id": user, "prompt": prompt, size: length})
            r.raise_for_status()
            items = r.json()["items"]
            shares.append(sum(meets(i["uri"], meant) for i in items) / max(1, len(items)))
        out[prompt] = {"meant": meant, "share": float(np.mean(shares)), "lists": len(shares)}
        print(f"  {out[prompt]['share']:.2f}  {meant!s:12s} {prompt!r}")
    return out


def share(items: list[dict[str, Any]], genre: str, genres_of: dict[str, list[str]]) -> float:
    return sum(genre in genres_of[i["uri"]] for i in items) / max(1, len(items))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="http://127.0.0.1:8000")
    parser.add_argument("--bundle", type=Path, default=Path("bundles/ml-100k"))
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--length", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--plain-users", type=int, default=20, help="Users per plain-language prompt."
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    genres_of = dict(zip(bundle.catalog["uri"], map(list, bundle.catalog["genres"]), strict=True))
    rng = np.random.default_rng(args.seed)
    ids = bundle.users["user_id"].astype(str).tolist()
    users = [ids[i] for i in rng.choice(len(ids), min(args.users, len(ids)), replace=False)]
    client = httpx.Client(base_url=args.target, timeout=30)

    def recs(user: str, k: int) -> list[dict[str, Any]]:
        r = client.post("/v1/recommendations", json={"user_id": user, "k": k})
        r.raise_for_status()
        return list(r.json()["items"])

    precision: dict[str, list[float]] = {g: [] for g in GENRES}
    baseline: dict[str, list[float]] = {g: [] for g in GENRES}
    latency: list[float] = []
    forget_left: list[int] = []
    more_before: list[float] = []
    more_after: list[float] = []
    for n, user in enumerate(users):
        plain = recs(user, args.length)
        genre = GENRES[n % len(GENRES)]
        start = time.perf_counter()
        r = client.post(
            "/v1/playlists", json={"user_id": user, "prompt": genre, "length": args.length}
        )
        latency.append((time.perf_counter() - start) * 1000)
        r.raise_for_status()
        precision[genre].append(share(r.json()["items"], genre, genres_of))
        baseline[genre].append(share(plain, genre, genres_of))
        # forget the genre the user is recommended most; then ask for more of a rarer one
        counts: dict[str, int] = {}
        for item in plain:
            for g in genres_of[item["uri"]]:
                counts[g] = counts.get(g, 0) + 1
        top = max(counts, key=counts.__getitem__)
        url = f"/v1/users/{user}/taste-profile"
        try:
            client.patch(url, json={"forget": {"genres": [top]}}).raise_for_status()
            forgot = recs(user, args.length)
            forget_left.append(sum(top in genres_of[i["uri"]] for i in forgot))
            rare = min((g for g in GENRES if g != top), key=lambda g: share(forgot, g, genres_of))
            more_before.append(share(forgot, rare, genres_of))
            client.patch(url, json={"more": {"genres": [rare]}}).raise_for_status()
            more_after.append(share(recs(user, args.length), rare, genres_of))
        finally:
            client.delete(f"{url}/edits").raise_for_status()
    per_genre = {
        g: {"prompted": float(np.mean(precision[g])), "unprompted": float(np.mean(baseline[g])),
            "requests": len(precision[g])}
        for g in GENRES if precision[g]
    }  # fmt: skip
    report = {
        "users": len(users),
        "length": args.length,
        "steer_precision": float(np.mean([v for g in GENRES for v in precision[g]])),
        "unprompted_share": float(np.mean([v for g in GENRES for v in baseline[g]])),
        "per_genre": per_genre,
        "forget_items_left": int(np.sum(forget_left)),
        "forget_requests": len(forget_left),
        "more_share_before": float(np.mean(more_before)),
        "more_share_after": float(np.mean(more_after)),
        "playlist_ms_p50": float(np.percentile(latency, 50)),
        "playlist_ms_p95": float(np.percentile(latency, 95)),
    }
    print(f"steer precision {report['steer_precision']:.3f} (unprompted share of the same "
          f"genres {report['unprompted_share']:.3f}) over {len(users)} users")  # fmt: skip
    for g, v in per_genre.items():
        print(f"  {g:12s} prompted {v['prompted']:.2f}  unprompted {v['unprompted']:.2f}")
    print(f"forget: {report['forget_items_left']} items of the forgotten genre in "
          f"{report['forget_requests']} lists; more: share {report['more_share_before']:.3f} → "
          f"{report['more_share_after']:.3f}")  # fmt: skip
    p50, p95 = report["playlist_ms_p50"], report["playlist_ms_p95"]
    print(f"/v1/playlists p50 {p50:.1f} ms, p95 {p95:.1f} ms (concurrency 1)")
    print("plain language (share of the meant genre in each playlist):")
    few = users[: args.plain_users]
    meant = meant_shares(
        client, few, PLAIN_LANGUAGE, lambda uri, g: g in genres_of[uri], args.length
    )
    report["plain_language"] = meant
    report["plain_language_share"] = float(np.mean([v["share"] for v in meant.values()]))
    print(f"plain-language share {report['plain_language_share']:.3f} over {len(meant)} prompts")
    year_of = dict(zip(bundle.catalog["uri"], bundle.catalog["year"], strict=True))
    for path in ("/v1/playlists", "/v1/recommendations"):
        print(f"eras, {path} (share of the list released in the decade named):")
        eras = meant_shares(
            client, few, ERAS, lambda uri, y: y <= year_of[uri] <= y + 9, args.length, path
        )
        report[f"eras {path}"] = eras
        mean = float(np.mean([v["share"] for v in eras.values()]))
        report[f"era_share {path}"] = mean
        print(f"era share {mean:.3f} over {len(eras)} prompts")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
