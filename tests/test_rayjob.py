"""The chart's RayJob on a real Ray cluster: its entrypoint submitted with `ray job submit`
to a head started by `ray start`, as KubeRay does, and the probes its pods declare."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from model_store.bundle import load_bundle
from model_store.userstate.connect import sync_client
from model_store.userstate.keys import CURRENT, meta_key
from model_store.userstate.publish import publish_bundle
from tests.chart import one, render
from tests.servers import RedisServer, free_port, stop_group, wait_http_ok

RAY = Path(sys.executable).parent / "ray"


def _rayjob() -> dict[str, Any]:
    """The chart's RayJob, two workers, on a snapshot claim every Ray pod can mount."""
    helm = pytest.importorskip("helm_python")
    values = {
        "embedUsers": {
            "workers": 2,
            "snapshots": {"existingClaim": "genrec-snapshots"},
            "rayJob": {"enabled": True},
        }
    }
    return one(render(helm, values), "RayJob", "-embed-users")


def _probes(job: dict[str, Any]) -> dict[str, tuple[int, str]]:
    """(port, path) of the readiness probe of the head and of the workers."""
    cluster = job["spec"]["rayClusterSpec"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates["worker"] = cluster["workerGroupSpecs"][0]["template"]
    probes = {}
    for role, template in templates.items():
        get = template["spec"]["containers"][0]["readinessProbe"]["httpGet"]
        probes[role] = (int(get["port"]), str(get["path"]))
    return probes


class RayHead:
    """`ray start --head --block` in its own session, so that stopping it stops every
    process it started; the dashboard and the node's agent on the ports given."""

    def __init__(self, env: dict[str, str], log: Path, dashboard: int, agent: int) -> None:
        # Unix socket paths under the temp dir must stay short (~107 bytes).
        self.temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        self.agent = agent
        ports = {
            "--port": free_port(),
            "--dashboard-port": dashboard,
            "--dashboard-agent-listen-port": agent,
            "--ray-client-server-port": free_port(),
        }
        args = [str(RAY), "start", "--head", "--block", "--num-cpus", "3"]
        args += ["--dashboard-host", "127.0.0.1", "--temp-dir", str(self.temp)]
        args += [str(a) for pair in ports.items() for a in pair]
        self.log, self._log = log, log.open("wb")
        self.proc = subprocess.Popen(
            args, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ok(self, url: str, timeout: float = 180.0) -> None:
        """Polls `url` until it answers 200 (the dashboard and the agent start after Ray)."""
        wait_http_ok(self.proc, url, timeout, self.log)

    def stop(self) -> None:
        stop_group(self.proc, grace_s=30.0)
        self._log.close()
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.mark.slow
def test_the_rayjob_entrypoint_runs_through_ray_job_submit(
    tiny_bundle: Path, redis_url: str, tmp_path: Path
) -> None:
    """What KubeRay does with the RayJob, on one machine: the head's probe answers (the
    image's Ray has its dashboard), then `ray job submit -- ENTRYPOINT` runs the daily job
    with the head's REDIS_URL and publishes a new version of every user."""
    job = _rayjob()
    words, probes = shlex.split(job["spec"]["entrypoint"]), _probes(job)
    snapshots_mount = words[words.index("--snapshots") + 1]
    bundle = load_bundle(tiny_bundle)
    client = sync_client(redis_url)
    publish_bundle(client, bundle)  # the chart's publish job runs first
    day0 = client.get(CURRENT)
    # The pod's mounts are this machine's directories.
    here = {words[2]: str(tiny_bundle), snapshots_mount: str(tmp_path / "snapshots")}
    command = [here.get(w, w) for w in words]
    assert command[:2] == ["genrec", "embed-users"] and command[3:5] == ["--address", "auto"]

    env = {**os.environ, "REDIS_URL": redis_url, "RAY_USAGE_STATS_ENABLED": "0"}
    # As in the pods, which hold no Ray token: here a local `ray.init` of another test may
    # have left one in ~/.ray, and `ray start` would then require it.
    env["RAY_AUTH_MODE"] = "disabled"
    env["PATH"] = f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}"
    # Ray's own dashboard and agent ports in the pods; free ones here.
    assert (probes["head"][0], probes["worker"][0]) == (8265, 52365)
    head = RayHead(env, tmp_path / "ray.log", dashboard=free_port(), agent=free_port())
    try:
        head.wait_ok(f"{head.dashboard}{probes['head'][1]}")
        head.wait_ok(f"http://127.0.0.1:{head.agent}{probes['worker'][1]}")
        submit = subprocess.run(
            [str(RAY), "job", "submit", "--address", head.dashboard, "--", *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        head.stop()
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    version = client.get(CURRENT)
    assert version is not None and version != day0
    raw = client.hgetall(meta_key(version.decode()))  # type: ignore[union-attr]
    meta = {k.decode(): v.decode() for k, v in raw.items()}  # type: ignore[union-attr]
    assert int(meta["users"]) == len(bundle.users)
    assert Path(meta["snapshot"]).is_relative_to(tmp_path / "snapshots")
