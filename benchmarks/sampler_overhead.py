"""What the NVML sampler costs in throughput: the same GPU cell with the sampler on and off, several times.

Each run is a fresh `bench run` (its own accelerate launch); on and off alternate, and the order flips
every round, so that a drift of the machine (clocks, temperature) falls on both sides alike. Throughput
is the worker's own figure: tokens of the timed steps over the slowest rank's timed time.
Target: the sampler costs at most 0.5 %.

    python benchmarks/sampler_overhead.py                       # llama-3.2-1b, ddp, 1 GPU, 3 runs each
    python benchmarks/sampler_overhead.py --gpus 2 --runs 5 --interval 0.02
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--runs", type=int, default=3, help="runs with the sampler on, and as many with it off")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--interval", type=float, default=None, help="sampling interval in seconds (default: bench's)")
    p.add_argument("--out", type=Path, default=None, help="keep the results here (default: a temporary folder)")
    return p.parse_args()


def write_matrix(folder: Path, args: argparse.Namespace) -> Path:
    matrix = {
        "name": "sampler-overhead", "model": args.model, "strategy": args.strategy, "gpus": args.gpus,
        "device": "cuda",
        "train": {"seq_len": args.seq_len, "micro_batch": args.micro_batch, "precision": "bf16",
                  "optimizer": "adamw_torch_fused", "grad_checkpointing": True, "warmup_steps": 2,
                  "steps": args.steps},
        "limits": {"timeout_s": 600, "hang_s": 240, "startup_s": 300},
    }
    path = folder / "sampler-overhead.yaml"
    path.write_text(yaml.safe_dump(matrix, sort_keys=False))
    return path


def run_once(matrix: Path, results: Path, sampler_on: bool, interval: float | None) -> dict:
    env = {**os.environ, "BENCH_SAMPLER": "1" if sampler_on else "0"}
    if interval is not None:
        env["BENCH_SAMPLER_INTERVAL_S"] = str(interval)
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(matrix), "--results", str(results)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    record = json.loads((results / "runs.jsonl").read_text().splitlines()[-1])
    if record["status"] != "ok":
        sys.exit(f"cell not ok: {record['status']}: {record.get('error')}")
    return record


def tokens_per_s(record: dict) -> float:
    timed = [[s for s in r["steps"] if s["phase"] == "timed"] for r in record["ranks"]]
    slowest = max(sum(s["time_s"] for s in steps) for steps in timed)
    return sum(s["tokens"] for steps in timed for s in steps) / slowest


def describe(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return (f"mean {statistics.mean(values):,.0f} tok/s, sd {spread:,.0f} ({100 * spread / statistics.mean(values):.2f} %), "
            f"min {min(values):,.0f}, max {max(values):,.0f}, n={len(values)}")


def main() -> int:
    args = parse_args()
    folder = args.out or Path(tempfile.mkdtemp(prefix="sampler-overhead-"))
    folder.mkdir(parents=True, exist_ok=True)
    matrix = write_matrix(folder, args)
    speeds: dict[bool, list[float]] = {True: [], False: []}
    rates = []
    for i in range(args.runs):
        for on in ((True, False) if i % 2 == 0 else (False, True)):
            record = run_once(matrix, folder / f"run{i}-{'on' if on else 'off'}", on, args.interval)
            speeds[on].append(tokens_per_s(record))
            if on:
                rates.append(record["nvml"]["achieved_hz"])
            print(f"round {i + 1}/{args.runs} sampler {'on ' if on else 'off'}: {speeds[on][-1]:,.0f} tok/s", flush=True)
    on, off = speeds[True], speeds[False]
    cost = 100 * (statistics.mean(off) - statistics.mean(on)) / statistics.mean(off)
    # Standard error of the difference of two means, in percent of the off mean.
    se = 100 * ((statistics.variance(on) / len(on) + statistics.variance(off) / len(off)) ** 0.5
                / statistics.mean(off)) if args.runs > 1 else float("nan")
    print(f"\ncell: {args.model} {args.strategy} x{args.gpus} GPU, seq {args.seq_len}, micro-batch {args.micro_batch}, "
          f"{args.steps} timed steps per run")
    print(f"sampler on : {describe(on)}  (sampling at {statistics.mean(rates):.1f} Hz achieved)")
    print(f"sampler off: {describe(off)}")
    verdict = "within" if cost <= 0.5 else "OVER"
    print(f"sampler cost: {cost:+.2f} % of throughput (+- {se:.2f} % standard error), {verdict} the 0.5 % target")
    print(f"records: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
