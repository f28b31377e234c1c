"""Throughput of the gateway at concurrency 1 and 8, for one or more variants, in one run.

Each variant is a real `genrec serve` over the same bundle and the same Redis (users
published once), started in turn on this machine; the load generator runs here too. Per
variant: a closed loop of 1 caller, then of 8 (after a warm-up each), and their ratio, with
the share of answers per served path (`generative`, `prompt-only`, `ann`): a faster
fallback is not throughput. A variant is a name, then optionally a source checkout (the
gateway runs that code: `src=DIR` puts DIR first on PYTHONPATH, e.g. a `git worktree` of an
older commit), its own bundle (`bundle=DIR`, for code that reads another bundle format:
built from the same data, so the load's users and items are those of `--bundle`), how many
gateway processes serve it (`gateways=N`: N gateways, each with its own in-process engine,
the load spread over them in turn as a Service spreads it over pods) and environment
settings. Before each variant starts, its own code publishes its bundle's users to Redis.

    python -m loadtest.bench_throughput --bundle bundles/ml-100k \\
        --variant before:src=../genrec-before,bundle=bundles/before --variant after \\
        --variant two:gateways=2

The last variant's figures are also given as ratios to the first's. The request deadline
is raised to `--deadline-ms` (10 s) in every variant: a closed loop of 8 on a small machine
queues more engine work than a 1 s deadline admits, and a refusal returns at once, so the
loop would measure how fast the gateway says 503 instead of how many searches it serves.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.bench_beam_vs_vllm import bench_parser, machine_info, machine_line, run_bench
from loadtest.bench_redis import RedisServer
from loadtest.load import run_load

CONCURRENCY = (1, 8)


@dataclass(frozen=True)
class Variant:
    """A gateway to measure: its name, the code it runs (None: this checkout), its env."""

    name: str
    source: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    gateways: int = 1
    bundle: Path | None = None  # None: the run's --bundle

    def process_env(self, **settings: str) -> dict[str, str]:
        """This environment with `settings` and the variant's own on top, its code first."""
        env = {**os.environ, **settings, **self.env}
        if self.source is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(self.source), env.get("PYTHONPATH")])
            )
        return env


