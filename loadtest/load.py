"""Load generator for the running gateway, over REST or gRPC.

Closed loop (`--concurrency N`) answers "how much can N callers push through"; open loop
(`--rate R`) answers "what does a caller see at R requests/s". In open loop each request's
latency counts from its *scheduled* send time, so a backlog (in the client or the server)
shows up as latency instead of silently lowering the send rate (coordinated omission).

The request mix imitates real traffic: known users (ids from the bundle), unknown users
(fresh ids: the prompt-only path), prompted requests (REST only) and next-episode requests
(a catalog item being played). Server-side figures come from two sources: each REST
response's `timings_ms`, and the difference of `/metrics` scraped before and after the run.

    python -m loadtest.load --target http://127.0.0.1:8000 --bundle bundles/ml-100k \\
        --concurrency 8 --duration 30 --out /tmp/load
    python -m loadtest.load --target 127.0.0.1:50051 --protocol grpc --bundle bundles/ml-100k \\
        --rate 20 --metrics-url http://127.0.0.1:8000/metrics --out /tmp/load-grpc

From Python (e.g. a benchmark comparing concurrency 1 and 8 in one process):
`run_load(target, bundle=..., concurrency=8, duration_s=20)` returns the report dict.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Protocol
from urllib.parse import urlsplit

import numpy as np
import typer

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
KINDS = ("known", "unknown", "prompted", "next_episode")
PROMPTS = (
    "something funny",
    "a dark thriller",
    "sci-fi adventure",
    "a romantic comedy",
    "feel-good family movie",
    "scary horror",
    "an animated film for kids",
    "a gritty war drama",
    "classic western",
    "a mind-bending mystery",
    "a musical",
    "documentary",
)
STAGE_ORDER = ("redis", "project", "generate", "rerank", "rules", "fallback", "total")
REST_PATH = "/v1/recommendations"


class LoadError(ValueError):
    """A bad target or configuration: the CLI prints it as one line and exits 2."""


class Transport(StrEnum):
    rest = "rest"
    grpc = "grpc"


# ---------------------------------------------------------------------------- targets


def target_host(target: str, protocol: str) -> str:
    """The host part of a REST URL or a gRPC target (`host:port`, `[::1]:port`, `dns:///…`)."""
    if protocol == Transport.rest:
        parts = urlsplit(target if "://" in target else f"http://{target}")
        if parts.scheme not in ("http", "https"):
            raise LoadError(f"REST target must be an http(s) URL, got {target!r}")
        host = parts.hostname or ""
    else:
        rest = target
        for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:"):
            if rest.startswith(prefix):
                rest = rest[len(prefix) :]
                break
        if "://" in rest or rest.startswith("unix:"):
            raise LoadError(f"gRPC target must be host:port, got {target!r}")
        if rest.count(":") > 1 and not rest.startswith("["):
            host = rest.lower()  # a bare IPv6 address without a port
        else:
            host = urlsplit(f"//{rest}").hostname or ""
    return host


def require_loopback(target: str, protocol: str) -> str:
    """Returns the host, or refuses: this tool only ever loads a service on this machine."""
    host = target_host(target, protocol)
    if host not in LOOPBACK_HOSTS:
        raise LoadError(
            f"refusing to send load to {target!r}: host {host or '(none)'!r} is not loopback "
            f"(allowed: {', '.join(sorted(LOOPBACK_HOSTS))})"
        )
    return host


# ---------------------------------------------------------------------------- request mix


@dataclass(frozen=True)
class Mix:
    """Relative shares of the request kinds (normalised; they need not sum to 1)."""

    known: float = 0.55
    unknown: float = 0.15
    prompted: float = 0.15
    next_episode: float = 0.15

    def shares(self, protocol: str = Transport.rest) -> dict[str, float]:
        """Normalised shares; gRPC has no prompt field, so prompted requests are dropped."""
        raw = asdict(self)
        if any(not math.isfinite(v) or v < 0 for v in raw.values()):
            raise LoadError(f"mix shares must be finite and >= 0, got {raw}")
        if protocol == Transport.grpc:
            raw["prompted"] = 0.0
        total = sum(raw.values())
        if total <= 0:
            raise LoadError("the request mix is empty: give at least one kind a positive share")
        return {k: raw[k] / total for k in KINDS}


@dataclass(frozen=True)
class RequestSpec:
    kind: str
    user_id: str
    prompt: str | None = None
    current_item: str | None = None


class UserMix:
    """Draws requests with the given shares from one seeded RNG, so runs are reproducible.

    `known` and `prompted` and `next_episode` requests use a known user; `unknown` ones a
    fresh id (`new-<n>`), which the gateway serves prompt-only.
    """

    def __init__(
        self,
        shares: Mapping[str, float],
        users: Sequence[str],
        uris: Sequence[str],
        seed: int = 0,
        prompts: Sequence[str] = PROMPTS,
    ) -> None:
        self.kinds = [k for k in KINDS if shares.get(k, 0.0) > 0]
        self.weights = [shares[k] for k in self.kinds]
        if not self.kinds:
            raise LoadError("the request mix is empty")
        if any(k != "unknown" for k in self.kinds) and not users:
            raise LoadError("known, prompted and next-episode requests need users (--bundle)")
        if "next_episode" in self.kinds and not uris:
            raise LoadError("next-episode requests need catalog URIs (--bundle)")
        if "prompted" in self.kinds and not prompts:
            raise LoadError("prompted requests need at least one prompt")
        self.users = list(users)
        self.uris = list(uris)
        self.prompts = list(prompts)
        self._rng = random.Random(seed)
        self._fresh = 0

    def sample(self) -> RequestSpec:
        rng = self._rng
        kind = rng.choices(self.kinds, self.weights)[0]
        if kind == "unknown":
            self._fresh += 1
            return RequestSpec(kind, f"new-{self._fresh}")
        user = rng.choice(self.users)
        if kind == "prompted":
            return RequestSpec(kind, user, prompt=rng.choice(self.prompts))
        if kind == "next_episode":
            return RequestSpec(kind, user, current_item=rng.choice(self.uris))
        return RequestSpec(kind, user)


@lru_cache(maxsize=4)
def population(bundle_dir: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(user ids, item URIs) of a bundle; cached because `load_bundle` verifies checksums."""
    from model_store.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(bundle_dir)
    except BundleError as e:
        raise LoadError(str(e)) from e
    users = tuple(bundle.users["user_id"].astype(str))
    uris = tuple(bundle.catalog["uri"].astype(str))
    return users, uris


