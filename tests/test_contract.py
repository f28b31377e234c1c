"""The contract is the behaviour: schemathesis, every check, against a real gateway.

`genrec serve` on the tiny bundle, with API keys (so the declared security is tested too:
a call without a key must be refused), a bundle root with no bundle in it (so no generated
path can start a rollout), and `/openapi.json` as the only description. Every phase runs:
the schema's examples, the coverage scenarios (each boundary, each missing header, every
method a path does not have), fuzzing, and stateful sequences along the document's links
(read a taste profile, then edit it with the ETag it gave). Examples per operation are
bounded so the run takes well under a minute here.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import ServiceProcess, published_service

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).with_name("schemathesis.toml")
KEY = "contract-key"


@pytest.fixture(scope="module")
def gateway(
    tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    env = {
        "GENREC_API_KEYS": f"{KEY},reader:read",
        "GENREC_BUNDLE_ROOT": str(tmp_path_factory.mktemp("empty-bundle-root")),
    }
    with published_service(tiny_bundle, tmp_path_factory, env) as (_, _, service):
        yield service


def test_every_answer_is_the_documented_one(gateway: ServiceProcess, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG),
        "run", f"{gateway.base}/openapi.json",
        "--checks", "all",
        "--max-examples", "50",
        "--seed", "14",
        "--header", f"Authorization: Bearer {KEY}",
        "--request-timeout", "30",
    ]  # fmt: skip
    # its working files (a cache) go to tmp_path, not into the checkout
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    failures = run.stdout.find("FAILURES")
    report = run.stdout[failures:] if failures >= 0 else run.stdout
    assert run.returncode == 0, report[-12000:] + run.stderr[-2000:]
    assert "Stateful" in run.stdout and "API Links:" in run.stdout  # the links were followed
