"""Is a slow host pace ours to steady? Map how fast each CPU runs Python, alone and beside our own busy threads.

Issue 16's host-bound cells (ZeRO-3 and FSDP LoRA on 8B, cards 70-85 % busy) take the host's pace, and on the
H200 machines (Firecracker microVMs) the CPU probe (bench/worker/cpu_probe.py) read either ~4 ms or ~8 ms,
flipping within a launch, with no SMT siblings visible in the guest (results/llama8b-h200-c, -d). Three causes
fit that and each asks for something else:
- hidden siblings: two of the guest's vCPUs share a physical core without the guest being told; then our own
  busy threads (each rank's main thread spins at 1.0 CPU per wall second) halve each other's pace, and pinning
  ranks to vCPUs that do not share a core would steady them;
- a package-wide clock: the more cores busy, the lower the turbo; then our load matters a little, the
  neighbours' more;
- something beneath the guest alone (other tenants' threads on our cores' siblings, the host's power state):
  then nothing in the harness reaches it and only repeated launches average it out.

Three measurements tell them apart, with nothing else running:
1. ``idle``: the probe on every vCPU, a few rounds apart: how often a vCPU is slow with the guest idle;
2. ``pairs``: the probe on a target vCPU while a spinner (a pinned busy Python loop) runs on one other vCPU,
   for every other vCPU: a vCPU that halves the target's pace is its hidden sibling;
3. ``load``: the probe on the target with k spinners on other vCPUs (k = 0, 1, 2, 4, ... all): a pace that
   falls with k is a package clock.

And while a cell trains, whether its slow steps come with a slow host everywhere or only on its own CPUs:
4. ``--watch-s``: the probe on each of ``--watch-cpus`` in turn (CPUs the cell is kept off, e.g. with
   ``taskset``), every ``--every-s``, appended to a JSON-lines file as it goes;
5. ``--correlate RUNS.jsonl WATCH.jsonl``: each timed step of each ok record's rank 0 beside the watch's
   median pace during that step, and the rank correlation (Spearman) between the two per record.

    python benchmarks/host_pace.py --out host-pace.json [--targets all] [--rounds 5]
    python benchmarks/host_pace.py --watch-s 400 --watch-cpus 8-15 --out watch.jsonl &
    python benchmarks/host_pace.py --correlate results/X/runs.jsonl watch.jsonl

Prints a summary; the JSON keeps every reading. Runs anywhere Linux lets a process pin itself (the CPU tests run
it on two vCPUs)."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.machine.cpu_affinity import parse_cpu_list  # noqa: E402
from bench.report.host_steady import SLOW_RATIO as SIBLING_RATIO  # noqa: E402  the two paces are ~2x apart
from bench.worker.cpu_probe import probe_ms  # noqa: E402
PROBE_REPEATS = 5


def _spin(cpu: int, stop) -> None:
    """A busy Python loop pinned to ``cpu`` until ``stop`` is set: what a rank's spinning main thread does."""
    os.sched_setaffinity(0, {cpu})
    x = 0
    while not stop.is_set():
        for i in range(20_000):
            x = (x + i) & 0xFFFF


class Spinners:
    """Busy loops on the given CPUs for the length of a ``with`` block."""

    def __init__(self, cpus: list[int]) -> None:
        ctx = mp.get_context("fork")
        self._stop = ctx.Event()
        self._procs = [ctx.Process(target=_spin, args=(c, self._stop), daemon=True) for c in cpus]

    def __enter__(self) -> "Spinners":
        for p in self._procs:
            p.start()
        time.sleep(0.05)  # let each reach its CPU and spin before the probe starts
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for p in self._procs:
            p.join(timeout=5)


def probe_on(cpu: int, repeats: int = PROBE_REPEATS) -> float:
    """The probe's time (ms, fastest of ``repeats``) with this process pinned to ``cpu``."""
    os.sched_setaffinity(0, {cpu})
    return probe_ms(repeats=repeats)


def idle_map(cpus: list[int], rounds: int, pause_s: float) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {c: [] for c in cpus}
    for r in range(rounds):
        for c in cpus:
            out[c].append(probe_on(c))
        if r + 1 < rounds:
            time.sleep(pause_s)
    return out


def pair_scan(target: int, cpus: list[int]) -> dict:
    """The target's probe alone, then beside a spinner on each other CPU (alone again between, so a drift of the
    host's pace during the scan shows as a moving baseline rather than as a sibling)."""
    rows = []
    for other in (c for c in cpus if c != target):
        alone = probe_on(target)
        with Spinners([other]):
            beside = probe_on(target)
        rows.append({"other": other, "alone_ms": alone, "beside_ms": beside, "ratio": beside / alone})
    return {"target": target, "rows": rows,
            "suspected_siblings": [r["other"] for r in rows if r["ratio"] > SIBLING_RATIO]}


def load_scan(target: int, cpus: list[int]) -> list[dict]:
    others = [c for c in cpus if c != target]
    counts = sorted({k for k in (0, 1, 2, 4, 8, 16, 32, 64) if k < len(others)} | {len(others)})
    rows = []
    for k in counts:
        with Spinners(others[:k]):
            rows.append({"spinners": k, "probe_ms": probe_on(target)})
    return rows


def watch(cpus: list[int], seconds: float, every_s: float, out: Path) -> int:
    """Probe ``cpus`` in turn for ``seconds``, a line per reading appended (and flushed) to ``out``, so a kill
    keeps what was read. Returns the number of readings."""
    deadline, n = time.time() + seconds, 0
    with out.open("a") as sink:
        while time.time() < deadline:
            cpu = cpus[n % len(cpus)]
            started = time.time()
            sink.write(json.dumps({"t": started, "cpu": cpu, "probe_ms": probe_on(cpu)}) + "\n")
            sink.flush()
            n += 1
            time.sleep(max(0.0, every_s - (time.time() - started)))
    return n