def rest_body(spec: RequestSpec, k: int) -> dict[str, Any]:
    """The JSON body of `POST /v1/recommendations` (service.schemas.RecommendationRequest)."""
    body: dict[str, Any] = {"user_id": spec.user_id, "k": k}
    if spec.prompt is not None:
        body["prompt"] = spec.prompt
    if spec.current_item is not None:
        body["current_item"] = spec.current_item
        body["surface"] = "next-episode"
    return body


# ---------------------------------------------------------------------------- transports


@dataclass
class Outcome:
    """What one call returned, independent of the transport."""

    ok: bool
    status: str
    served_by: str | None = None
    degraded: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    retry_after: str | None = None  # what a refusal (503, 429) said about coming back


REFUSED = frozenset({"503", "429", "UNAVAILABLE", "RESOURCE_EXHAUSTED"})
"""Statuses of an overloaded or rate-limited gateway: the request was turned away at once."""


def refused(status: str, retry_after: str | None) -> bool:
    """Turned away by the gateway, not failed: gRPC's UNAVAILABLE is also what a client
    says of a server it cannot reach, and only the gateway's refusal says when to return."""
    return status in REFUSED and (status != "UNAVAILABLE" or retry_after is not None)


class Client(Protocol):
    async def __call__(self, spec: RequestSpec) -> Outcome: ...
    async def ready(self) -> None: ...
    async def aclose(self) -> None: ...


Send = Callable[[RequestSpec], Awaitable[Outcome]]


