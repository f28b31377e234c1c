"""Admission control (`service.admission`) and the guard's rate limits (`service.api.auth`):
the arithmetic, the engine worker feeding it, and fixed windows in a real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from model_store.generation import Engine, Prompt
from model_store.userstate.connect import sync_client
from model_store.userstate.keys import ACTIVE
from model_store.userstate.publish import published_at
from service import metrics
from service.admission import SETTLE_BATCHES, Admission, Overloaded, expected_wait
from service.api.auth import Forbidden, Guard, RateLimited, Unauthenticated, limits_uri
from service.batcher import Batcher
from service.settings import parse_api_keys
from service.userstore import UserStore
from tests.fake_engine import FakeEngine
from tests.servers import RedisServer


def test_the_expected_wait_is_everyone_ahead_then_oneself() -> None:
    assert expected_wait(0, 0.02) == pytest.approx(0.02)
    assert expected_wait(9, 0.02) == pytest.approx(0.2)
    assert expected_wait(5, 0.0) == 0.0  # nothing measured: no wait is predicted


def _settled(line: Admission, per_request_s: float) -> Admission:
    for _ in range(SETTLE_BATCHES):
        line.observe(1, per_request_s)
    return line


def test_the_cost_per_request_is_a_mean_then_a_smoothed_mean_of_batches() -> None:
    line = Admission(max_queue=100)
    line.observe(4, 0.4)  # the first batch sets it: 0.1 s a request
    assert line.per_request_s == pytest.approx(0.1)
    line.observe(10, 0.5)  # 0.05 s a request: the plain mean while the measure settles
    assert line.per_request_s == pytest.approx(0.075)
    line.observe(0, 1.0)  # a batch that searched nothing (the engine failed) says nothing
    assert line.batches == 2
    _settled(line, 0.075)
    line.observe(1, 0.175)  # settled: the newest batch weighs 0.2
    assert line.per_request_s == pytest.approx(0.075 + 0.2 * 0.1)
    line.forget()
    assert line.per_request_s == 0.0 and not line.settled


def test_one_slow_batch_of_a_fresh_measure_refuses_nobody() -> None:
    line = Admission(max_queue=100, max_wait_share=0.5)
    line.observe(1, 2.0)  # a cold first batch after a start or a swap
    line.ahead = 3
    line.check(deadline=1001.0, now=1000.0)  # queues: one batch is not a measure
    for _ in range(SETTLE_BATCHES - 1):
        line.observe(1, 0.01)
    assert line.per_request_s == pytest.approx((2.0 + 4 * 0.01) / 5)
    with pytest.raises(Overloaded):  # settled at 0.41 s a request: 1.6 s of wait
        line.check(deadline=1001.0, now=1000.0)


def test_while_paused_for_a_rollout_requests_queue_instead_of_being_refused() -> None:
    # a second a request: anyone behind another would be refused
    line = _settled(Admission(max_queue=3, max_wait_share=0.5), 1.0)
    line.ahead = 2
    with pytest.raises(Overloaded):
        line.check(deadline=1001.0, now=1000.0)
    with line.paused():
        line.check(deadline=1001.0, now=1000.0)  # waits: the pause is not the engine's cost
        line.ahead = 3
        with pytest.raises(Overloaded, match="waiting"):  # a full line is still full
            line.check(deadline=1001.0, now=1000.0)
    assert line.per_request_s == 0.0  # what was measured across the pause is dropped


def test_a_batch_begun_before_a_rollout_resumed_does_not_open_the_fresh_measure() -> None:
    line = Admission(max_queue=100, max_wait_share=0.5)
    with line.paused():
        began = time.monotonic()  # a batch that waits out the replaced engine's close
    line.observe(1, 3.0, began)  # ends after the resume: it measured the close, not the engine
    assert line.batches == 0 and line.per_request_s == 0.0
    line.observe(1, 0.01, time.monotonic())
    assert line.batches == 1 and line.per_request_s == pytest.approx(0.01)


def test_a_request_is_refused_when_its_wait_would_eat_its_deadline() -> None:
    line = _settled(Admission(max_queue=100, max_wait_share=0.5), 0.1)
    now = 1000.0
    line.ahead = 3  # waits 0.4 s
    line.check(deadline=now + 0.81, now=now)  # 0.4 <= 0.5 × 0.81: admitted
    before = metrics.SHED.labels("deadline")._value.get()
    with pytest.raises(Overloaded) as refused:
        line.check(deadline=now + 0.79, now=now)
    assert refused.value.reason == "deadline"
    assert refused.value.retry_after_s == pytest.approx(0.4) and refused.value.retry_after == 1
    assert metrics.SHED.labels("deadline")._value.get() == before + 1
    line.ahead = 0  # nobody ahead: admitted whatever the measure says, so it stays current
    line.check(deadline=now + 0.01, now=now)
    line.ahead = 30  # 3.1 s of work ahead: come back in 4 s
    with pytest.raises(Overloaded) as refused:
        line.check(deadline=now + 55.0, now=now + 50.0)
    assert refused.value.retry_after == 4


def test_a_full_line_refuses_even_before_anything_is_measured() -> None:
    line = Admission(max_queue=2)
    line.ahead = 2
    with pytest.raises(Overloaded) as refused:
        line.check(deadline=time.monotonic() + 100.0)
    assert refused.value.reason == "queue_full" and refused.value.retry_after == 1


def test_admitted_requests_hold_their_place_until_they_leave() -> None:
    line = Admission(max_queue=1)
    gauge = metrics.ADMITTED._value
    base = gauge.get()
    with line.admitted(time.monotonic() + 1.0):
        assert line.ahead == 1 and gauge.get() == base + 1
        with pytest.raises(Overloaded), line.admitted(time.monotonic() + 1.0):
            pass
    assert line.ahead == 0 and gauge.get() == base
    with pytest.raises(RuntimeError), line.admitted(time.monotonic() + 1.0):
        raise RuntimeError("a failure inside still gives the place back")
    assert line.ahead == 0


def test_the_engine_worker_measures_its_batches_for_admission() -> None:
    line = Admission(max_queue=100)
    sleepy = FakeEngine(levels=1, step_seconds=0.05, block_first=False)  # one 50 ms step each
    batcher = Batcher(cast(Engine, sleepy), sleepy.start, max_batch=4, admission=line)
    try:
        deadline = time.monotonic() + 10
        futures = [batcher.submit(Prompt((i + 1,)), 5, (), deadline) for i in range(8)]
        for f in futures:
            f.result(timeout=10)
    finally:
        batcher.close()
    # a search finishes after one 50 ms step; a step holds 1..4 requests
    assert 0.05 / 4 * 0.9 <= line.per_request_s <= 0.05 * 1.5


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server.url
    server.stop()


def test_limits_storage_uris() -> None:
    assert limits_uri("redis://h:6379/0") == "async+redis://h:6379/0"
    assert limits_uri("rediss://h:6380") == "async+rediss://h:6380"
    assert limits_uri("unix:///run/redis.sock") == "async+redis+unix:///run/redis.sock"


def test_the_guard_checks_key_scope_and_rate_in_redis(redis_url: str) -> None:
    keys = parse_api_keys(["app:read+write@3/minute", "ops:admin", "free:read"])

    async def scenario() -> None:
        store = UserStore(redis_url, timeout_s=1.0, cooldown_s=0.0)
        guard = Guard(keys, rate="1000/minute", store=store)
        other = Guard(keys, rate="1000/minute", store=store)  # a second gateway, same Redis
        try:
            with pytest.raises(Unauthenticated):
                await guard.check(None, "read", "10.0.0.1")
            with pytest.raises(Unauthenticated):
                await guard.check("nope", "read", "10.0.0.1")
            with pytest.raises(Forbidden):
                await guard.check("ops", "read", "10.0.0.1")
            quotas = [await g.check("app", "read", "10.0.0.1") for g in (guard, other, guard)]
            assert [(q.limit, q.remaining) for q in quotas if q] == [(3, 2), (3, 1), (3, 0)]
            with pytest.raises(RateLimited) as limited:
                await other.check("app", "write", "10.0.0.2")  # the key counts, not the address
            assert limited.value.quota.remaining == 0 and 1 <= limited.value.quota.reset_s <= 60
            free = await guard.check("free", "read", "10.0.0.1")  # the default rate
            assert free is not None and free.limit == 1000
            assert await Guard(keys, None, store).check("ops", "admin", "x") is None  # no rate
        finally:
            await store.close()

    asyncio.run(scenario())


def test_without_keys_callers_are_counted_by_address_and_redis_down_lets_them_pass(
    redis_url: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        store = UserStore(redis_url, timeout_s=1.0, cooldown_s=0.0)
        guard = Guard({}, rate="1/minute", store=store)
        try:
            assert await guard.check(None, "read", "10.0.0.1") is not None
            assert await guard.check("ignored", "admin", "10.0.0.2") is not None
            with pytest.raises(RateLimited):
                await guard.check(None, "read", "10.0.0.1")
        finally:
            await store.close()
        down = UserStore(f"unix://{tmp_path}/nothing.sock", timeout_s=0.05, cooldown_s=5.0)
        before = metrics.REDIS_ERRORS.labels("rate_limit")._value.get()
        assert await Guard({}, "1/minute", down).check(None, "read", "10.0.0.1") is None
        assert metrics.REDIS_ERRORS.labels("rate_limit")._value.get() == before + 1
        await down.close()

    asyncio.run(scenario())


def test_a_burst_beyond_the_connection_pool_waits_for_a_connection(redis_url: str) -> None:
    """More callers at once than the gateway keeps connections to Redis: each waits its turn
    for one; none is refused, and Redis is not taken for down."""

    async def scenario() -> None:
        store = UserStore(redis_url, timeout_s=1.0, cooldown_s=30.0)
        guard = Guard({}, rate="100000/minute", store=store)
        before = metrics.REDIS_ERRORS.labels("rate_limit")._value.get()
        try:
            burst = [guard.check(None, "read", f"10.1.0.{i % 250}") for i in range(300)]
            quotas = await asyncio.gather(*burst)
            assert all(q is not None for q in quotas)  # every one counted in Redis
            assert await store.ping()  # not skipped: no cool-down was opened
            assert metrics.REDIS_ERRORS.labels("rate_limit")._value.get() == before
        finally:
            await store.close()

    asyncio.run(scenario())


def test_the_embedding_age_follows_the_version_read_without_a_request(redis_url: str) -> None:
    """A flip reaches the age metric at the gateway's next version refresh: a quiet gateway
    does not report the age of the version before."""
    version = "ml-100k-abc@20260101T000000000000"
    sync_client(redis_url).hset(ACTIVE, mapping={"version": version, "checkpoint": "0-0"})

    async def scenario() -> None:
        store = UserStore(redis_url, timeout_s=1.0, cooldown_s=0.0)
        try:
            await store.active_version()
        finally:
            await store.close()

    asyncio.run(scenario())
    age = metrics.EMBEDDING_AGE.collect()[0].samples[0].value
    assert age == pytest.approx(time.time() - published_at(version), abs=5.0)
