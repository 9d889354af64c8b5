"""What the NVML sampler costs in throughput, measured inside one long run with the sampler switched on and off.

Comparing separate launches (sampler on vs off) drowns a sub-percent effect in launch-to-launch spread
(1-7 % on H100). So this runs ONE cell with many timed steps, with bench's own sampler off
(BENCH_SAMPLER=0), and drives the same sampler class (bench.machine.sampler.NvmlSampler, same cards, same
interval, same NVML calls, from a parent-side process as in `bench run`) itself: on for WINDOW seconds,
off for WINDOW seconds, over and over. Each step is stamped with its wall-clock start by the worker; a
step that lies wholly inside an "on" window is an on-step, wholly inside an "off" window an off-step,
steps across a switch are dropped. The step time of a cell is its slowest rank's.

Output: the cost as the mean of the differences between each on window and its two off neighbours
(a linear drift cancels) with its 95 % interval; the pooled on/off difference with a bootstrap interval and
Mann-Whitney p-value; the sampling rate achieved, the sampler thread's own CPU use, and the card. Target: the sampler costs at most 0.5 %.

Amplified run (--interval well below bench's): a step's spread of a few % on a shared host keeps the
interval near +-3 % at bench's 20 Hz, too wide to decide 0.5 %. Every sample does the same NVML calls
and Python work, so the cost grows with the number of samples per second; sampling N times faster
and scaling the measured cost and its interval down by N (bench's rate / the achieved rate) projects
the cost at bench's rate with an interval N times narrower. The projection assumes that linearity
(no fixed cost of merely having the sampler thread, which the on/off windows at bench's own rate bound).

    python benchmarks/sampler_overhead.py                         # llama-3.2-1b, ddp, 1 GPU, 400 timed steps
    python benchmarks/sampler_overhead.py --gpus 2 --steps 600 --window 1.5 --out /tmp/so
    python benchmarks/sampler_overhead.py --interval 0.002 --steps 600    # amplified: ~25x bench's rate
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from scipy.stats import mannwhitneyu

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.machine.sampler import NvmlSampler, interval_from_env  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--device", default="cuda", help="cpu only checks the plumbing (no NVML there)")
    p.add_argument("--steps", type=int, default=400, help="timed steps of the one run")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--window", type=float, default=2.0, help="seconds the sampler stays on, then off")
    p.add_argument("--interval", type=float, default=None, help="sampling interval in seconds (default: bench's)")
    p.add_argument("--out", type=Path, default=None, help="keep the results here (default: a temporary folder)")
    return p.parse_args()


def write_matrix(folder: Path, args: argparse.Namespace) -> Path:
    matrix = {
        "name": "sampler-overhead", "model": args.model, "strategy": args.strategy, "gpus": args.gpus,
        "device": args.device,
        "train": {"seq_len": args.seq_len, "micro_batch": args.micro_batch, "precision": "bf16",
                  "optimizer": "adamw_torch", "grad_checkpointing": True, "warmup_steps": 3,
                  "steps": args.steps},
        "limits": {"timeout_s": 900, "hang_s": 240, "startup_s": 300},
    }
    path = folder / "sampler-overhead.yaml"
    path.write_text(yaml.safe_dump(matrix, sort_keys=False))
    return path


def cpu_seconds() -> float:
    """CPU time this process has used (all threads: the sampler's included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def toggle_sampler(proc: subprocess.Popen, gpus: int, window: float, interval: float) -> list[tuple]:
    """On/off windows (state, start, end, samples, CPU seconds of this process) until ``proc`` ends."""
    windows, on = [], True
    while proc.poll() is None:
        start, cpu0 = time.time(), cpu_seconds()
        sampler = NvmlSampler(gpus, interval_s=interval) if on else None
        if sampler:
            sampler.start()
        deadline = time.monotonic() + window
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        if sampler:
            sampler.stop([])
            samples = len(sampler.traces[0].t) if sampler.traces else 0
        end = time.time()
        windows.append(("on" if on else "off", start, end, samples if on else 0, cpu_seconds() - cpu0))
        on = not on
    return windows


def classify(record: dict, windows: list) -> list[list[float]]:
    """Slowest-rank time of each timed step, grouped by the window that wholly contains it (one list per window)."""
    ranks = [[s for s in r["steps"] if s["phase"] == "timed"] for r in record["ranks"]]
    out: list[list[float]] = [[] for _ in windows]
    for steps in zip(*ranks):
        start = min(s["started_at"] for s in steps)
        end = max(s["started_at"] + s["time_s"] for s in steps)
        slowest = max(s["time_s"] for s in steps)
        for i, (_, w0, w1, *_rest) in enumerate(windows):
            if w0 <= start and end <= w1:
                out[i].append(slowest)
                break
    return out


def paired_differences(windows: list, per_window: list[list[float]]) -> np.ndarray:
    """(on - off) / off in percent, for each on window against the mean of the off windows on both sides.

    Step times drift over tens of seconds (clocks, the host's other load); the two neighbours straddle
    an on window, so a drift that is linear over the three windows cancels exactly, which pooling all
    steps would not do.
    """
    diffs = []
    for i in range(1, len(windows) - 1):
        before, now, after = per_window[i - 1], per_window[i], per_window[i + 1]
        if windows[i][0] == "on" and windows[i - 1][0] == windows[i + 1][0] == "off" and before and now and after:
            off = (np.mean(before) + np.mean(after)) / 2
            diffs.append(100 * (np.mean(now) - off) / off)
    return np.array(diffs)


def bootstrap_ci(on: np.ndarray, off: np.ndarray, rounds: int = 10000) -> tuple[float, float]:
    """95 % interval of (mean on - mean off) / mean off, in percent."""
    rng = np.random.default_rng(0)
    a = rng.choice(on, (rounds, on.size)).mean(axis=1)
    b = rng.choice(off, (rounds, off.size)).mean(axis=1)
    lo, hi = np.percentile(100 * (a - b) / b, [2.5, 97.5])
    return float(lo), float(hi)


def project_to_rate(cost: float, ci: tuple[float, float], achieved_hz: float, target_hz: float) -> dict:
    """A cost measured at ``achieved_hz``, scaled to ``target_hz`` by the ratio of samples per second."""
    scale = target_hz / achieved_hz
    return {"at_hz": target_hz, "scale": scale, "cost_percent": cost * scale,
            "ci95_percent": [ci[0] * scale, ci[1] * scale]}


def verdict(lo: float, hi: float, target: float = 0.5) -> str:
    if hi <= target:
        return f"within the {target:g} % target"
    return f"over the {target:g} % target" if lo > target else f"undecided (the interval spans {target:g} %)"


def main() -> int:
    args = parse_args()
    folder = args.out or Path(tempfile.mkdtemp(prefix="sampler-overhead-"))
    folder.mkdir(parents=True, exist_ok=True)
    interval = args.interval if args.interval is not None else interval_from_env()
    matrix = write_matrix(folder, args)
    env = {**os.environ, "BENCH_SAMPLER": "0"}  # bench's own sampler off: this script drives it
    cmd = [sys.executable, "-m", "bench.cli", "run", str(matrix), "--results", str(folder / "results")]
    with open(folder / "bench-run.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        windows = toggle_sampler(proc, args.gpus, args.window, interval)
    if proc.returncode != 0:
        sys.exit(f"bench run failed ({proc.returncode}): see {folder / 'bench-run.log'}")
    record = json.loads((folder / "results" / "runs.jsonl").read_text().splitlines()[-1])
    if record["status"] != "ok":
        sys.exit(f"cell not ok: {record['status']}: {record.get('error')}")
    per_window = classify(record, windows)
    on = np.array([t for w, ts in zip(windows, per_window) if w[0] == "on" for t in ts])
    off = np.array([t for w, ts in zip(windows, per_window) if w[0] == "off" for t in ts])
    if on.size < 10 or off.size < 10:
        sys.exit(f"too few steps inside windows (on {on.size}, off {off.size}): raise --steps or --window")
    pairs = paired_differences(windows, per_window)
    cost = float(pairs.mean())
    half = 1.96 * float(pairs.std(ddof=1)) / len(pairs) ** 0.5
    lo, hi = cost - half, cost + half
    pooled = 100 * (on.mean() - off.mean()) / off.mean()
    pooled_lo, pooled_hi = bootstrap_ci(on, off)
    p = float(mannwhitneyu(on, off, alternative="two-sided").pvalue)
    on_windows = [w for w in windows if w[0] == "on"]
    off_windows = [w for w in windows if w[0] == "off"]
    hz = sum(w[3] for w in on_windows) / sum(w[2] - w[1] for w in on_windows)
    # What the sampler thread itself burns, in % of one core: this process's CPU rate on minus off.
    cpu_share = 100 * (sum(w[4] for w in on_windows) / sum(w[2] - w[1] for w in on_windows)
                       - sum(w[4] for w in off_windows) / max(1e-9, sum(w[2] - w[1] for w in off_windows)))
    card = record["ranks"][0].get("gpu_name")
    summary = {
        "card": card, "cell": f"{args.model} {args.strategy} x{args.gpus} GPU, seq {args.seq_len}, "
                              f"micro-batch {args.micro_batch}",
        "window_s": args.window, "interval_s": interval, "achieved_hz": hz,
        "sampler_cpu_percent_of_one_core": cpu_share, "host_cpus": os.cpu_count(),
        "steps_on": int(on.size), "steps_off": int(off.size),
        "step_s_on_mean": float(on.mean()), "step_s_off_mean": float(off.mean()),
        "step_s_on_sd": float(on.std(ddof=1)), "step_s_off_sd": float(off.std(ddof=1)),
        "window_pairs": len(pairs), "cost_percent": cost, "ci95_percent": [lo, hi],
        "pooled_cost_percent": float(pooled), "pooled_ci95_percent": [pooled_lo, pooled_hi], "mann_whitney_p": p,
        "target_percent": 0.5, "within_target": hi <= 0.5, "windows": windows,
    }
    bench_hz = 1 / interval_from_env()
    if hz > 1.5 * bench_hz:  # an amplified run: what it implies at bench's own rate
        summary["projected_to_bench_rate"] = project_to_rate(cost, (lo, hi), hz, bench_hz)
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"card: {card}; cell: {summary['cell']}; sampler at {hz:.1f} Hz in {args.window:g} s on/off windows")
    print(f"sampler thread CPU: {cpu_share:.2f} % of one core ({os.cpu_count()} on this host)")
    print(f"step time on : {on.mean() * 1e3:.2f} ms (sd {on.std(ddof=1) * 1e3:.2f}, n={on.size})")
    print(f"step time off: {off.mean() * 1e3:.2f} ms (sd {off.std(ddof=1) * 1e3:.2f}, n={off.size})")
    print(f"pooled steps: {pooled:+.3f} %, 95 % bootstrap CI [{pooled_lo:+.3f}, {pooled_hi:+.3f}] %, "
          f"Mann-Whitney p={p:.3g}")
    print(f"sampler cost (on windows vs their off neighbours, n={len(pairs)}): {cost:+.3f} % of step time, "
          f"95 % CI [{lo:+.3f}, {hi:+.3f}] %: {verdict(lo, hi)}")
    if "projected_to_bench_rate" in summary:
        proj = summary["projected_to_bench_rate"]
        plo, phi = proj["ci95_percent"]
        print(f"projected to bench's {bench_hz:.0f} Hz (x{proj['scale']:.3f}): {proj['cost_percent']:+.3f} %, "
              f"95 % CI [{plo:+.3f}, {phi:+.3f}] %: {verdict(plo, phi)}")
    print(f"records: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