class RestClient:
    """httpx over keep-alive connections, as many as there can be requests in flight."""

    def __init__(
        self, base_url: str, k: int, timeout_s: float, connections: int, api_key: str | None = None
    ) -> None:
        import httpx

        self._httpx = httpx
        self.k = k
        self.client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
        )

    async def __call__(self, spec: RequestSpec) -> Outcome:
        try:
            r = await self.client.post(REST_PATH, json=rest_body(spec, self.k))
        except self._httpx.HTTPError as e:
            return Outcome(False, type(e).__name__, error=str(e)[:300] or type(e).__name__)
        if r.status_code != 200:
            retry = r.headers.get("retry-after")
            return Outcome(False, str(r.status_code), error=r.text[:300], retry_after=retry)
        try:
            data = r.json()
        except ValueError:
            return Outcome(False, "bad-json", error=r.text[:300])
        return Outcome(
            True,
            "200",
            served_by=data.get("served_by"),
            degraded=list(data.get("degraded") or []),
            timings_ms={k: float(v) for k, v in (data.get("timings_ms") or {}).items()},
        )

    async def ready(self) -> None:
        try:
            r = await self.client.get("/readyz")
        except self._httpx.HTTPError as e:
            raise LoadError(f"service not reachable at {self.client.base_url}: {e!r}") from e
        if r.status_code != 200:
            raise LoadError(f"service not ready: GET /readyz answered {r.status_code}")

    async def aclose(self) -> None:
        await self.client.aclose()


class SpreadClient:
    """Several gateways as one target, each request to the next in turn: what a Service in
    front of several gateway pods does, for a load test on one machine."""

    def __init__(self, clients: Sequence[Client]) -> None:
        if not clients:
            raise LoadError("no gateways to spread the load over")
        self.clients = list(clients)
        self._turn = itertools.cycle(self.clients)

    async def __call__(self, spec: RequestSpec) -> Outcome:
        return await next(self._turn)(spec)

    async def ready(self) -> None:
        for client in self.clients:
            await client.ready()

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


class GrpcClient:
    """One grpc.aio channel (HTTP/2 multiplexes every in-flight call on it)."""

    def __init__(self, target: str, k: int, timeout_s: float, api_key: str | None = None) -> None:
        import grpc

        from service.proto import next_episode_pb2 as pb
        from service.proto import next_episode_pb2_grpc as pb_grpc

        self._grpc = grpc
        self._pb = pb
        self.target = target
        self.k = k
        self.timeout_s = timeout_s
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.NextEpisodeStub(self.channel)

    async def __call__(self, spec: RequestSpec) -> Outcome:
        request = self._pb.NextRequest(
            user_id=spec.user_id, current_item_uri=spec.current_item or "", k=self.k
        )
        try:
            resp = await self.stub.Next(request, timeout=self.timeout_s, metadata=self.metadata)
        except self._grpc.aio.AioRpcError as e:
            retry = dict(e.trailing_metadata() or ()).get("retry-after")
            return Outcome(False, e.code().name, error=(e.details() or "")[:300], retry_after=retry)
        return Outcome(True, "OK", served_by=resp.served_by, degraded=list(resp.degraded))

    async def ready(self) -> None:
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout=self.timeout_s)
        except TimeoutError as e:
            raise LoadError(f"gRPC service not reachable at {self.target}") from e

    async def aclose(self) -> None:
        await self.channel.close()


# ---------------------------------------------------------------------------- load loops


@dataclass
class Record:
    """One request. Times are seconds from the phase start; latencies milliseconds.

    `latency_ms` counts from the scheduled send (open loop) or the actual send (closed
    loop, where they coincide); `service_ms` always from the actual send.
    """

    kind: str
    user_id: str
    scheduled_s: float
    sent_s: float
    latency_ms: float
    service_ms: float
    ok: bool
    status: str
    served_by: str | None
    degraded: list[str]
    timings_ms: dict[str, float]
    error: str | None
    retry_after: str | None = None


def _record(
    spec: RequestSpec, out: Outcome, start: float, scheduled: float, sent: float, done: float
) -> Record:
    return Record(
        kind=spec.kind,
        user_id=spec.user_id,
        scheduled_s=scheduled - start,
        sent_s=sent - start,
        latency_ms=(done - scheduled) * 1000.0,
        service_ms=(done - sent) * 1000.0,
        ok=out.ok,
        status=out.status,
        served_by=out.served_by,
        degraded=out.degraded,
        timings_ms=out.timings_ms,
        error=out.error,
        retry_after=out.retry_after,
    )


