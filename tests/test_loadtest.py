"""The load generator's pure parts: no service needed (a fake client stands in for one)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest.bench_throughput import parse_variant
from loadtest.load import (
    KINDS,
    LoadError,
    Mix,
    Outcome,
    Record,
    RequestSpec,
    SpreadClient,
    UserMix,
    closed_loop,
    open_loop,
    parse_samples,
    percentiles,
    require_loopback,
    rest_body,
    run_load,
    server_diff,
    summarize,
)

USERS = [str(u) for u in range(1, 51)]
URIS = [f"ml-100k:movie:{i}" for i in range(1, 31)]


def _record(kind: str, latency: float, *, ok: bool = True, **kw: object) -> Record:
    fields: dict = {
        "kind": kind,
        "user_id": "1",
        "scheduled_s": 0.0,
        "sent_s": 0.0,
        "latency_ms": latency,
        "service_ms": latency,
        "ok": ok,
        "status": "200" if ok else "503",
        "served_by": "generative" if ok else None,
        "degraded": [],
        "timings_ms": {},
        "error": None if ok else "boom",
    }
    fields.update(kw)
    return Record(**fields)


# ---------------------------------------------------------------------------- loopback


@pytest.mark.parametrize(
    ("target", "protocol"),
    [
        ("http://127.0.0.1:8000", "rest"),
        ("http://localhost:8000/", "rest"),
        ("http://[::1]:8000", "rest"),
        ("127.0.0.1:8000", "rest"),
        ("127.0.0.1:50051", "grpc"),
        ("localhost:50051", "grpc"),
        ("[::1]:50051", "grpc"),
        ("dns:///localhost:50051", "grpc"),
        ("ipv4:127.0.0.1:50051", "grpc"),
    ],
)
def test_loopback_targets_pass(target: str, protocol: str) -> None:
    assert require_loopback(target, protocol) in {"127.0.0.1", "localhost", "::1"}


@pytest.mark.parametrize(
    ("target", "protocol"),
    [
        ("http://10.0.0.5:8000", "rest"),
        ("https://example.com", "rest"),
        ("http://127.0.0.1.evil.com:8000", "rest"),
        ("http://user@example.com:8000", "rest"),
        ("http://0.0.0.0:8000", "rest"),
        ("ftp://127.0.0.1/", "rest"),
        ("http://:8000", "rest"),
        ("192.168.1.2:50051", "grpc"),
        ("dns:///api.example.com:443", "grpc"),
        ("example.com:50051", "grpc"),
        ("unix:/tmp/sock", "grpc"),
    ],
)
def test_non_loopback_targets_refused(target: str, protocol: str) -> None:
    with pytest.raises(LoadError, match=r"refusing|must be"):
        require_loopback(target, protocol)


def test_run_load_refuses_remote_target_before_sending() -> None:
    with pytest.raises(LoadError, match="not loopback"):
        run_load("http://10.1.2.3:8000", concurrency=1, duration_s=1, mix=Mix(0, 1, 0, 0))
    with pytest.raises(LoadError, match="not loopback"):
        run_load(
            "http://127.0.0.1:8000",
            concurrency=1,
            duration_s=1,
            mix=Mix(0, 1, 0, 0),
            metrics_url="http://10.1.2.3:8000/metrics",
        )


# ---------------------------------------------------------------------------- user mix


shares_st = st.tuples(*[st.integers(0, 10) for _ in KINDS]).filter(lambda t: sum(t) > 0)


@settings(max_examples=25, deadline=None)
@given(weights=shares_st, seed=st.integers(0, 2**32 - 1))
def test_sampler_follows_the_shares(weights: tuple[int, ...], seed: int) -> None:
    shares = Mix(*map(float, weights)).shares("rest")
    sampler = UserMix(shares, USERS, URIS, seed)
    n = 3000
    specs = [sampler.sample() for _ in range(n)]
    for kind in KINDS:
        p = shares[kind]
        seen = sum(s.kind == kind for s in specs) / n
        # 5 standard deviations of a binomial share, plus a little slack for p near 0 or 1
        assert abs(seen - p) <= 5 * (p * (1 - p) / n) ** 0.5 + 1e-9, (kind, seen, p)
    for s in specs:
        if s.kind == "unknown":
            assert s.user_id.startswith("new-") and s.user_id not in USERS
        else:
            assert s.user_id in USERS
        assert (s.prompt is not None) == (s.kind == "prompted")
        assert (s.current_item is not None) == (s.kind == "next_episode")
        assert s.current_item is None or s.current_item in URIS
    unknown_ids = [s.user_id for s in specs if s.kind == "unknown"]
    assert len(set(unknown_ids)) == len(unknown_ids)


def test_sampler_is_seeded() -> None:
    shares = Mix().shares()
    first, second = UserMix(shares, USERS, URIS, 7), UserMix(shares, USERS, URIS, 7)
    assert [first.sample() for _ in range(200)] == [second.sample() for _ in range(200)]


def test_grpc_mix_drops_prompts_and_renormalises() -> None:
    shares = Mix(known=1, unknown=1, prompted=2, next_episode=0).shares("grpc")
    assert shares == {"known": 0.5, "unknown": 0.5, "prompted": 0.0, "next_episode": 0.0}
    with pytest.raises(LoadError, match="empty"):
        Mix(0, 0, 1, 0).shares("grpc")
    with pytest.raises(LoadError, match=">= 0"):
        Mix(-1, 1, 0, 0).shares()


def test_sampler_needs_a_bundle_for_known_users() -> None:
    with pytest.raises(LoadError, match="--bundle"):
        UserMix(Mix().shares(), [], URIS)
    with pytest.raises(LoadError, match="URIs"):
        UserMix(Mix(0, 0, 0, 1).shares(), USERS, [])
    only_new = UserMix(Mix(0, 1, 0, 0).shares(), [], [])
    assert [only_new.sample().user_id for _ in range(3)] == ["new-1", "new-2", "new-3"]


def test_rest_body_matches_the_request_schema() -> None:
    from service.schemas import RecommendationRequest

    for spec in (
        RequestSpec("known", "196"),
        RequestSpec("unknown", "new-12"),
        RequestSpec("prompted", "7", prompt="a dark thriller"),
        RequestSpec("next_episode", "7", current_item="ml-100k:movie:242"),
    ):
        body = rest_body(spec, 10)
        RecommendationRequest.model_validate(body)  # raises if a field is off
        assert body["user_id"] == spec.user_id


# ---------------------------------------------------------------------------- report


def test_percentiles_hand_computed() -> None:
    got = percentiles(range(1, 101))
    # numpy's linear interpolation: position q/100 * (n - 1) on the sorted values
    assert got == {"p50": 50.5, "p95": 95.05, "p99": 99.01, "max": 100.0, "mean": 50.5}
    assert percentiles([7.0], (50, 95)) == {"p50": 7.0, "p95": 7.0, "max": 7.0, "mean": 7.0}
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}


def test_summary_counts_rates_and_stages() -> None:
    t = {"redis": 1.0, "project": 0.5, "generate": 20.0, "rerank": 2.0, "rules": 0.2}
    records = [
        _record("known", 30.0, service_ms=30.0, timings_ms={**t, "total": 25.0}),
        _record("known", 40.0, service_ms=40.0, timings_ms={**t, "generate": 30.0, "total": 35.0}),
        _record(
            "unknown",
            10.0,
            served_by="popularity",
            degraded=["engine_deadline"],
            timings_ms={"fallback": 1.0, "total": 4.0},
        ),
        _record("prompted", 5.0, ok=False),
    ]
    rep = summarize(records, duration_s=2.0)
    assert rep["requests"] == 4 and rep["ok"] == 3 and rep["errors"] == 1
    assert rep["error_rate"] == 0.25
    assert rep["throughput_rps"] == 1.5 and rep["sent_rps"] == 2.0
    # ok answers only: 10, 30, 40
    assert rep["latency_ms"]["p50"] == 30.0 and rep["latency_ms"]["max"] == 40.0
    assert rep["served_by"] == {"generative": 2, "popularity": 1}
    assert rep["degraded"] == {"engine_deadline": 1}
    assert rep["status"] == {"200": 3, "503": 1}
    assert rep["kinds"] == {"known": 2, "unknown": 1, "prompted": 1}
    stages = ["redis", "project", "generate", "rerank", "rules", "fallback", "total"]
    assert list(rep["stages_ms"]) == stages
    generate = {"p50": 25.0, "p95": 29.5, "max": 30.0, "mean": 25.0, "n": 2}
    assert rep["stages_ms"]["generate"] == generate
    assert rep["stages_ms"]["fallback"]["n"] == 1
    # latency − generate: 30 − 20 = 10 and 40 − 30 = 10; the fallback answer has no generate
    assert rep["gateway_overhead_ms"]["p50"] == 10.0 and rep["gateway_overhead_ms"]["n"] == 2
    # latency − server total: 5, 5, 6
    assert rep["transport_overhead_ms"]["p50"] == 5.0 and rep["transport_overhead_ms"]["n"] == 3
    assert rep["error_samples"][0]["status"] == "503"
    assert rep["refused"]["share"] == 0.25 and rep["refused"]["with_retry_after"] == 0
    assert rep["refused"]["latency_ms"]["p50"] == 5.0
    json.dumps(rep)  # JSON-ready


def test_refusals_are_counted_with_their_retry_after() -> None:
    records = [
        _record("known", 30.0),
        _record("known", 2.0, ok=False, retry_after="2"),
        _record("known", 1.0, ok=False, status="429", retry_after="1"),
        _record("known", 900.0, ok=False, status="ReadTimeout"),
    ]
    rep = summarize(records, duration_s=1.0)
    assert rep["refused"]["share"] == 0.5 and rep["refused"]["with_retry_after"] == 2
    assert rep["refused"]["latency_ms"]["max"] == 2.0


def test_summary_of_nothing() -> None:
    rep = summarize([], duration_s=0.0)
    assert rep["requests"] == 0 and rep["error_rate"] is None and rep["throughput_rps"] is None
    assert rep["latency_ms"]["p99"] is None and rep["stages_ms"] == {}


# ---------------------------------------------------------------------------- /metrics

BEFORE = """\
# HELP genrec_stage_seconds Time per pipeline stage.
# TYPE genrec_stage_seconds histogram
genrec_stage_seconds_bucket{le="0.01",stage="generate"} 1.0
genrec_stage_seconds_bucket{le="+Inf",stage="generate"} 2.0
genrec_stage_seconds_count{stage="generate"} 2.0
genrec_stage_seconds_sum{stage="generate"} 0.05
genrec_stage_seconds_bucket{le="+Inf",stage="redis"} 2.0
genrec_stage_seconds_count{stage="redis"} 2.0
genrec_stage_seconds_sum{stage="redis"} 0.002
# HELP genrec_engine_batch_requests Requests searched together in one engine batch.
# TYPE genrec_engine_batch_requests histogram
genrec_engine_batch_requests_bucket{le="1.0"} 2.0
genrec_engine_batch_requests_bucket{le="+Inf"} 2.0
genrec_engine_batch_requests_count 2.0
genrec_engine_batch_requests_sum 2.0
# HELP genrec_fallbacks_total Degraded answers by reason.
# TYPE genrec_fallbacks_total counter
genrec_fallbacks_total{reason="unknown_user"} 1.0
"""

AFTER = """\
# HELP genrec_stage_seconds Time per pipeline stage.
# TYPE genrec_stage_seconds histogram
genrec_stage_seconds_bucket{le="0.01",stage="generate"} 1.0
genrec_stage_seconds_bucket{le="+Inf",stage="generate"} 6.0
genrec_stage_seconds_count{stage="generate"} 6.0
genrec_stage_seconds_sum{stage="generate"} 0.45
genrec_stage_seconds_created{stage="generate"} 1.7e9
genrec_stage_seconds_bucket{le="+Inf",stage="redis"} 6.0
genrec_stage_seconds_count{stage="redis"} 6.0
genrec_stage_seconds_sum{stage="redis"} 0.006
genrec_stage_seconds_bucket{le="+Inf",stage="fallback"} 1.0
genrec_stage_seconds_count{stage="fallback"} 1.0
genrec_stage_seconds_sum{stage="fallback"} 0.0005
# HELP genrec_engine_batch_requests Requests searched together in one engine batch.
# TYPE genrec_engine_batch_requests histogram
genrec_engine_batch_requests_bucket{le="1.0"} 2.0
genrec_engine_batch_requests_bucket{le="+Inf"} 4.0
genrec_engine_batch_requests_count 4.0
genrec_engine_batch_requests_sum 6.0
# HELP genrec_fallbacks_total Degraded answers by reason.
# TYPE genrec_fallbacks_total counter
genrec_fallbacks_total{reason="unknown_user"} 3.0
genrec_fallbacks_total{reason="engine_deadline"} 1.0
# HELP genrec_served_total Responses by path.
# TYPE genrec_served_total counter
genrec_served_total{path="generative"} 4.0
"""


def test_parse_samples_keys_by_name_and_labels() -> None:
    samples = parse_samples(BEFORE)
    assert samples[("genrec_stage_seconds_sum", (("stage", "generate"),))] == 0.05
    assert samples[("genrec_engine_batch_requests_count", ())] == 2.0
    assert samples[("genrec_fallbacks_total", (("reason", "unknown_user"),))] == 1.0


def test_server_diff_from_histogram_sums_and_counts() -> None:
    diff = server_diff(BEFORE, AFTER)
    # generate: (0.45 − 0.05) s over 4 observations = 100 ms; redis: 4 ms / 4 = 1 ms
    assert diff["stage_mean_ms"] == {
        "redis": {"count": 4, "mean_ms": 1.0},
        "generate": {"count": 4, "mean_ms": 100.0},
        "fallback": {"count": 1, "mean_ms": 0.5},
    }
    assert list(diff["stage_mean_ms"]) == ["redis", "generate", "fallback"]
    # 2 batches carried (6 − 2) requests
    assert diff["engine_batches"] == 2 and diff["engine_batch_mean_requests"] == 2.0
    assert diff["engine_queue_mean_ms"] is None
    assert diff["fallbacks"] == {"unknown_user": 2, "engine_deadline": 1}
    assert diff["served"] == {"generative": 4}
    assert diff["counter_reset"] is False
    assert server_diff(AFTER, BEFORE)["counter_reset"] is True
    assert server_diff(AFTER, AFTER)["stage_mean_ms"] == {}


# ---------------------------------------------------------------------------- loops


class FakeClient:
    """Answers after a fixed delay and tracks the most calls ever in flight."""

    def __init__(self, delay_s: float = 0.002) -> None:
        self.delay_s = delay_s
        self.in_flight = 0
        self.peak = 0
        self.calls = 0
        self.closed = False

    async def __call__(self, spec: RequestSpec) -> Outcome:
        self.calls += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(self.delay_s)
        self.in_flight -= 1
        if spec.kind == "unknown":
            return Outcome(True, "200", "prompt-only", ["unknown_user"], {"total": 1.0})
        return Outcome(True, "200", "generative", [], {"generate": 1.0, "total": 1.5})

    async def ready(self) -> None:
        pass

    async def aclose(self) -> None:
        self.closed = True


def test_closed_loop_respects_concurrency_and_max_requests() -> None:
    client = FakeClient()
    mix = UserMix(Mix().shares(), USERS, URIS, 0)
    records, elapsed = asyncio.run(closed_loop(client, mix, 3, 5.0, max_requests=20))
    assert len(records) == 20 and client.calls == 20
    assert client.peak == 3
    assert elapsed < 5.0
    assert all(r.latency_ms == r.service_ms and r.latency_ms >= 2.0 for r in records)


def test_a_spread_client_sends_to_each_gateway_in_turn() -> None:
    gateways = [FakeClient(), FakeClient(), FakeClient()]
    mix = UserMix(Mix().shares(), USERS, URIS, 0)
    spread = SpreadClient(gateways)
    records, _ = asyncio.run(closed_loop(spread, mix, 4, 5.0, max_requests=30))
    assert len(records) == 30 and [g.calls for g in gateways] == [10, 10, 10]
    asyncio.run(spread.aclose())
    assert all(g.closed for g in gateways)


def test_a_variant_names_its_code_bundle_gateways_and_settings(tmp_path: Path) -> None:
    v = parse_variant(f"two:src={tmp_path},bundle={tmp_path},gateways=2,GENREC_MAX_BATCH=8")
    assert (v.name, v.source, v.bundle, v.gateways) == ("two", tmp_path, tmp_path, 2)
    assert v.env == {"GENREC_MAX_BATCH": "8"}
    env = v.process_env(GENREC_MAX_BATCH="1", REDIS_URL="redis://r")
    assert env["GENREC_MAX_BATCH"] == "8" and env["REDIS_URL"] == "redis://r"  # the variant's win
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path)  # its code comes first
    plain = parse_variant("plain")
    assert (plain.gateways, plain.bundle, plain.source) == (1, None, None)
    for bad in ("x:gateways=0", "x:gateways=two", "x:KEY", ":src=."):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_variant(bad)


def test_open_loop_sends_on_schedule_and_counts_from_it() -> None:
    client = FakeClient(delay_s=0.05)
    mix = UserMix(Mix().shares(), USERS, URIS, 0)
    records, _ = asyncio.run(open_loop(client, mix, rate=200.0, duration_s=0.1))
    assert len(records) == 20
    scheduled = sorted(r.scheduled_s for r in records)
    assert scheduled == pytest.approx([i / 200.0 for i in range(20)], abs=1e-9)
    # arrivals do not wait for answers: many calls overlap
    assert client.peak > 5
    assert all(r.latency_ms >= r.service_ms >= 50.0 for r in records)
    capped, _ = asyncio.run(open_loop(FakeClient(0), mix, 1000.0, 10.0, max_requests=7))
    assert len(capped) == 7


def test_run_load_excludes_warmup_and_writes_outputs(tmp_path: Path) -> None:
    client = FakeClient()
    report = run_load(
        "http://127.0.0.1:1",
        concurrency=2,
        duration_s=5.0,
        max_requests=30,
        warmup_s=0.05,
        users=USERS,
        uris=URIS,
        client=client,
        out_dir=tmp_path,
    )
    assert report["requests"] == 30 and report["ok"] == 30
    assert report["warmup_requests"] > 0
    assert client.calls == 30 + report["warmup_requests"]
    assert client.closed
    assert report["server"] is None
    assert report["served_by"]["generative"] + report["served_by"].get("prompt-only", 0) == 30
    saved = json.loads((tmp_path / "load.json").read_text())
    assert saved["requests"] == 30 and saved["config"]["concurrency"] == 2
    assert len((tmp_path / "requests.jsonl").read_text().splitlines()) == 30
    assert (tmp_path / "latency_cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_load_needs_exactly_one_mode() -> None:
    with pytest.raises(LoadError, match="exactly one"):
        run_load("http://127.0.0.1:1", users=USERS, uris=URIS, client=FakeClient())
    with pytest.raises(LoadError, match="exactly one"):
        run_load("http://127.0.0.1:1", concurrency=1, rate=1.0, client=FakeClient())