def parse_variant(text: str) -> Variant:
    """`NAME[:src=DIR][,bundle=DIR][,gateways=N][,KEY=VALUE...]` (items after the colon,
    comma-separated)."""
    name, _, rest = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"variant {text!r} has no name")
    source, bundle, env, gateways = None, None, {}, 1
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"variant item {item!r} is not KEY=VALUE")
        if key == "src":
            source = Path(value).resolve()
        elif key == "bundle":
            bundle = Path(value).resolve()
        elif key == "gateways":
            if not value.isdigit() or int(value) < 1:
                raise argparse.ArgumentTypeError(f"gateways={value!r}: not a positive count")
            gateways = int(value)
        else:
            env[key] = value
    return Variant(name, source, env, gateways, bundle)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gateway:
    """`genrec serve` for one variant, ready when constructed; `close` stops it."""

    def __init__(
        self, variant: Variant, bundle: Path, redis_url: str, log: Path, deadline_ms: float
    ) -> None:
        self.port = _free_port()
        env = variant.process_env(
            REDIS_URL=redis_url,
            GENREC_PORT=str(self.port),
            GENREC_GRPC_PORT=str(_free_port()),
            VLLM_ENABLE_V1_MULTIPROCESSING="0",
            GENREC_DEADLINE_MS=str(deadline_ms),
        )
        # `python -m` puts the working directory first on sys.path: run from the source
        command = [sys.executable, "-m", "service.cli", "serve", "--bundle", str(bundle.resolve())]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                command,
                cwd=variant.source,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.base = f"http://127.0.0.1:{self.port}"
        self._wait_ready(log)

    def _wait_ready(self, log: Path, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the gateway exited; see {log}")
            try:
                if httpx.get(self.base + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.close()
        raise SystemExit(f"the gateway was not ready in {timeout_s:.0f} s; see {log}")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def publish(variant: Variant, bundle: Path, redis_url: str) -> None:
    """The variant's own code publishes its bundle's users (a new current version)."""
    command = [sys.executable, "-m", "service.cli", "publish-embeddings", str(bundle.resolve())]
    subprocess.run(
        [*command, "--redis-url", redis_url, "--force"],
        cwd=variant.source,
        env=variant.process_env(),
        check=True,
        stdout=subprocess.DEVNULL,
    )


def served_shares(report: dict[str, Any]) -> dict[str, float]:
    ok = report["ok"] or 1
    return {path: round(n / ok, 4) for path, n in sorted(report["served_by"].items())}


def measure(gateways: list[Gateway], args: argparse.Namespace, concurrency: int) -> dict[str, Any]:
    """One closed loop over the gateways (the engine figures are the first gateway's)."""
    report = run_load(
        gateways[0].base,
        concurrency=concurrency,
        duration_s=args.duration,
        warmup_s=args.warmup,
        bundle=args.bundle,
        seed=args.seed,
        metrics_url=gateways[0].base + "/metrics",
        spread_over=[g.base for g in gateways[1:]],
    )
    server = report.get("server") or {}
    return {
        "ok_rps": report["throughput_rps"],
        "errors": report["errors"],
        "latency_ms": report["latency_ms"],
        "generate_ms": report["stages_ms"].get("generate"),
        "served": served_shares(report),
        "degraded": report["degraded"],
        "engine_batch_mean": server.get("engine_batch_mean_requests"),
    }


def run_variant(variant: Variant, args: argparse.Namespace, redis_url: str) -> dict[str, Any]:
    logs = Path(tempfile.mkdtemp(prefix=f"genrec-{variant.name}-"))
    print(f"{variant.name}: starting {variant.gateways} gateway(s) (logs {logs})", flush=True)
    bundle = variant.bundle or args.bundle
    publish(variant, bundle, redis_url)
    gateways: list[Gateway] = []
    try:
        for n in range(variant.gateways):
            log = logs / f"serve-{n}.log"
            gateways.append(Gateway(variant, bundle, redis_url, log, args.deadline_ms))
        runs = {f"c{c}": measure(gateways, args, c) for c in CONCURRENCY}
    finally:
        for gateway in gateways:
            gateway.close()
    c1, c8 = runs["c1"]["ok_rps"], runs["c8"]["ok_rps"]
    return {
        "variant": {
            "name": variant.name,
            "source": str(variant.source or ""),
            "env": variant.env,
            "gateways": variant.gateways,
            "bundle": str(bundle),
        },
        **runs,
        "c8_over_c1": round(c8 / c1, 3) if c1 else None,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="genrec-redis-") as tmp:
        redis = RedisServer(Path(tmp))
        try:
            url = redis.urls["unix"]
            variants = [run_variant(v, args, url) for v in args.variant or [Variant("current")]]
        finally:
            redis.close()
    first, last = variants[0], variants[-1]
    versus = {
        "c8_ok_rps": round(last["c8"]["ok_rps"] / first["c8"]["ok_rps"], 3),
        "c1_p50": round(last["c1"]["latency_ms"]["p50"] / first["c1"]["latency_ms"]["p50"], 3),
        "c8_p99_over_first_c8_p50": round(
            last["c8"]["latency_ms"]["p99"] / first["c8"]["latency_ms"]["p50"], 3
        ),
    }
    return {
        "machine": info,
        "duration_s": args.duration,
        "deadline_ms": args.deadline_ms,
        "variants": variants,
        "versus": versus,
    }


def report(r: dict[str, Any]) -> None:
    print(machine_line(r["machine"]))
    print(
        f"{'variant':<12} {'c':>2} {'ok/s':>7} {'p50':>7} {'p99':>7} {'generate p50':>13} "
        f"{'batch':>6} {'errors':>6}  served"
    )
    for v in r["variants"]:
        for c in CONCURRENCY:
            m = v[f"c{c}"]
            gen = (m["generate_ms"] or {}).get("p50", float("nan"))
            batch = m["engine_batch_mean"] or float("nan")
            print(
                f"{v['variant']['name']:<12} {c:>2} {m['ok_rps']:>7.1f} "
                f"{m['latency_ms']['p50']:>7.1f} {m['latency_ms']['p99']:>7.1f} {gen:>13.1f} "
                f"{batch:>6.1f} {m['errors']:>6}  {m['served']}"
            )
        print(f"{v['variant']['name']:<12} concurrency 8 / 1: {v['c8_over_c1']:.2f}x")
    if len(r["variants"]) > 1:
        x = r["versus"]
        print(
            f"last / first: c8 ok/s {x['c8_ok_rps']:.2f}x, c1 p50 {x['c1_p50']:.2f}x, "
            f"c8 p99 / first's c8 p50 {x['c8_p99_over_first_c8_p50']:.2f}"
        )


def main() -> None:
    parser = bench_parser(__doc__, engine=False)
    parser.add_argument("--bundle", type=Path, default=Path("bundles/ml-100k"))
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        help="NAME[:src=DIR][,bundle=DIR][,gateways=N][,KEY=VALUE...]",
    )
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--deadline-ms", type=float, default=10_000.0)
    run_bench(parser, run, report)


if __name__ == "__main__":
    main()
