"""Reports: tables (pandas -> terminal, markdown, CSV) and plots (matplotlib) from run records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from bench import metrics
from bench.results import load_records


def _cell_text(row: pd.Series) -> str:
    if row["status"] != "ok":
        return row["status"]
    text = f"{row['tokens_per_s_per_gpu']:,.0f}"
    if not np.isnan(row.get("speedup_vs_same_1", np.nan)):
        text += f" ({row['speedup_vs_same_1']:.2f}x, {row['efficiency_vs_same_1']:.0%})"
    return text


def scaling_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per hardware and setting: rows strategies, columns process counts, cells 'tok/s/GPU (speedup, eff)'."""
    out = {}
    for (hw, key), group in df.groupby(["hardware", "setting_key"], sort=False):
        g = group.assign(text=group.apply(_cell_text, axis=1))
        table = g.pivot_table(index="strategy", columns="gpus", values="text", aggfunc="last", sort=False)
        table.columns = [f"{c} proc" if g["device"].iloc[0] == "cpu" else f"{c} GPU" for c in table.columns]
        out[f"{metrics.setting_title(key)} on {hw}"] = table.fillna("-")
    return out


def detail_table(df: pd.DataFrame) -> pd.DataFrame:
    cols = ["label", "status", "step_time_s", "step_time_p10_s", "step_time_p90_s", "tokens_per_s",
            "tokens_per_s_per_gpu", "speedup_vs_same_1", "efficiency_vs_same_1", "speedup_vs_plain_1",
            "peak_allocated_gib", "peak_reserved_gib", "host_rss_peak_gib", "wall_s", "error"]
    return df[[c for c in cols if c in df.columns]]


def build(results_dirs: list[Path]) -> pd.DataFrame:
    records = [r for d in results_dirs for r in load_records(d)]
    if not records:
        raise FileNotFoundError(f"no records in {', '.join(map(str, results_dirs))} (looked for runs.jsonl)")
    return metrics.add_speedups(metrics.aggregate_repeats(metrics.frame(records)))


def write_report(results_dirs: list[Path], out_dir: Path, console: Console | None = None) -> Path:
    console = console or Console()
    df = build(results_dirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# bench report: {', '.join(d.name for d in results_dirs)}", "",
             "Cells: tokens/s per GPU (or per process on CPU), then speedup and efficiency against the same "
             "strategy at 1 process. A failed cell shows its status.", ""]
    for i, (title, table) in enumerate(scaling_tables(df).items(), 1):
        lines += [f"## {title}", "", table.to_markdown(), ""]
        table.to_csv(out_dir / f"scaling_{i}.csv")
        _print(console, title, table)
    detail = detail_table(df)
    detail.to_csv(out_dir / "cells.csv", index=False)
    lines += ["## All cells", "", detail.to_markdown(index=False, floatfmt=".3g"), ""]
    (out_dir / "index.md").write_text("\n".join(lines))
    console.print(f"report written to {out_dir}/index.md")
    return out_dir


def _print(console: Console, title: str, table: pd.DataFrame) -> None:
    t = Table(title=title, title_justify="left")
    t.add_column("strategy")
    for c in table.columns:
        t.add_column(str(c), justify="right")
    for strategy, row in table.iterrows():
        t.add_row(str(strategy), *[str(v) for v in row])
    console.print(t)
