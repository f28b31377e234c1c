"""Settings: every one is documented in the README, and bad values are refused at start."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.rules import RULE_NAMES as RULES
from service.settings import Settings

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


def test_api_key_parsing_and_public_paths() -> None:
    from service.api.auth import authorized, needs_key, presented_key

    assert presented_key({"authorization": "Bearer abc"}) == "abc"
    assert presented_key({"authorization": "bearer  abc "}) == "abc"
    assert presented_key({"x-api-key": "xyz"}) == "xyz"
    assert presented_key({"authorization": "Basic Zm9v"}) is None
    assert presented_key({}) is None
    assert authorized("k2", ["k1", "k2"]) and not authorized("k3", ["k1", "k2"])
    assert not authorized(None, ["k1"])
    assert needs_key("/v1/recommendations", ["k"]) and not needs_key("/v1/recommendations", [])
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/ui"):
        assert not needs_key(path, ["k"])