async def closed_loop(
    send: Send,
    mix: UserMix,
    concurrency: int,
    duration_s: float,
    max_requests: int | None = None,
) -> tuple[list[Record], float]:
    """N workers, each sending its next request when the previous one answers.

    Stops issuing at `duration_s` or after `max_requests` issued, whichever first; waits for
    the calls in flight. Returns the records and the elapsed time to the last answer.
    """
    if concurrency < 1:
        raise LoadError("concurrency must be >= 1")
    records: list[Record] = []
    start = time.perf_counter()
    end = start + duration_s
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while time.perf_counter() < end and (max_requests is None or issued < max_requests):
            issued += 1
            spec = mix.sample()
            sent = time.perf_counter()
            out = await send(spec)
            records.append(_record(spec, out, start, sent, sent, time.perf_counter()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records, time.perf_counter() - start


async def open_loop(
    send: Send,
    mix: UserMix,
    rate: float,
    duration_s: float,
    max_requests: int | None = None,
) -> tuple[list[Record], float]:
    """Arrivals at fixed times `i / rate`, whatever the answers do; latency from schedule."""
    if not (rate > 0 and math.isfinite(rate)):
        raise LoadError("rate must be > 0 requests/s")
    if math.isfinite(duration_s):
        n = max(1, math.ceil(rate * duration_s - 1e-9))
        if max_requests is not None:
            n = min(n, max_requests)
    elif max_requests is not None:
        n = max_requests
    else:
        raise LoadError("an open loop needs a finite duration or max_requests")
    records: list[Record] = []
    start = time.perf_counter()

    async def one(spec: RequestSpec, scheduled: float) -> None:
        sent = time.perf_counter()
        out = await send(spec)
        records.append(_record(spec, out, start, scheduled, sent, time.perf_counter()))

    tasks: list[asyncio.Task[None]] = []
    for i in range(n):
        spec = mix.sample()
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(spec, scheduled)))
    await asyncio.gather(*tasks)
    return records, time.perf_counter() - start


# ---------------------------------------------------------------------------- report


def percentiles(values: Iterable[float], qs: Sequence[int] = (50, 95, 99)) -> dict[str, Any]:
    """p<q> (linear interpolation), max and mean; None for every field when empty."""
    arr = np.asarray(list(values), dtype=float)
    keys = [f"p{q}" for q in qs] + ["max", "mean"]
    if arr.size == 0:
        return dict.fromkeys(keys)
    found = [float(v) for v in np.percentile(arr, list(qs))] + [arr.max(), arr.mean()]
    return {key: round(float(v), 3) for key, v in zip(keys, found, strict=True)}


def _ordered_stages(names: Iterable[str]) -> list[str]:
    names = set(names)
    return [s for s in STAGE_ORDER if s in names] + sorted(names - set(STAGE_ORDER))


