"""Settings: every one is documented in the README, and bad values are refused at start."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from model_store.config import PRESETS
from model_store.evaluate import TOP_K
from service.rules import RULE_NAMES as RULES
from service.settings import MAX_BEAM_WIDTH, Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def _env_name(name: str) -> str:
    alias = Settings.model_fields[name].validation_alias
    return alias if isinstance(alias, str) else f"GENREC_{name.upper()}"


def test_every_setting_is_documented_in_the_readme() -> None:
    text = README.read_text()
    missing = [_env_name(n) for n in Settings.model_fields if f"`{_env_name(n)}`" not in text]
    assert not missing, f"README lacks {missing}"


def test_environment_overrides_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENREC_RULES", "no_repeats, diversity")
    monkeypatch.setenv("GENREC_BEAM_WIDTH", "32")
    monkeypatch.setenv("REDIS_URL", "redis://10.0.0.1:6379/0")
    s = Settings()
    assert s.rules == ["no_repeats", "diversity"] and s.beam_width == 32
    assert s.redis_url == "redis://10.0.0.1:6379/0"
    assert Settings().model_fields["rules"].default == list(RULES)
    for name, value in [("GENREC_RULES", "no_repeats,teleport"), ("GENREC_BEAM_WIDTH", "0"),
                        ("GENREC_ENGINE", "quantum")]:  # fmt: skip
        monkeypatch.setenv(name, value)
        with pytest.raises(ValidationError):
            Settings()
        monkeypatch.delenv(name)


def test_a_large_top_k_widens_the_search_so_the_reranker_can_choose() -> None:
    s = Settings(beam_width=20, candidates_per_item=2.0)
    assert [s.search_width(k) for k in (1, 10, 11, 30)] == [20, 20, 22, 60]
    assert s.search_width(20, beam_width=50) == 50 and s.search_width(40, beam_width=50) == 80
    assert Settings(candidates_per_item=3.0).search_width(100) == MAX_BEAM_WIDTH


def test_the_evaluation_searches_as_wide_as_the_gateway_for_its_top_k() -> None:
    """`served` in a bundle's eval.json is the REST API's answer to k=30 at the gateway's
    defaults only while both search the same number of beams: the tiny demo's too."""
    for preset in PRESETS.values():
        assert preset.beam_width == Settings().search_width(TOP_K)