def correlate(runs: Path, watch_file: Path) -> list[dict]:
    """Per ok record: its rank 0's timed steps beside the watch's median probe during each step (steps the
    watch did not read during are left out), and Spearman's rank correlation between the two."""
    from scipy.stats import spearmanr

    readings = [json.loads(line) for line in watch_file.read_text().splitlines() if line.strip()]
    out = []
    for record in map(json.loads, runs.read_text().splitlines()):
        if record.get("status") != "ok":
            continue
        pairs = []
        for step in (s for s in record["ranks"][0]["steps"] if s["phase"] == "timed"):
            start, end = step["started_at"], step["started_at"] + step["time_s"]
            during = [r["probe_ms"] for r in readings if start <= r["t"] <= end]
            if during:
                pairs.append((step["time_s"], statistics.median(during)))
        row = {"cell_id": record.get("cell_id"), "repeat": record.get("repeat"), "label": record.get("label"),
               "steps_with_readings": len(pairs)}
        if len(pairs) >= 5:
            rho, p = spearmanr([a for a, _ in pairs], [b for _, b in pairs])
            row |= {"spearman_rho": float(rho), "p_value": float(p),
                    "step_s_median": statistics.median(a for a, _ in pairs),
                    "watch_ms_median": statistics.median(b for _, b in pairs)}
        out.append(row)
    return out


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    models = sorted({line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")})
    mhz = [float(line.split(":", 1)[1]) for line in cpuinfo.splitlines() if line.startswith("cpu MHz")]
    siblings = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")
    return {"kernel": platform.release(), "cpu_models": models, "cpu_mhz_reported": sorted(set(mhz))[:8],
            "cpu0_thread_siblings_sysfs": siblings.read_text().strip() if siblings.exists() else None,
            "cpufreq_visible": Path("/sys/devices/system/cpu/cpu0/cpufreq").exists(),
            "usable_cpus": sorted(os.sched_getaffinity(0))}


def summarize(result: dict) -> list[str]:
    lines = [f"machine: {result['machine']['cpu_models']} kernel {result['machine']['kernel']}, "
             f"{len(result['machine']['usable_cpus'])} usable CPUs, sysfs siblings of cpu0: "
             f"{result['machine']['cpu0_thread_siblings_sysfs']}"]
    every = [ms for readings in result["idle"].values() for ms in readings]
    fastest = min(every)
    slow = sum(ms > SIBLING_RATIO * fastest for ms in every)
    lines.append(f"idle: {len(every)} readings over {len(result['idle'])} CPUs, fastest {fastest:.2f} ms, median "
                 f"{statistics.median(every):.2f}, slowest {max(every):.2f}; {slow} over {SIBLING_RATIO}x the fastest")
    for scan in result["pairs"]:
        ratios = [r["ratio"] for r in scan["rows"]]
        lines.append(f"pairs, target cpu {scan['target']}: beside/alone {min(ratios):.2f}-{max(ratios):.2f} "
                     f"(median {statistics.median(ratios):.2f}); suspected siblings: {scan['suspected_siblings'] or 'none'}")
    for target, rows in result["load"].items():
        lines.append(f"load, target cpu {target}: " + ", ".join(f"{r['spinners']} spinning {r['probe_ms']:.2f} ms"
                                                            for r in rows))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSON with every reading (JSON lines with --watch-s)")
    parser.add_argument("--targets", default="0", help="CPUs (cpulist, or 'all') to scan pairs and load against")
    parser.add_argument("--rounds", type=int, default=5, help="idle rounds over every CPU")
    parser.add_argument("--pause-s", type=float, default=2.0, help="seconds between idle rounds")
    parser.add_argument("--watch-s", type=float, help="watch mode: probe --watch-cpus in turn this long")
    parser.add_argument("--watch-cpus", default="", help="cpulist for --watch-s, e.g. 8-15")
    parser.add_argument("--every-s", type=float, default=0.25, help="seconds between watch readings")
    parser.add_argument("--correlate", nargs=2, type=Path, metavar=("RUNS", "WATCH"),
                        help="step times of RUNS (a runs.jsonl) against WATCH (a --watch-s file)")
    args = parser.parse_args(argv)
    if args.correlate:
        for row in correlate(*args.correlate):
            print(json.dumps(row))
        return 0
    if args.out is None:
        parser.error("--out is required (except with --correlate)")
    cpus = sorted(os.sched_getaffinity(0))
    if args.watch_s:
        watched = parse_cpu_list(args.watch_cpus)
        if not watched or not set(watched) <= set(cpus):
            parser.error(f"--watch-cpus {args.watch_cpus!r}: name usable CPUs (of {cpus}), e.g. --watch-cpus 8-15")
        print(f"{watch(watched, args.watch_s, args.every_s, args.out)} readings in {args.out}")
        return 0
    targets = cpus if args.targets == "all" else parse_cpu_list(args.targets)
    missing = [t for t in targets if t not in cpus]
    if missing:
        parser.error(f"--targets {missing} not among the usable CPUs {cpus}")
    t0 = time.time()
    result = {"machine": machine(), "sibling_ratio": SIBLING_RATIO, "probe_repeats": PROBE_REPEATS,
              "idle": idle_map(cpus, args.rounds, args.pause_s),
              "pairs": [pair_scan(t, cpus) for t in targets],
              "load": {t: load_scan(t, cpus) for t in targets}}
    result["wall_s"] = time.time() - t0
    args.out.write_text(json.dumps(result, indent=1))
    print("\n".join(summarize(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