def summarize(records: Sequence[Record], duration_s: float) -> dict[str, Any]:
    """The client-side report. Latency percentiles are over ok answers only: a fast 4xx
    would flatter them; errors count in `error_rate` instead."""
    ok = [r for r in records if r.ok]
    n = len(records)
    stages = _ordered_stages(s for r in ok for s in r.timings_ms)
    stage_report = {}
    for stage in stages:
        values = [r.timings_ms[stage] for r in ok if stage in r.timings_ms]
        stage_report[stage] = {**percentiles(values, (50, 95)), "n": len(values)}
    generated = [r for r in ok if "generate" in r.timings_ms]
    overhead = [r.service_ms - r.timings_ms["generate"] for r in generated]
    in_server = [r for r in ok if "total" in r.timings_ms]
    transport = [r.service_ms - r.timings_ms["total"] for r in in_server]
    errors = [r for r in records if not r.ok]
    turned_away = [r for r in errors if refused(r.status, r.retry_after)]
    return {
        "requests": n,
        "ok": len(ok),
        "errors": len(errors),
        "error_rate": round(len(errors) / n, 4) if n else None,
        "duration_s": round(duration_s, 3),
        "throughput_rps": round(len(ok) / duration_s, 3) if duration_s > 0 else None,
        "sent_rps": round(n / duration_s, 3) if duration_s > 0 else None,
        "latency_ms": percentiles(r.latency_ms for r in ok),
        "service_ms": percentiles(r.service_ms for r in ok),
        "served_by": dict(Counter(r.served_by or "?" for r in ok).most_common()),
        "degraded": dict(Counter(d for r in ok for d in r.degraded).most_common()),
        "kinds": dict(Counter(r.kind for r in records).most_common()),
        "status": dict(Counter(r.status for r in records).most_common()),
        "refused": {
            "share": round(len(turned_away) / n, 4) if n else None,
            "with_retry_after": sum(r.retry_after is not None for r in turned_away),
            "latency_ms": percentiles(r.latency_ms for r in turned_away),
        },
        "latency_by_kind_ms": {
            kind: percentiles((r.latency_ms for r in ok if r.kind == kind), (50, 95))
            for kind in KINDS
            if any(r.kind == kind for r in ok)
        },
        "stages_ms": stage_report,
        "gateway_overhead_ms": {**percentiles(overhead, (50, 95)), "n": len(overhead)},
        "transport_overhead_ms": {**percentiles(transport, (50, 95)), "n": len(transport)},
        "error_samples": [
            {"kind": r.kind, "user_id": r.user_id, "status": r.status, "error": r.error}
            for r in errors[:5]
        ],
    }


# ---------------------------------------------------------------------------- /metrics


SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def parse_samples(text: str) -> dict[SampleKey, float]:
    """Every sample of a Prometheus text exposition, keyed by (sample name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[SampleKey, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def server_diff(before: str, after: str) -> dict[str, Any]:
    """What the server observed between two scrapes: mean time per stage and mean engine
    batch size (from histogram _sum/_count deltas), and the fallbacks counted."""
    b, a = parse_samples(before), parse_samples(after)

    def delta(name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
        return a.get((name, labels), 0.0) - b.get((name, labels), 0.0)

    def by_label(name: str, label: str) -> dict[str, float]:
        found = {}
        for sample, labels in a:
            if sample == name:
                d = delta(sample, labels)
                if d != 0:
                    found[dict(labels).get(label, "")] = d
        return found

    stage_count = by_label("genrec_stage_seconds_count", "stage")
    stage_sum = by_label("genrec_stage_seconds_sum", "stage")
    stages = {
        stage: {"count": int(count), "mean_ms": round(stage_sum.get(stage, 0.0) / count * 1e3, 3)}
        for stage, count in sorted(stage_count.items(), key=lambda kv: _stage_rank(kv[0]))
        if count > 0
    }
    batches = delta("genrec_engine_batch_requests_count")
    batched = delta("genrec_engine_batch_requests_sum")
    queued = delta("genrec_engine_queue_seconds_count")
    queue_sum = delta("genrec_engine_queue_seconds_sum")
    reset = any(v < 0 for v in (*stage_count.values(), batches, queued))
    return {
        "stage_mean_ms": stages,
        "engine_batches": int(batches),
        "engine_batch_mean_requests": round(batched / batches, 3) if batches > 0 else None,
        "engine_queue_mean_ms": round(queue_sum / queued * 1e3, 3) if queued > 0 else None,
        "served": {k: int(v) for k, v in by_label("genrec_served_total", "path").items()},
        "fallbacks": {k: int(v) for k, v in by_label("genrec_fallbacks_total", "reason").items()},
        "counter_reset": reset,
    }


def _stage_rank(stage: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER), stage)


async def scrape(url: str, timeout_s: float = 5.0) -> str:
    import httpx

    async with httpx.AsyncClient(timeout=timeout_s) as client:
        r = await client.get(url)
        r.raise_for_status()
        return r.text


# ---------------------------------------------------------------------------- outputs


def plot_cdf(records: Sequence[Record], path: Path, title: str) -> None:
    """Latency CDF of ok answers, overall and per request kind (log-scaled x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: list[tuple[str, list[float]]] = [("all", [r.latency_ms for r in records if r.ok])]
    groups += [(k, [r.latency_ms for r in records if r.ok and r.kind == k]) for k in KINDS]
    for label, values in groups:
        if not values:
            continue
        xs = np.sort(np.asarray(values))
        ys = np.arange(1, len(xs) + 1) / len(xs)
        ax.step(xs, ys, where="post", label=f"{label} (n={len(xs)})", lw=2 if label == "all" else 1)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of ok answers ≤ x")
    ax.set_ylim(0, 1.02)
    for q in (0.5, 0.95, 0.99):
        ax.axhline(q, color="grey", lw=0.5, ls=":")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: Mapping[str, Any], records: Sequence[Record], out_dir: Path) -> None:
    """load.json (the report), requests.jsonl (one line per measured request), the CDF."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "load.json").write_text(json.dumps(report, indent=2) + "\n")
    with (out_dir / "requests.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(asdict(r)) + "\n")
    cfg = report.get("config", {})
    mode = f"concurrency {cfg['concurrency']}" if cfg.get("concurrency") else f"{cfg.get('rate')}/s"
    plot_cdf(records, out_dir / "latency_cdf.png", f"{cfg.get('protocol', '')} · {mode}")


def print_report(report: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    cfg = report["config"]
    mode = (
        f"closed loop, concurrency {cfg['concurrency']}"
        if cfg["concurrency"]
        else f"open loop, {cfg['rate']} req/s"
    )
    lat = report["latency_ms"]
    main = Table(title=f"{cfg['protocol']} {cfg['target']} · {mode}", show_header=False)
    main.add_column(justify="left")
    main.add_column(justify="right")
    rows = [
        ("requests (warmup excluded)", f"{report['requests']} ({report['warmup_requests']})"),
        ("duration", f"{report['duration_s']:.2f} s"),
        ("throughput (ok/s)", _fmt(report["throughput_rps"])),
        ("error rate", _fmt(report["error_rate"])),
        ("latency p50 / p95 / p99 / max (ms)", " / ".join(_fmt(lat[k]) for k in _PCTS)),
        ("served_by", ", ".join(f"{k} {v}" for k, v in report["served_by"].items()) or "-"),
        ("degraded", ", ".join(f"{k} {v}" for k, v in report["degraded"].items()) or "-"),
        ("status", ", ".join(f"{k} {v}" for k, v in report["status"].items()) or "-"),
        (
            "refused (503/429): share, with Retry-After",
            f"{_fmt(report['refused']['share'])}, {report['refused']['with_retry_after']}",
        ),
    ]
    for row in rows:
        main.add_row(*row)
    console.print(main)

    stages = Table(title="stages (ms)")
    for col in ("stage", "p50", "p95", "n", "server mean"):
        stages.add_column(col, justify="right" if col != "stage" else "left")
    server = report.get("server") or {}
    means = server.get("stage_mean_ms", {})
    names = _ordered_stages([*report["stages_ms"], *means])
    for stage in names:
        s = report["stages_ms"].get(stage, {})
        mean = means.get(stage, {}).get("mean_ms")
        cells = (_fmt(s.get("p50")), _fmt(s.get("p95")), str(s.get("n", "-")), _fmt(mean))
        stages.add_row(stage, *cells)
    overheads = (
        ("gateway_overhead_ms", "latency − generate"),
        ("transport_overhead_ms", "latency − server total"),
    )
    for key, label in overheads:
        s = report[key]
        stages.add_row(label, _fmt(s["p50"]), _fmt(s["p95"]), str(s["n"]), "")
    console.print(stages)
    if "error" in server:
        console.print(f"[yellow]/metrics: {server['error']}[/yellow]")
    elif server:
        console.print(
            f"engine: {server['engine_batches']} batches, mean "
            f"{_fmt(server['engine_batch_mean_requests'])} requests per batch, mean queue "
            f"{_fmt(server['engine_queue_mean_ms'])} ms; mean latency − mean generate "
            f"{_fmt(server['gateway_overhead_mean_ms'])} ms"
        )
        fallbacks = ", ".join(f"{k} {v}" for k, v in server["fallbacks"].items())
        console.print(f"server fallbacks during the run: {fallbacks or '-'}")
    for e in report["error_samples"]:
        console.print(f"[red]error[/red] {e['status']} ({e['kind']}, {e['user_id']}): {e['error']}")


_PCTS = ("p50", "p95", "p99", "max")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) and abs(v) < 1 else f"{v:.1f}"


# ---------------------------------------------------------------------------- entry points


async def run_load_async(
    target: str,
    *,
    protocol: str = Transport.rest,
    concurrency: int | None = None,
    rate: float | None = None,
    duration_s: float = 30.0,
    max_requests: int | None = None,
    warmup_s: float = 2.0,
    mix: Mix | None = None,
    bundle: Path | None = None,
    users: Sequence[str] | None = None,
    uris: Sequence[str] | None = None,
    seed: int = 0,
    k: int = 10,
    timeout_s: float = 10.0,
    metrics_url: str | None = None,
    out_dir: Path | None = None,
    client: Client | None = None,
    api_key: str | None = None,
    spread_over: Sequence[str] = (),
) -> dict[str, Any]:
    """One load run; see `run_load`. `client` replaces the transport (for tests);
    `spread_over` are more gateways that share the load with `target`, a request each in
    turn (`SpreadClient`)."""
    protocol = Transport(protocol)
    if (concurrency is None) == (rate is None):
        raise LoadError("give exactly one of concurrency (closed loop) or rate (open loop)")
    if duration_s <= 0 and max_requests is None:
        raise LoadError("duration must be > 0")
    targets = [target, *spread_over]
    for each in targets:
        require_loopback(each, protocol)
    if metrics_url:
        require_loopback(metrics_url, Transport.rest)
    if bundle is not None and (users is None or uris is None):
        b_users, b_uris = population(Path(bundle))
        users = b_users if users is None else users
        uris = b_uris if uris is None else uris
    sampler = UserMix((mix or Mix()).shares(protocol), users or (), uris or (), seed)

    if client is None:
        in_flight = concurrency or max(64, math.ceil((rate or 1.0) * timeout_s))
        clients: list[Client] = [
            RestClient(each, k, timeout_s, in_flight, api_key)
            if protocol == Transport.rest
            else GrpcClient(each, k, timeout_s, api_key)
            for each in targets
        ]
        client = clients[0] if len(clients) == 1 else SpreadClient(clients)
    duration = duration_s if duration_s > 0 else math.inf

    async def phase(seconds: float, limit: int | None) -> tuple[list[Record], float]:
        assert client is not None
        if concurrency is not None:
            return await closed_loop(client, sampler, concurrency, seconds, limit)
        assert rate is not None
        return await open_loop(client, sampler, rate, seconds, limit)

    before = after = None
    metrics_error = None
    try:
        await client.ready()
        warm: list[Record] = []
        if warmup_s > 0:
            warm, _ = await phase(warmup_s, None)
        if metrics_url:
            try:
                before = await scrape(metrics_url)
            except Exception as e:  # the run still means something without /metrics
                metrics_error = f"scrape before the run failed: {e!r}"
        started = time.time()
        records, elapsed = await phase(duration, max_requests)
        if metrics_url and before is not None:
            try:
                after = await scrape(metrics_url)
            except Exception as e:
                metrics_error = f"scrape after the run failed: {e!r}"
    finally:
        await client.aclose()

    report: dict[str, Any] = {
        "config": {
            "target": target,
            "spread_over": list(spread_over),
            "protocol": protocol.value,
            "concurrency": concurrency,
            "rate": rate,
            "duration_s": duration_s,
            "max_requests": max_requests,
            "warmup_s": warmup_s,
            "mix": sampler_shares(sampler),
            "seed": seed,
            "k": k,
            "timeout_s": timeout_s,
            "metrics_url": metrics_url,
            "bundle": str(bundle) if bundle is not None else None,
            "started_at": started,
        },
        "warmup_requests": len(warm),
        **summarize(records, elapsed),
    }
    if before is not None and after is not None:
        report["server"] = server_diff(before, after)
        generate = report["server"]["stage_mean_ms"].get("generate", {}).get("mean_ms")
        mean = report["service_ms"]["mean"]
        # gRPC answers carry no timings: mean latency − mean server generate is what it has
        report["server"]["gateway_overhead_mean_ms"] = (
            round(mean - generate, 3) if mean is not None and generate is not None else None
        )
    elif metrics_url:
        report["server"] = {"error": metrics_error}
    else:
        report["server"] = None
    if out_dir is not None:
        write_outputs(report, records, Path(out_dir))
    return report


def sampler_shares(sampler: UserMix) -> dict[str, float]:
    return {k: round(w, 4) for k, w in zip(sampler.kinds, sampler.weights, strict=True)}


def run_load(target: str, **kwargs: Any) -> dict[str, Any]:
    """Runs one load test in a fresh event loop and returns the report dict (as in
    load.json). Keyword arguments as `run_load_async`; the bundle's ids are cached, so
    repeated calls (concurrency 1, then 8) only pay for loading it once."""
    return asyncio.run(run_load_async(target, **kwargs))


app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0] if __doc__ else None)


@app.command()
def main(
    target: Annotated[
        str | None,
        typer.Option(help="REST base URL or gRPC host:port (default: 127.0.0.1:8000 / :50051)."),
    ] = None,
    protocol: Annotated[Transport, typer.Option(help="rest or grpc.")] = Transport.rest,
    bundle: Annotated[
        Path | None, typer.Option(help="Bundle: known user ids and catalog URIs.")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Closed loop: this many workers.", min=1)
    ] = None,
    rate: Annotated[float | None, typer.Option(help="Open loop: requests/s.", min=0.001)] = None,
    duration: Annotated[
        float, typer.Option(help="Measured seconds (after warmup).", min=0.001)
    ] = 30.0,
    max_requests: Annotated[
        int | None, typer.Option(help="Stop after this many measured requests.", min=1)
    ] = None,
    warmup: Annotated[
        float, typer.Option(help="Seconds of uncounted requests first.", min=0)
    ] = 2.0,
    known: Annotated[float, typer.Option(help="Share: known users.")] = Mix.known,
    unknown: Annotated[float, typer.Option(help="Share: unknown users.")] = Mix.unknown,
    prompted: Annotated[float, typer.Option(help="Share: prompted (REST only).")] = Mix.prompted,
    next_episode: Annotated[
        float, typer.Option(help="Share: next-episode requests.")
    ] = Mix.next_episode,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    k: Annotated[int, typer.Option(help="Items per request.", min=1, max=100)] = 10,
    timeout: Annotated[float, typer.Option(help="Per-request timeout (s).", min=0.001)] = 10.0,
    metrics_url: Annotated[
        str | None,
        typer.Option(help="Prometheus URL (default: TARGET/metrics for REST, none for gRPC)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Directory for load.json and the CDF.")] = Path(
        "artifacts/load"
    ),
    api_key: Annotated[
        str | None, typer.Option(envvar="GENREC_API_KEY", help="Sent as Bearer (REST, gRPC).")
    ] = None,
) -> None:
    """Send load to a local gateway and report latency, throughput and stage timings."""
    if target is None:
        target = "http://127.0.0.1:8000" if protocol == Transport.rest else "127.0.0.1:50051"
    if metrics_url is None and protocol == Transport.rest:
        metrics_url = target.rstrip("/") + "/metrics"
    if concurrency is None and rate is None:
        concurrency = 1
    try:
        report = run_load(
            target,
            protocol=protocol,
            concurrency=concurrency,
            rate=rate,
            duration_s=duration,
            max_requests=max_requests,
            warmup_s=warmup,
            mix=Mix(known, unknown, prompted, next_episode),
            bundle=bundle,
            seed=seed,
            k=k,
            timeout_s=timeout,
            metrics_url=metrics_url or None,
            out_dir=out,
            api_key=api_key,
        )
    except LoadError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    print_report(report)
    typer.echo(f"wrote {out / 'load.json'}, {out / 'latency_cdf.png'}, {out / 'requests.jsonl'}")
    if report["ok"] == 0:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
