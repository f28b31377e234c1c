"""The real service end to end: `genrec serve` in a subprocess on free ports, a real Redis,
real vLLM engines (in-process, and a vLLM OpenAI server for the remote mode), over a tiny
bundle built from ML-100K. Faults are real too: Redis and the vLLM server get killed."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_store.bundle import Bundle
from service.api.client import next_episode
from tests.servers import RedisServer, ServiceProcess, VLLMServer, published_service

pytestmark = pytest.mark.slow


@dataclass
class Live:
    bundle: Bundle
    redis: RedisServer
    service: ServiceProcess

    def post(self, body: Any, **kw: Any) -> httpx.Response:
        return httpx.post(f"{self.service.base}/v1/recommendations", json=body, timeout=30, **kw)

    def metrics(self) -> str:
        return httpx.get(f"{self.service.base}/metrics", timeout=5).text


@pytest.fixture(scope="module")
def live(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    env = {"GENREC_REDIS_COOLDOWN_S": "0.5", "GENREC_RATE_LIMIT": "100000/minute"}
    with published_service(tiny_bundle, tmp_path_factory, env) as (bundle, redis, service):
        yield Live(bundle, redis, service)


def _user(bundle: Bundle, index: int = 3) -> tuple[str, set[str]]:
    uris = bundle.catalog["uri"].tolist()
    return str(bundle.users["user_id"][index]), {uris[i] for i in bundle.histories[index]}


def test_rest_recommends_unseen_catalog_items(live: Live) -> None:
    user, seen = _user(live.bundle)
    r = live.post({"user_id": user, "k": 10, "surface": "home"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["served_by"] == "generative" and body["degraded"] == []
    assert body["bundle_version"] == live.bundle.version
    sid = dict(zip(live.bundle.catalog["uri"], live.bundle.catalog["sid"], strict=True))
    items = body["items"]
    assert len(items) == 10 == len({i["uri"] for i in items})
    for item in items:
        assert item["uri"] in sid and item["uri"] not in seen
        assert item["semantic_id"] == "-".join(map(str, sid[item["uri"]]))


def test_rest_and_grpc_agree(live: Live) -> None:
    user, _ = _user(live.bundle, 7)
    current = live.bundle.catalog["uri"][49]
    rest = live.post({"user_id": user, "k": 8, "current_item": current}).json()
    rpc = next_episode(f"127.0.0.1:{live.service.grpc_port}", user, current, 8)
    assert rpc["served_by"] == rest["served_by"] == "generative"
    assert rpc["degraded"] == rest["degraded"] == []  # an empty list is printed, not left out
    assert [i["uri"] for i in rpc["items"]] == [i["uri"] for i in rest["items"]]
    assert current not in [i["uri"] for i in rest["items"]]


def test_grpc_health_reflection_and_errors(live: Live) -> None:
    target = f"127.0.0.1:{live.service.grpc_port}"
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="genrec.v1.NextEpisode"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        names = {s.name for r in stub.ServerReflectionInfo(iter([request]))
                 for s in r.list_services_response.service}  # fmt: skip
        assert "genrec.v1.NextEpisode" in names
        for method in ("/genrec.v1.NextEpisode/Next", "/grpc.health.v1.Health/Check"):
            raw = channel.unary_unary(method)  # bytes in, bytes out: no message at all
            with pytest.raises(grpc.RpcError) as err:
                raw(b"\xff\xff\xff\xff\x0f")
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert "undecodable request" in (err.value.details() or "")
    cases = [
        (("", "", 5), grpc.StatusCode.INVALID_ARGUMENT),
        (("1", "", 101), grpc.StatusCode.INVALID_ARGUMENT),
        (("1", "not a uri", 5), grpc.StatusCode.INVALID_ARGUMENT),
        (("1", "ml-100k:movie:999999", 5), grpc.StatusCode.NOT_FOUND),
    ]
    for (user, current, k), code in cases:
        with pytest.raises(grpc.RpcError) as err:
            next_episode(target, user, current, k)
        assert err.value.code() == code, err.value.details()
        assert err.value.details()


BAD_BODIES = [
    ({"user_id": "1", "k": 0}, 422),
    ({"user_id": "1", "k": 101}, 422),
    ({"user_id": "1", "k": "5"}, 422),
    ({"user_id": "1", "k": True}, 422),
    ({"user_id": "1", "k": 5.5}, 422),
    ({"user_id": "1", "unexpected": True}, 422),
    ({"user_id": "a b"}, 422),
    ({"user_id": "1", "prompt": "x" * 501}, 422),
    ({"user_id": "1", "exclude": ["not-a-uri"]}, 422),
    ({"user_id": "1", "context": {"age": -3}}, 422),
    ({"user_id": "1", "context": {"market": "usa"}}, 422),
    ({"k": 5}, 422),
    ([1, 2], 422),
    ({"user_id": "1", "current_item": "ml-100k:movie:999999"}, 404),
]


def test_bad_requests_get_clear_4xx(live: Live) -> None:
    for body, status in BAD_BODIES:
        r = live.post(body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]
    r = httpx.post(
        f"{live.service.base}/v1/recommendations",
        content=b"{" + b" " * 70_000 + b"}",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413

    def chunks(total: int) -> Iterator[bytes]:  # no Content-Length: sent chunked
        yield b'{"user_id": "1", "k": 3' + b" " * (total - 24)
        yield b"}"

    url = f"{live.service.base}/v1/recommendations"
    headers = {"content-type": "application/json"}
    r = httpx.post(url, content=chunks(5_000_000), headers=headers)
    assert r.status_code == 413, r.text
    r = httpx.post(url, content=chunks(1_000), headers=headers)
    assert r.status_code == 200, r.text
    assert len(r.json()["items"]) == 3
    # the cap's refusals are counted under the endpoint they were sent to
    series = 'genrec_requests_total{code="413",endpoint="POST /v1/recommendations"}'
    counted = httpx.get(f"{live.service.base}/metrics").text.splitlines()
    assert any(line.startswith(series) and float(line.split()[-1]) >= 2 for line in counted)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
_fields = st.sampled_from(
    ["user_id", "k", "surface", "context", "prompt", "exclude", "current_item"]
)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(_fields | st.text(max_size=6), _json, max_size=5))
def test_random_bodies_never_get_a_5xx(live: Live, body: dict[str, Any]) -> None:
    r = live.post(body)
    assert r.status_code < 500, (body, r.text)


def test_unknown_user_is_served_prompt_only(live: Live) -> None:
    r = live.post({"user_id": "new-user-42", "k": 5, "context": {"age": 30, "gender": "f"}})
    body = r.json()
    assert body["served_by"] == "prompt-only" and body["degraded"] == ["unknown_user"]
    assert len(body["items"]) == 5


def test_redis_outage_degrades_to_prompt_only_then_recovers(live: Live) -> None:
    user, seen = _user(live.bundle, 11)
    live.redis.stop()
    try:
        start = time.perf_counter()
        body = live.post({"user_id": user, "k": 10}).json()
        assert time.perf_counter() - start < 5
        assert body["served_by"] == "prompt-only" and body["degraded"] == ["redis_down"]
        assert len(body["items"]) == 10 and not {i["uri"] for i in body["items"]} & seen
        ready = httpx.get(f"{live.service.base}/readyz").json()
        assert ready["ready"] and ready["redis"] == "degraded"
    finally:
        live.redis.start()
    deadline = time.monotonic() + 10
    while True:  # the cool-down (0.5 s here) passes, then Redis is tried again
        body = live.post({"user_id": user, "k": 10}).json()
        if body["served_by"] == "generative" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert body["served_by"] == "generative" and body["degraded"] == [], body
    text = live.metrics()
    assert 'genrec_fallbacks_total{reason="redis_down"}' in text
    assert 'genrec_served_total{path="prompt-only"}' in text


def test_metrics_cover_stages_and_bundle(live: Live) -> None:
    live.post({"user_id": _user(live.bundle)[0]})
    text = live.metrics()
    for stage in ("redis", "project", "generate", "rerank", "rules"):
        assert f'genrec_stage_seconds_bucket{{le="0.001",stage="{stage}"}}' in text
    assert f'version="{live.bundle.version}"' in text
    assert 'genrec_request_seconds_count{endpoint="POST /v1/recommendations"}' in text
    assert "genrec_beam_steps_total" in text


# ------------------------------------------------------------------ remote engine mode

API_KEY = "test-key-1"
KEY_HEADER = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def remote(
    live: Live, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServiceProcess, VLLMServer]]:
    directory = tmp_path_factory.mktemp("remote")
    server = VLLMServer(live.bundle.llm_dir, directory)
    service: ServiceProcess | None = None
    try:
        server.wait_healthy()
        env = {
            "REDIS_URL": live.redis.url,
            "GENREC_ENGINE": "remote",
            "GENREC_ENGINE_URL": server.base_url,
            "GENREC_API_KEYS": f"other-key,{API_KEY}",  # this service also checks keys
        }
        service = ServiceProcess(live.bundle.dir, env, directory / "service.log")
        service.wait_ready()
        yield service, server
    finally:
        if service is not None:
            service.stop()
        server.stop()


def test_remote_engine_serves_what_the_in_process_engine_serves(live: Live, remote) -> None:
    service, server = remote
    vllm_names = _series_names(httpx.get(f"{server.base_url}/metrics").text)
    wanted = {n for n in _dashboard_and_alert_metrics() if n.startswith("vllm:")}
    assert wanted and wanted <= vllm_names, wanted - vllm_names  # the dashboards' vLLM panels
    user, _ = _user(live.bundle, 5)
    body = {"user_id": user, "k": 10}
    here = live.post(body).json()
    there = httpx.post(
        f"{service.base}/v1/recommendations", json=body, timeout=30, headers=KEY_HEADER
    ).json()
    assert there["served_by"] == "generative"
    assert [i["uri"] for i in there["items"]] == [i["uri"] for i in here["items"]]


def test_remote_engine_down_falls_back_to_ann(live: Live, remote) -> None:
    service, server = remote
    server.stop()
    user, seen = _user(live.bundle, 5)
    start = time.perf_counter()
    r = httpx.post(
        f"{service.base}/v1/recommendations", json={"user_id": user}, timeout=30, headers=KEY_HEADER
    )
    assert time.perf_counter() - start < 5
    body = r.json()
    assert body["served_by"] == "ann" and body["degraded"] == ["engine_error"]
    assert len(body["items"]) == 10 and not {i["uri"] for i in body["items"]} & seen
    ready = httpx.get(f"{service.base}/readyz").json()
    assert ready["ready"] and ready["engine_state"] == "degraded"
    text = httpx.get(f"{service.base}/metrics").text
    assert "genrec_engine_errors_total" in text


# ------------------------------------------------------------------ taste profile, playlists


def _profile_url(live: Live, user: str) -> str:
    return f"{live.service.base}/v1/users/{user}/taste-profile"


def test_taste_profile_round_trip_and_stale_revision(live: Live) -> None:
    user, _ = _user(live.bundle, 20)
    r = httpx.get(_profile_url(live, user))
    assert r.status_code == 200
    profile = r.json()
    rev = profile["revision"]
    assert r.headers["etag"] == f'"{rev}"' and profile["summary"] and profile["top_genres"]
    edit = {"more": {"genres": ["thriller"]}, "forget": {"genres": ["comedy"]}}
    r = httpx.patch(_profile_url(live, user), json=edit, headers={"If-Match": f'"{rev}"'})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["revision"] == rev + 1
    assert body["edits"]["more"]["genres"] == ["thriller"]
    assert body["edits"]["forget"]["genres"] == ["comedy"]
    assert "comedy" not in [g["name"] for g in body["top_genres"]]
    # a second editor still holding the old revision is refused, nothing is overwritten
    r = httpx.patch(_profile_url(live, user), json={"less": {"genres": ["drama"]}},
                    headers={"If-Match": f'"{rev}"'})  # fmt: skip
    assert r.status_code == 412 and r.json()["detail"]["revision"] == rev + 1
    assert httpx.get(_profile_url(live, user)).json()["edits"]["less"]["genres"] == []
    # `more` then `less` of one genre moves it, it is never in both lists
    r = httpx.patch(_profile_url(live, user), json={"less": {"genres": ["thriller"]}})
    assert r.json()["edits"]["less"]["genres"] == ["thriller"]
    assert r.json()["edits"]["more"]["genres"] == []
    r = httpx.delete(f"{_profile_url(live, user)}/edits")
    assert r.status_code == 200 and r.json()["edits"]["forget"]["genres"] == []
    bad = [
        ({"more": {"genres": ["x"]}, "sideways": {}}, 422),
        ({"forget": {"items": ["nope"]}}, 422),
    ]
    for body, status in bad:
        assert httpx.patch(_profile_url(live, user), json=body).status_code == status
    # names the catalog does not have are refused by name, nothing stored
    rev = httpx.get(_profile_url(live, user)).json()["revision"]
    typo = {"more": {"genres": ["thriler"]}, "forget": {"items": ["ml-100k:movie:99999"]}}
    r = httpx.patch(_profile_url(live, user), json=typo)
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == {"genres": ["thriler"], "items": ["ml-100k:movie:99999"]}
    assert httpx.get(_profile_url(live, user)).json()["revision"] == rev
    r = httpx.patch(_profile_url(live, user), json={"less": {"genres": ["drama"]}})
    assert r.json()["revision"] == rev + 1
    r = httpx.patch(_profile_url(live, user), json={"less": {"genres": ["drama"]}})
    assert r.json()["revision"] == rev + 1  # the same edit again changes nothing
    r = httpx.patch(_profile_url(live, user), json={}, headers={"If-Match": "abc"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["header", "if-match"]
    assert httpx.get(_profile_url(live, "bad user")).status_code in (404, 422)


def _genre_share(live: Live, items: list[dict[str, Any]], genre: str) -> float:
    genres = dict(zip(live.bundle.catalog["uri"], live.bundle.catalog["genres"], strict=True))
    return sum(genre in genres[i["uri"]] for i in items) / max(1, len(items))


def test_edits_change_recommendations(live: Live) -> None:
    user, _ = _user(live.bundle, 30)
    before = live.post({"user_id": user, "k": 20}).json()["items"]
    counts: dict[str, int] = {}
    for item in before:
        for g in dict(zip(live.bundle.catalog["uri"], live.bundle.catalog["genres"], strict=True))[
            item["uri"]
        ]:
            counts[g] = counts.get(g, 0) + 1
    top = max(counts, key=counts.__getitem__)
    try:
        httpx.patch(_profile_url(live, user), json={"forget": {"genres": [top]}})
        after = live.post({"user_id": user, "k": 20}).json()["items"]
        assert _genre_share(live, before, top) > 0 and _genre_share(live, after, top) == 0
        rare = "documentary" if top != "documentary" else "western"
        share_before = _genre_share(live, after, rare)
        httpx.patch(_profile_url(live, user), json={"more": {"genres": [rare]}})
        more = live.post({"user_id": user, "k": 20}).json()["items"]
        assert _genre_share(live, more, rare) > share_before
        assert any("boosted: more" in i["why"] for i in more)
    finally:
        httpx.delete(f"{_profile_url(live, user)}/edits")


def test_playlist_follows_a_genre_prompt(live: Live) -> None:
    user, seen = _user(live.bundle, 40)
    plain = live.post({"user_id": user, "k": 15}).json()["items"]
    r = httpx.post(f"{live.service.base}/v1/playlists", timeout=30,
                   json={"user_id": user, "prompt": "horror", "length": 15})  # fmt: skip
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert len(items) == 15 and not {i["uri"] for i in items} & seen
    assert _genre_share(live, items, "horror") >= 0.6 > _genre_share(live, plain, "horror")
    for blank in ("", "   "):
        body = {"user_id": user, "prompt": blank}
        assert httpx.post(f"{live.service.base}/v1/playlists", json=body).status_code == 422


# ------------------------------------------------------------------ what dashboards read


def _series_names(text: str) -> set[str]:
    """Series names a Prometheus scrape can carry, from its families (samples or not)."""
    from prometheus_client.parser import text_string_to_metric_families

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                "info": ["_info"], "gauge": [""], "unknown": [""]}  # fmt: skip
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + s for s in suffixes.get(family.type, [""])}
        names |= {s.name for s in family.samples}
    return names


def _dashboard_and_alert_metrics() -> set[str]:
    from tests.test_deploy import (
        _adapter_exprs,
        _alert_rules,
        _as_promql,
        _dashboard_exprs,
        _selectors,
    )  # fmt: skip

    recorded = {r["record"] for r in _alert_rules() if "record" in r}
    exprs = [r["expr"] for r in _alert_rules()] + [e for _, e in _dashboard_exprs()]
    exprs += [e for _, e in _adapter_exprs()]
    return {n for e in exprs for n, _ in _selectors(_as_promql(e)) if n and n not in recorded}


def test_live_scrape_passes_promtool_and_has_every_dashboard_metric(live: Live) -> None:
    from tests.test_deploy import _find_tool

    live.post({"user_id": _user(live.bundle)[0]})
    text = live.metrics()
    wanted = {n for n in _dashboard_and_alert_metrics() if n.startswith("genrec_")}
    assert wanted and wanted <= _series_names(text), wanted - _series_names(text)
    promtool = _find_tool("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (bash deploy/tools.sh fetches it)")
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_api_keys_guard_rest_and_grpc(live: Live, remote) -> None:
    service, _ = remote
    url = f"{service.base}/v1/recommendations"
    user, _ = _user(live.bundle, 5)
    assert httpx.post(url, json={"user_id": user}).status_code == 401
    assert httpx.post(url, json={"user_id": user}, headers={"X-API-Key": "nope"}).status_code == 401
    ok = httpx.post(url, json={"user_id": user}, headers={"X-API-Key": API_KEY}, timeout=30)
    assert ok.status_code == 200
    for open_path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{service.base}{open_path}").status_code == 200
    for probe in ("/healthz", "/readyz"):  # load balancers' health checks send HEAD
        head = httpx.head(f"{service.base}{probe}")
        assert head.status_code == 200 and not head.content
    target = f"127.0.0.1:{service.grpc_port}"
    with pytest.raises(grpc.RpcError) as err:
        next_episode(target, user, "", 5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(next_episode(target, user, "", 5, api_key=API_KEY)["items"]) == 5


def test_a_client_cannot_pick_its_own_address_for_the_rate_limit(live: Live) -> None:
    """Without trusted proxies, `X-Forwarded-For` names no one: every caller from this
    address draws on one counter, whatever address it claims."""
    url = f"{live.service.base}/v1/users/1/taste-profile"
    left = [
        int(
            httpx.get(url, headers={"X-Forwarded-For": f"10.1.{n}.1"}).headers[
                "ratelimit-remaining"
            ]
        )
        for n in range(3)
    ]
    assert left[0] > left[1] > left[2], left


def test_rollouts_are_forbidden_without_a_root_and_a_browser_lands_on_the_page(
    live: Live,
) -> None:
    r = httpx.post(f"{live.service.base}/v1/admin/bundle", json={"path": "v2"})
    assert r.status_code == 403 and "GENREC_BUNDLE_ROOT" in r.json()["error"]
    r = httpx.get(f"{live.service.base}/")
    assert r.status_code == 307 and r.headers["location"] == "/ui"


def test_a_second_gateway_on_a_taken_grpc_port_does_not_start(
    live: Live, tiny_bundle: Path, tmp_path: Path
) -> None:
    """gRPC binds with SO_REUSEPORT unless told not to: a second gateway on the same port
    would start and take half of the first one's calls."""
    env = {"REDIS_URL": live.redis.url, "GENREC_GRPC_PORT": str(live.service.grpc_port)}
    second = ServiceProcess(tiny_bundle, env, tmp_path / "second.log")
    try:
        assert second.proc.wait(timeout=180) != 0
        assert "Failed to bind" in (tmp_path / "second.log").read_text(errors="replace")
    finally:
        second.stop()
    assert httpx.get(f"{live.service.base}/readyz").status_code == 200  # the first serves on
