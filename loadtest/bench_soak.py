"""A soak: a steady open-loop load on a running gateway for a long while, watching the
gateway process's resident memory and open file descriptors (what leaks shows up as).

The capacity is measured first (a closed loop), then the gateway is driven at `--share`
of it for `--duration` seconds while `/proc/<pid>` is sampled every `--every` seconds.
Printed: the load report's throughput, status counts and latency, and RSS / open fds at
the start, the end and their maximum, with the change as a ratio to the start.

    genrec serve --bundle bundles/ml-100k &
    python -m loadtest.bench_soak --target http://127.0.0.1:8000 --bundle bundles/ml-100k \\
        --pid $(pgrep -f 'genrec serve') --duration 600
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path
from typing import Any

from loadtest.bench_beam_vs_vllm import bench_parser, machine_info, machine_line, run_bench
from loadtest.load import run_load


def process_sample(pid: int) -> dict[str, float]:
    """RSS (MiB) and open file descriptors of `pid`, from /proc."""
    rss_kib = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kib = float(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return {"t": time.monotonic(), "rss_mib": rss_kib / 1024.0, "fds": float(fds)}


class Sampler(threading.Thread):
    """Samples the process every `every` seconds until stopped."""

    def __init__(self, pid: int, every: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples = [process_sample(pid)]
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.every):
            self.samples.append(process_sample(self.pid))

    def finish(self) -> list[dict[str, float]]:
        self._stop_event.set()
        self.join()
        self.samples.append(process_sample(self.pid))
        return self.samples


def summary(samples: list[dict[str, float]]) -> dict[str, Any]:
    first, last = samples[0], samples[-1]
    return {
        key: {
            "start": first[key],
            "end": last[key],
            "max": max(s[key] for s in samples),
            "end_over_start": last[key] / first[key] if first[key] else float("nan"),
        }
        for key in ("rss_mib", "fds")
    } | {"samples": len(samples)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    common: dict[str, Any] = {"bundle": args.bundle, "warmup_s": 2.0}
    closed = run_load(args.target, concurrency=args.concurrency, duration_s=10.0, **common)
    capacity = float(closed["throughput_rps"])
    sampler = Sampler(args.pid, args.every)
    sampler.start()
    report = run_load(args.target, rate=args.share * capacity, duration_s=args.duration, **common)
    samples = sampler.finish()
    return {
        "machine": machine_info(),
        "capacity_rps": capacity,
        "rate_rps": args.share * capacity,
        "duration_s": args.duration,
        "load": {k: report[k] for k in ("throughput_rps", "sent_rps", "status", "latency_ms")},
        "process": summary(samples),
    }


def report(r: dict[str, Any]) -> None:
    print(machine_line(r["machine"]))
    load = r["load"]
    print(
        f"capacity {r['capacity_rps']:.1f} ok/s; soak at {r['rate_rps']:.1f} rps for "
        f"{r['duration_s']:.0f} s: {load['throughput_rps']:.1f} ok/s, status {load['status']}, "
        f"p50 {load['latency_ms']['p50']:.1f} ms, p99 {load['latency_ms']['p99']:.1f} ms"
    )
    for key, unit in (("rss_mib", "MiB"), ("fds", "fds")):
        p = r["process"][key]
        print(
            f"{key:8s} start {p['start']:8.1f} {unit}  end {p['end']:8.1f}  max {p['max']:8.1f}  "
            f"end/start {p['end_over_start']:.3f}"
        )


def main() -> None:
    parser = bench_parser(__doc__, engine=False)
    parser.add_argument("--target", default="http://127.0.0.1:8000")
    parser.add_argument("--bundle", type=Path, default=Path("bundles/ml-100k"))
    parser.add_argument("--pid", type=int, required=True, help="the gateway's process id")
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--share", type=float, default=0.5, help="of the measured capacity")
    parser.add_argument("--concurrency", type=int, default=8, help="of the capacity probe")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    run_bench(parser, run, report)


if __name__ == "__main__":
    main()
