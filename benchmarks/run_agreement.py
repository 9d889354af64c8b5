"""Do two runs of one matrix agree? Issue 16's bar for repeatable numbers, read from two result folders.

Two complete runs of a matrix (a and b: fresh launches, possibly in different device calls or on different
machines of the same kind) are compared cell by cell on the figure the report leads with: real (non-padding)
tokens per second, the median over a cell's ok launches (bench.report.repeats.aggregate_repeats, as
`bench report` computes it). Nothing is launched.

    python benchmarks/run_agreement.py results/llama-full-h200-a2 results/llama-full-h200-b2
    python benchmarks/run_agreement.py A B --tolerance 0.02 --share 0.9 --min-steps 20 --markdown out.md

Printed: per cell, both figures, b / a - 1, the launches and the fewest timed steps of any ok launch on each
side, how busy its cards were on each side (NVML utilisation over the timed window, median over launches: below
~90 % the steps wait on the host, and those cells move most between runs), where a difference sits (b / a - 1 of
the forward+backward and of the optimizer part of a step: the card's pace against the host's, for a step whose
optimizer is hundreds of small launches), how fast each side's host CPU ran (bench/worker/cpu_probe.py; records
from before it: -), and the card; then the bar: at least ``--share`` of the cells ok on both sides agree within
``--tolerance``, and every ok launch timed at least ``--min-steps`` steps, with the agreement of the cells whose
cards stayed busy and of those that waited on the host shown apart (beside the bar, not instead of it); then each run's wall time (first
launch's start to last launch's end, and the sum of the launches' own wall times, start-up included) and its
cards. Cells of one side only, or not ok on both, are listed and left out of the share.
``--host-steady`` compares the figure each launch gives over the steps timed on a steady host instead
(bench/report/host_steady.py; records from before the per-step probe have none) and adds each side's share of
timed steps on a slow host: the agreement a steady host would give, beside the bar, not the bar's figure.
Exit 0 when the bar is met, 1 when not, 2 on bad input (a folder without records, no cell in common, runs
on different cards: timings compare only within one kind of card).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from bench.records.store import latest_runs, load_records
from bench.report.cautions import HOST_BOUND_BUSY_PCT
from bench.report.metrics import frame
from bench.report.repeats import aggregate_repeats

FIGURE = "real_tokens_per_s"
HOST_STEADY = "real_tokens_per_s_host_steady"


def load(folder: Path) -> tuple[pd.DataFrame, list]:
    records = latest_runs(load_records(folder))
    if not records:
        raise SystemExit(f"error: no records in {folder}. Fix: give a results folder holding a runs.jsonl")
    cells = aggregate_repeats(frame(records))
    return cells.merge(phase_medians(records), on="cell_id", how="left"), records


def wall_time(records: list) -> tuple[float, float]:
    """(first start to last end, sum of launches' wall times) in seconds, over records that say both."""
    timed = [r for r in records if r.started_at and r.wall_s]
    if not timed:
        return float("nan"), float("nan")
    span = max(r.started_at + r.wall_s for r in timed) - min(r.started_at for r in timed)
    return span, sum(r.wall_s for r in timed)


def phase_medians(records: list) -> pd.DataFrame:
    """Per cell: the median over its ok launches of the slowest rank's median forward+backward and optimizer
    seconds per timed step (bench/worker/train.py's two parts of a step): where two runs of a cell differ."""
    rows = []
    for r in records:
        if r.status != "ok":
            continue
        timed = [[s for s in rank.get("steps", []) if s.get("phase") == "timed" and "optim_s" in s] for rank in r.ranks]
        if not all(timed):
            continue
        rows.append({"cell_id": r.cell_id,
                     **{part: max(pd.Series([s[part] for s in steps]).median() for steps in timed)
                        for part in ("fwd_bwd_s", "optim_s")}})
    columns = ["cell_id", "fwd_bwd_s", "optim_s"]
    return pd.DataFrame(rows, columns=columns).groupby("cell_id", as_index=False).median()


def compare(a: pd.DataFrame, b: pd.DataFrame, tolerance: float, figure: str = FIGURE) -> pd.DataFrame:
    cols = ["cell_id", "label", "status", "machine", figure, "repeats_ok", "timed_steps", "util_mean_pct",
            "cpu_probe_ms", "host_slow_step_share", "fwd_bwd_s", "optim_s", "micro_batch"]
    a, b = (side.reindex(columns=list(dict.fromkeys([*side.columns, *cols]))) for side in (a, b))
    both = a[cols].merge(b[cols], on="cell_id", how="outer", suffixes=("_a", "_b"))
    both["label"] = both["label_a"].fillna(both["label_b"])
    # An auto micro-batch cell may settle on different micro-batches in two runs (train.micro_batch: auto):
    # then the two figures measure two configurations, and their ratio is no agreement. Left out, and said.
    both["other_micro_batch"] = (both["micro_batch_a"].notna() & both["micro_batch_b"].notna()
                                 & (both["micro_batch_a"] != both["micro_batch_b"]))
    ok = ((both["status_a"] == "ok") & (both["status_b"] == "ok") & ~both["other_micro_batch"]
          & both[f"{figure}_a"].notna() & both[f"{figure}_b"].notna())
    both["change"] = (both[f"{figure}_b"] / both[f"{figure}_a"] - 1).where(ok)
    both["agrees"] = (both["change"].abs() <= tolerance).where(ok)
    for part in ("fwd_bwd_s", "optim_s"):
        both[f"{part}_change"] = (both[f"{part}_b"] / both[f"{part}_a"] - 1).where(ok)
    return both


def _figure(row: pd.Series, side: str, figure: str) -> str:
    status = row[f"status_{side}"]
    if status == "ok":
        value = row[f"{figure}_{side}"]
        return f"{value:,.0f}" if pd.notna(value) else "no figure"
    return str(status) if pd.notna(status) else "absent"


def _pair(row: pd.Series, column: str, digits: int = 0, scale: float = 1.0) -> str:
    return "/".join(f"{row[f'{column}_{s}'] * scale:.{digits}f}" if pd.notna(row[f"{column}_{s}"]) else "-"
                    for s in "ab")


def busy_split(judged: pd.DataFrame, tolerance: float) -> list[str]:
    """The agreement apart for cells whose cards stayed busy on both sides and for those that waited on the host
    on either (NVML busy below bench.report.cautions.HOST_BOUND_BUSY_PCT): the second kind follows the host's
    pace, which moved 2x between launches of one machine (results/llama8b-h200-d/agreement-vs-c.md). Said
    beside the bar, which counts every cell; nothing where the records have no utilisation."""
    busy_a, busy_b = judged["util_mean_pct_a"], judged["util_mean_pct_b"]
    if judged.empty or busy_a.isna().any() or busy_b.isna().any():
        return []
    busy = (busy_a >= HOST_BOUND_BUSY_PCT) & (busy_b >= HOST_BOUND_BUSY_PCT)
    out = []
    for kind, part in ((f"cards busy (NVML >= {HOST_BOUND_BUSY_PCT:.0f} % on both sides)", judged[busy]),
                       (f"cards waiting on the host (NVML < {HOST_BOUND_BUSY_PCT:.0f} % on either side)", judged[~busy])):
        if len(part):
            out.append(f"  - {kind}: {int(part['agrees'].sum())} of {len(part)} within {tolerance:.0%}, "
                       f"largest |b / a - 1| {part['change'].abs().max():.1%}")
    return out


def render(both: pd.DataFrame, args: argparse.Namespace, walls: dict[str, tuple[float, float]],
           cards: dict[str, str]) -> tuple[str, bool]:
    steady = args.figure == HOST_STEADY
    name = "tok/s on a steady host" if steady else "tok/s"
    lines = [f"| cell | a {name} | b {name} | b / a - 1 | fwd+bwd b / a - 1 | optimizer b / a - 1 | launches a/b | "
             "fewest timed steps a/b | card busy % a/b | host CPU probe ms a/b | "
             + ("steps on a slow host % a/b | " if steady else "") + "card |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | " + ("---: | " if steady else "")
             + "--- |"]
    for _, r in both.iterrows():
        change, fwd_bwd, optim = (f"{r[c]:+.1%}" if pd.notna(r[c]) else "" for c in
                                  ("change", "fwd_bwd_s_change", "optim_s_change"))
        if r["other_micro_batch"]:
            change = f"mb {r['micro_batch_a']:.0f} vs {r['micro_batch_b']:.0f}: not compared"
        slowed = f"{_pair(r, 'host_slow_step_share', scale=100)} | " if steady else ""
        lines.append(f"| {r['label']} | {_figure(r, 'a', args.figure)} | {_figure(r, 'b', args.figure)} | {change} | "
                     f"{fwd_bwd} | {optim} | {_pair(r, 'repeats_ok')} | {_pair(r, 'timed_steps')} | "
                     f"{_pair(r, 'util_mean_pct')} | {_pair(r, 'cpu_probe_ms', 2)} | {slowed}"
                     f"{r['machine_a'] if pd.notna(r['machine_a']) else r['machine_b']} |")
    judged = both[both["agrees"].notna()]
    agree = int(judged["agrees"].sum())
    share = agree / len(judged) if len(judged) else 0.0
    fewest = int(min(judged["timed_steps_a"].min(), judged["timed_steps_b"].min())) if len(judged) else 0
    met = len(judged) > 0 and share >= args.share and fewest >= args.min_steps
    lines += ["",
              f"- agreement: {agree} of {len(judged)} cells ok on both sides within {args.tolerance:.0%} "
              f"({share:.0%}; bar {args.share:.0%}); largest |b / a - 1| "
              f"{judged['change'].abs().max():.1%}" if len(judged) else "- agreement: no cell ok on both sides",
              *busy_split(judged, args.tolerance),
              f"- fewest timed steps of any ok launch: {fewest} (bar {args.min_steps})",
              f"- left out (not ok on both sides, on one side only, without the figure, or an auto micro-batch cell "
              f"run at different micro-batches: {int(both['other_micro_batch'].sum())}): {len(both) - len(judged)}"]
    for side, folder in (("a", args.a), ("b", args.b)):
        span, total = walls[side]
        lines.append(f"- run {side}: `{folder}`, {cards[side]}; wall time {span / 60:.1f} min from the first "
                     f"launch's start to the last one's end ({total / 60:.1f} min in launches)")
    if steady:
        lines.append("- figure: real tokens/s over the steps timed on a steady host (bench/report/host_steady.py), "
                     "not the report's headline: what a steady host would give")
    lines.append(f"- verdict{' on that figure' if steady else ''}: {'bar met' if met else 'bar NOT met'}")
    return "\n".join(lines), met


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--tolerance", type=float, default=0.02, help="largest |b / a - 1| that agrees (0.02)")
    p.add_argument("--share", type=float, default=0.9, help="share of cells that must agree (0.9)")
    p.add_argument("--min-steps", type=int, default=20, help="fewest timed steps an ok launch may have (20)")
    p.add_argument("--markdown", type=Path, help="also write the output here")
    p.add_argument("--host-steady", dest="figure", action="store_const", const=HOST_STEADY, default=FIGURE,
                   help="compare the launches' figures over the steps timed on a steady host (see the docstring)")
    args = p.parse_args(argv)
    try:
        (a, rec_a), (b, rec_b) = load(args.a), load(args.b)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    cards = {"a": ", ".join(sorted({r.env.get("hardware", "?") for r in rec_a})),
             "b": ", ".join(sorted({r.env.get("hardware", "?") for r in rec_b}))}
    if cards["a"] != cards["b"]:
        print(f"error: the runs ran on different hardware ({cards['a']} vs {cards['b']}): timings compare only "
              "within one kind of card. Fix: compare runs of the same machine kind", file=sys.stderr)
        return 2
    both = compare(a, b, args.tolerance, args.figure)
    if not both["status_a"].notna().mul(both["status_b"].notna()).any():
        print(f"error: {args.a} and {args.b} share no cell id. Fix: give two runs of the same matrix",
              file=sys.stderr)
        return 2
    text, met = render(both, args, {"a": wall_time(rec_a), "b": wall_time(rec_b)}, cards)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
