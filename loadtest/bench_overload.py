"""The overload curve of a running gateway: offered load vs answered, refused and latency.

First the capacity: a closed loop (`--concurrency` callers) measures the ok answers per
second the gateway sustains. Then an open loop at each multiple of it (`--multiples`):
requests arrive on schedule whatever the answers do, so past capacity the excess has to be
refused (503 with Retry-After from admission control, or 429 over a key's rate) or it
queues. Per step: offered and actually sent requests/s (this machine's client must keep
up, or the step says nothing), ok/s, the 503 and 429 shares, the admitted latency (from the
scheduled send) and the engine-deadline fallbacks among the admitted.

    genrec serve --bundle bundles/ml-100k &
    python -m loadtest.bench_overload --target http://127.0.0.1:8000 \\
        --bundle bundles/ml-100k --multiples 0.5,1,2,3,5 --duration 10
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from loadtest.bench_beam_vs_vllm import bench_parser, machine_info, machine_line, run_bench
from loadtest.load import run_load


def step(args: argparse.Namespace, **mode: Any) -> dict[str, Any]:
    """One load run against the target (closed loop or open loop, as `mode` says)."""
    return run_load(
        args.target,
        bundle=args.bundle,
        duration_s=args.duration,
        warmup_s=args.warmup,
        seed=args.seed,
        metrics_url=args.target.rstrip("/") + "/metrics",
        api_key=args.api_key,
        **mode,
    )


def summary(report: dict[str, Any], offered: float) -> dict[str, Any]:
    n = report["requests"] or 1
    status = report["status"]
    ok = report["ok"]
    deadline = report["degraded"].get("engine_deadline", 0)
    return {
        "offered_rps": round(offered, 2),
        "sent_rps": report["sent_rps"],
        "ok_rps": report["throughput_rps"],
        "share_503": round(status.get("503", 0) / n, 4),
        "share_429": round(status.get("429", 0) / n, 4),
        "other_errors": n - ok - status.get("503", 0) - status.get("429", 0),
        "retry_after_on_refusals": report["refused"]["with_retry_after"],
        "admitted_ms": report["latency_ms"],
        "refused_p50_ms": report["refused"]["latency_ms"]["p50"],
        "deadline_fallback_share": round(deadline / ok, 4) if ok else None,
        "engine_batch_mean": (report.get("server") or {}).get("engine_batch_mean_requests"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    closed = step(args, concurrency=args.concurrency)
    capacity = args.capacity or closed["throughput_rps"]
    curve = []
    for multiple in (float(m) for m in args.multiples.split(",")):
        rate = multiple * capacity
        curve.append({"multiple": multiple, **summary(step(args, rate=rate), rate)})
    return {
        "machine": machine_info(),
        "target": args.target,
        "capacity_rps": capacity,
        "capacity_run": summary(closed, closed["sent_rps"]),
        "curve": curve,
    }


def report(r: dict[str, Any]) -> None:
    print(machine_line(r["machine"]))
    print(f"capacity (closed loop): {r['capacity_rps']:.1f} ok/s")
    head = (
        "  x   offered    sent    ok/s   503 %   429 %  other  admitted p50 / p99 ms"
        "  refused p50 ms  deadline fallbacks %"
    )
    print(head)
    for s in r["curve"]:
        lat = s["admitted_ms"]
        p50, p99 = (lat[k] if lat[k] is not None else float("nan") for k in ("p50", "p99"))
        refused = s["refused_p50_ms"] if s["refused_p50_ms"] is not None else float("nan")
        fallbacks = 100 * (s["deadline_fallback_share"] or 0.0)
        print(
            f"{s['multiple']:4.1f} {s['offered_rps']:8.1f} {s['sent_rps']:7.1f} "
            f"{s['ok_rps']:7.1f} {100 * s['share_503']:6.1f}  {100 * s['share_429']:6.1f} "
            f"{s['other_errors']:6d}  {p50:9.1f} / {p99:7.1f}  {refused:13.1f}  {fallbacks:10.1f}"
        )


def main() -> None:
    parser = bench_parser(__doc__, engine=False)
    parser.add_argument("--target", default="http://127.0.0.1:8000")
    parser.add_argument("--bundle", type=Path, required=True, help="user ids and item URIs")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--concurrency", type=int, default=16, help="callers for the capacity")
    parser.add_argument("--capacity", type=float, default=None, help="skip measuring it")
    parser.add_argument("--multiples", default="0.5,1,2,3,5")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    run_bench(parser, run, report)


if __name__ == "__main__":
    main()