def test_api_key_parsing_and_scopes(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.api.auth import grant_of, presented_key
    from service.settings import SCOPES, ApiKey, parse_api_keys

    assert presented_key({"authorization": "Bearer abc"}) == "abc"
    assert presented_key({"authorization": "bearer  abc "}) == "abc"
    assert presented_key({"x-api-key": "xyz"}) == "xyz"
    assert presented_key({"authorization": "Basic Zm9v"}) is None
    assert presented_key({}) is None
    # today's plain form still works and means every scope
    monkeypatch.setenv("GENREC_API_KEYS", "k1, k2")
    every = ApiKey(frozenset(SCOPES))
    assert Settings().api_keys == {"k1": every, "k2": every}
    monkeypatch.setenv(
        "GENREC_API_KEYS", "reader:read,ops:admin,app:read+write@20/second,k9@5/minute"
    )
    keys = Settings().api_keys
    assert keys == {
        "reader": ApiKey(frozenset({"read"})),
        "ops": ApiKey(frozenset({"admin"})),
        "app": ApiKey(frozenset({"read", "write"}), "20/second"),
        "k9": ApiKey(frozenset(SCOPES), "5/minute"),
    }
    assert grant_of("app", keys) == keys["app"]
    assert grant_of("nope", keys) is None and grant_of(None, keys) is None
    assert parse_api_keys([]) == {}
    with pytest.raises(ValueError, match="rate limit string 'often'"):
        parse_api_keys(["k1:read@often"])
    for bad in ("k1:read+sideways", "k1:", ":read", "k1:+", "k1@", "k1:read@often"):
        with pytest.raises(ValueError, match=r"bad API key entry|rate limit"):
            parse_api_keys([bad])
        monkeypatch.setenv("GENREC_API_KEYS", bad)
        with pytest.raises(ValidationError):
            Settings()
    monkeypatch.setenv("GENREC_API_KEYS", "k1:read+sideways")
    with pytest.raises(ValidationError) as err:
        Settings()
    assert "k1" not in str(err.value)  # keys stay out of the logs


def test_rate_limit_is_checked_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENREC_RATE_LIMIT", "50/second")
    assert Settings().rate_limit == "50/second"
    monkeypatch.setenv("GENREC_RATE_LIMIT", "lots")
    with pytest.raises(ValidationError, match="rate limit"):
        Settings()


@pytest.mark.parametrize(
    ("name", "value", "ok"),
    [
        ("GENREC_PORT", "1", True),
        ("GENREC_PORT", "65535", True),
        ("GENREC_PORT", "0", False),  # 0 would bind a port no one is told of
        ("GENREC_PORT", "65536", False),
        ("GENREC_PORT", "99999", False),  # once served on 99999 - 65536
        ("GENREC_PORT", "-1", False),
        ("GENREC_GRPC_PORT", "0", True),  # documented: pick a free one
        ("GENREC_GRPC_PORT", "65535", True),
        ("GENREC_GRPC_PORT", "65536", False),
        ("GENREC_GRPC_PORT", "-1", False),
    ],
)
def test_ports_are_16_bit(monkeypatch: pytest.MonkeyPatch, name: str, value: str, ok: bool) -> None:
    monkeypatch.setenv(name, value)
    if ok:
        assert getattr(Settings(), name.removeprefix("GENREC_").lower()) == int(value)
    else:
        with pytest.raises(ValidationError, match=name.removeprefix("GENREC_").lower()):
            Settings()


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("", []),
        ("10.0.0.1", ["10.0.0.1"]),
        (" 10.0.0.0/8, ::1 ,fd00::/8", ["10.0.0.0/8", "::1", "fd00::/8"]),
        ("notanip", None),
        ("10.0.0.1, proxy.local", None),
        ("10.0.0.1/8", None),  # host bits set: uvicorn would match it as a name, never
        ("10.0.0.0/33", None),
        ("*", None),
    ],
)
def test_trusted_proxies_are_addresses_or_networks(
    monkeypatch: pytest.MonkeyPatch, value: str, parsed: list[str] | None
) -> None:
    monkeypatch.setenv("GENREC_TRUSTED_PROXIES", value)
    if parsed is None:
        with pytest.raises(ValidationError, match="trusted_proxies"):
            Settings()
    else:
        assert Settings().trusted_proxies == parsed


def test_the_embedded_redis_gets_the_budget_of_a_shared_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("GENREC_REDIS_TIMEOUT_MS", raising=False)
    assert Settings().redis_timeout_ms == 200.0  # embedded: on the gateway's own cores
    assert Settings(redis_url="redis://cache:6379").redis_timeout_ms == 50.0
    monkeypatch.setenv("GENREC_REDIS_TIMEOUT_MS", "80")
    assert Settings().redis_timeout_ms == 80.0  # what is set is kept


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://127.0.0.1:1", "Redis at redis://127.0.0.1:1: ConnectionError"),
        ("http://127.0.0.1:6379", "must specify one of the following schemes"),
        ("redis://127.0.0.1:notaport", "Port could not be cast"),
    ],
)
def test_a_redis_that_cannot_be_used_ends_a_command_with_one_line(
    tiny_bundle: Path, url: str, says: str
) -> None:
    from typer.testing import CliRunner

    from service.cli import app

    result = CliRunner().invoke(app, ["publish-embeddings", str(tiny_bundle), "--redis-url", url])
    assert result.exit_code == 2, result.output
    assert says in result.output and "Traceback" not in result.output
