"""`bench report`: from one or more results folders to report/<name>/ (index.md, self-contained index.html,
a CSV per table, a PNG per plot) and the main tables in the terminal.

Cells are compared only within one machine class (the same GPU model, or the same CPU) and one setting
(everything but strategy and process count), so results from mixed hardware stay apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable

from bench.report import flops, metrics, plots, verdict
from bench.report import cautions, fast_paths, host_steady, nodes, repeats, speedups, tables
from bench.records.caveats import CPU_CAVEAT, folder_errata, stale_cells, without_stale
from bench.spec import MatrixError, TokenBudget, load_matrix
from bench.report.render import HtmlImages, Plot, Section, Table, to_html, to_markdown, write_csvs
from bench.records import MATRIX_COPY, RunRecord, latest_runs, load_records  # noqa: F401 - MATRIX_COPY: a
# results folder holds the matrix it last ran (bench run copies it); its token_budget is then used


@dataclass
class ReportOptions:
    budget: TokenBudget | None = None
    compare: list[str] = field(default_factory=list)
    compare_gpus: int | None = None
    trace_cell: str | None = None
    matrix: Path | None = None  # read token_budget from this matrix file
    html_images: HtmlImages = "embedded"  # "linked": the HTML refers to the PNGs beside it (bench/report/render.py)


DEFINITIONS = [
    "Step time: wall time of one optimizer step, the slowest rank counting; a launch's figure is the median over "
    "its timed steps (warm-up excluded). Throughput: real (non-padding) tokens per step over all ranks / step "
    "time; per GPU (per process on CPU) = that / N.",
    "Launches (fresh `accelerate launch`es of a cell, its repeats) are the unit: a cell's figure is the median "
    "over its ok launches, and '[a-b]' its 95 % interval: with 2+ launches a t-interval of the launch figures "
    "on the log scale (across launches); with one launch the 95 % interval of that launch's median from its "
    "timed steps (the worker's adaptive timing, serial dependence counted, where the record has it; '[no "
    "interval]' where that rule admits none, fewer than 6 effective steps; order statistics of steps taken as "
    "independent in records from before it), marked '(1 launch)': it leaves launch-to-launch variation out, "
    "often the larger part. '1 of 3 launches ok': the other launches did not run ok; a cell with a launch "
    "failed for its own reasons (oom, crash, hang, timeout, unsupported) is listed under 'did not fit' in the "
    "verdict (a launch stopped by Ctrl-C or SIGTERM is not held against it). The p10-p90 spread of the steps "
    "is shown apart, named as such, and is not an error bar.",
    "Like for like: every table names each cell's precision policy (autocast, fsdp-mixed, pure = DeepSpeed "
    "bf16 weights with fp32 master copy, frozen-base = LoRA/QLoRA, fp32). A speedup is against a 1-GPU "
    "baseline of the same setting, card and precision policy: the same strategy at 1 first, else a plain "
    "(single/ddp) run of that policy, else another strategy of its family (DeepSpeed against DeepSpeed), "
    "named where it is not the same strategy. Efficiency = speedup / N, in brackets. The ratio to the plain "
    "1-process run is shown apart and labelled 'cross-policy' where the policies differ: it then mixes the "
    "precision policy into the parallel speedup (DeepSpeed's bf16 mode can beat autocast at 1 GPU).",
    "A cell that did not run ok shows its status (oom, timeout, hang, crash, predicted_oom, unsupported, "
    "skipped ...) in place of every figure; 'no record': the folder holds no run of that cell (left out of "
    "the matrix, or not run yet).",
]


# ---------------------------------------------------------------- inputs

def parse_count(text: str) -> int:
    """'50M' -> 50_000_000; accepts k, M, B/G, T suffixes and plain integers."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgGtT]?)\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a token count: write e.g. 50M, 1.5B or 2000000")
    factor = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}[match.group(2).lower()]
    return int(float(match.group(1)) * factor)


def resolve_budget(options: ReportOptions, results_dirs: list[Path]) -> TokenBudget | None:
    """CLI budget first, then --matrix's token_budget, then a matrix copy inside a results folder."""
    if options.budget is not None:
        return options.budget
    candidates = [options.matrix] if options.matrix else [d / MATRIX_COPY for d in results_dirs]
    for path in candidates:
        if path and Path(path).is_file():
            try:
                budget = load_matrix(path).token_budget
            except MatrixError:
                continue
            if budget is not None:
                return budget
    return None


def load_all(results_dirs: list[Path]) -> list[RunRecord]:
    """The records the report is made of: per results folder, the last record of each (cell, repeat).

    A resumed matrix appends a new record after an interrupted one, --retry-failed after a failure; the
    earlier ones stay on file but are not what the matrix ended with (resume reads a folder the same way).
    Each record is tagged with its folder (``results_folder``): two folders are two runs, so the same cell
    and repeat in both are two launches, pooled by repeats.aggregate_repeats on one machine (two nights of a
    matrix: six launches of a 3-repeat cell), kept apart on two.
    """
    records = []
    for folder in results_dirs:
        for record in without_stale(latest_runs(load_records(folder)), folder):  # its erratum's stale cells out
            record.results_folder = str(folder)  # an extra field: the report's, never written back
            records.append(record)
    if not records:
        raise FileNotFoundError(f"no records in {', '.join(map(str, results_dirs))} (looked for runs.jsonl)")
    return records


def build(results_dirs: list[Path], records: list[RunRecord] | None = None) -> pd.DataFrame:
    """One row of figures per cell (repeats aggregated), with speedups and FLOP rates."""
    records = records if records is not None else load_all(results_dirs)
    df = repeats.aggregate_repeats(metrics.frame(records))
    return metrics.add_flop_rates(speedups.add_speedups(df))


# ---------------------------------------------------------------- sections

def verdict_section(df: pd.DataFrame) -> Section:
    section = Section("Verdict: which strategy to use", [
        "Per setting and process count (nodes x GPUs per node across nodes): the fastest strategy that fits "
        "(ran ok, no launch failed for its own reasons, within the cap and the card), the strategies "
        "statistically indistinguishable from it (the 95 % interval of their throughput ratio to it holds 1, "
        "shown as '0.99x [0.97-1.01]'; where a cell has no interval, whether the figures overlap), and the one "
        "with the lowest peak memory (torch reserved, the worst launch; host RSS on CPU), each as real tokens/s "
        "per GPU [95 % interval] under its own precision policy. "
        "'Intervals from' says whether they span launches or only one launch (see Definitions). A cell stopped "
        "from outside (the operator's deadline or Ctrl-C, a busy card, the scheduler, a skip) is listed under 'not "
        "measured' where there is one: it says nothing about fitting."])
    for i, (_m, _k, title, group) in enumerate(tables.setting_groups(df), 1):
        section.items.append(Table(f"verdict_{i}", title, tables.verdict_table(group),
                                   cautions.verdict_warnings(group)))
    return section


def definitions_section() -> Section:
    return Section("Definitions", list(DEFINITIONS))


def scaling_section(df: pd.DataFrame, out_dir: Path) -> Section:
    section = Section("Scaling", ["Rows: strategies, with their precision policy; columns per process count: "
                                  "real tokens/s per GPU (per process on CPU) [95 % interval] (launches), the "
                                  "speedup (efficiency) against the same-policy 1-process baseline, and the "
                                  "ratio to the plain 1-process run, labelled cross-policy where the policies "
                                  "differ (never a parallel speedup then)."])
    for i, (_m, _k, title, whole) in enumerate(tables.setting_groups(df), 1):
        # Inside one node apart from across nodes (bench/report/nodes.py): each its own table and plot.
        across = nodes.node_scaling_table(whole)
        group = nodes.one_node(whole) if across is not None else whole
        inside = f"{title}, within one node" if across is not None else title
        if len(group):
            section.items.append(Table(f"scaling_{i}", inside, tables.scaling_table(group), tables.warnings_for(group)))
        if across is not None:
            section.items.append(Table(f"scaling_nodes_{i}", f"{title}, across nodes (speedup over 1 node at the "
                                       "same processes per node)", across, []))
        if len(group) and (path := plots.scaling_curves(group, inside, out_dir / f"scaling_{i}.png")):
            section.items.append(Plot(path, f"Scaling curves, {inside}"))
        if across is not None and (path := plots.node_scaling_curves(whole, title, out_dir / f"scaling_nodes_{i}.png")):
            section.items.append(Plot(path, f"Scaling across nodes, {title}"))
    return section


def head_to_head_section(df: pd.DataFrame, options: tables.TableOptions) -> Section:
    notes = ["Each strategy at the compared process count beside its same-policy 1-process baseline (listed "
             "first, '(a baseline)'). Peak memory: torch reserved (max over ranks, the worst launch) on GPU, "
             "host RSS (max over ranks) on CPU. Compared process count "
             f"{options.compare_gpus or '2, or the smallest above 1'} (--compare-gpus)"
             f"{'; strategies ' + ', '.join(options.compare) if options.compare else ''} (--compare STRATEGY)."]
    if options.budget:
        total = options.budget.tokens * options.budget.epochs
        notes.append(f"Projected time to train {tables.tokens_text(options.budget.tokens)} tokens x "
                     f"{options.budget.epochs:g} epochs = {tables.tokens_text(total)} tokens at the measured real "
                     "(non-padding) token throughput, the same-policy baseline's first, excluding start-up, "
                     "evaluation and checkpointing.")
    else:
        notes.append("No token budget given: pass --tokens 50M --epochs 4 (or token_budget in the matrix, "
                     "with --matrix) to project the time to train.")
    section = Section("Head-to-head: same-policy 1 vs N", notes)
    for i, (_m, _k, title, group) in enumerate(tables.setting_groups(df), 1):
        table = tables.head_to_head(group, options)
        if table is not None:
            n = tables.compare_count(group, options.compare_gpus)
            compared = group[(group["gpus"] == n) | (group["gpus"] == 1)]
            section.items.append(Table(f"head_to_head_{i}", title, table, tables.warnings_for(compared)))
    if not section.items:
        section.notes.append("Nothing to compare: no setting has both a 1-process baseline and a run at N > 1.")
    return section


def memory_section(df: pd.DataFrame, out_dir: Path) -> Section:
    section = Section("Memory", [
        "torch peak allocated/reserved: max_memory_allocated/max_memory_reserved, max over ranks (the spread "
        "over ranks is shown when large), the worst launch; 'whole run' includes building and preparing the "
        "model, 'training steps' is the peak after prepare (records from before it was kept apart say so). "
        "NVML used: whole-card memory including the CUDA context and NCCL "
        "buffers, max over the cell's GPUs. Host RSS: peak resident memory of a rank's process (matters for "
        "CPU offload). On CPU the plots show host RSS. Host<->device copies (offloading strategies): time and "
        "size of the PCIe copies of one extra, profiled step (CUPTI through torch.profiler), slowest rank, "
        "beside that step's wall time; copies may overlap compute, so their time bounds what they cost."])
    for i, (_m, _k, title, group) in enumerate(tables.setting_groups(df), 1):
        section.items.append(Table(f"memory_{i}", title, tables.memory_table(group)))
        if path := plots.memory_bars(group, title, out_dir / f"memory_{i}.png"):
            section.items.append(Plot(path, f"Peak memory per strategy, {title}"))
        if path := plots.throughput_vs_memory(group, title, out_dir / f"tradeoff_{i}.png"):
            section.items.append(Plot(path, f"Throughput vs peak memory, {title}"))
    return section


def efficiency_section(df: pd.DataFrame) -> Section:
    section = Section("Efficiency (model FLOPs, MFU)", [
        f"Convention: {flops.CONVENTION}",
        "MFU = model TFLOP/s per GPU (real tokens) / peak, with causal attention (the headline) and with the "
        "full attention matrix beside it; HFU counts the recomputation and every computed token, padding "
        "included. Attention length: the mean real tokens per sequence (the configured length for synthetic "
        "or packed data). An unknown GPU or a CPU leaves MFU empty rather than guessing a peak."])
    for i, (_m, _k, title, group) in enumerate(tables.setting_groups(df), 1):
        section.items.append(Table(f"efficiency_{i}", title, tables.efficiency_table(group)))
    section.items.append(Table("gpu_peaks", "Peak figures used (dense, no sparsity)", tables.peak_table()))
    return section


def energy_section(df: pd.DataFrame) -> Section:
    section = Section("Energy", ["NVML energy counter over the timed steps, all the cell's GPUs together; "
                                 "J per real token = that / (real tokens per step x timed steps), the median "
                                 "over launches. CPU runs have no NVML."])
    for i, (_m, _k, title, group) in enumerate(tables.setting_groups(df), 1):
        section.items.append(Table(f"energy_{i}", title, tables.energy_table(group)))
    return section


def card_state_section(df: pd.DataFrame) -> Section | None:
    if "sm_clock_mean_mhz" not in df.columns or df["sm_clock_mean_mhz"].isna().all():
        return None
    section = Section("Card state", [
        "Mean SM clock over the timed window (mean over the cell's GPUs, median over launches) and the share of "
        "the timed NVML samples under a power or thermal throttle (sw_power_cap, hw_slowdown, "
        "sw_thermal_slowdown, hw_thermal_slowdown, hw_power_brake_slowdown; the most throttled GPU). Records "
        "from before the share was kept only say which reasons were seen. A table whose cells ran at mean "
        f"clocks more than {tables.CLOCK_TOLERANCE:.0%} apart carries a warning: the card, not the strategy, "
        "may account for part of the difference. Card busy: NVML's utilisation over the timed window (the share of "
        "time a kernel ran; mean over the cell's GPUs), below "
        f"{cautions.HOST_BOUND_BUSY_PCT:.0f} % noted: the steps wait on the host. Host CPU busy / stolen: the "
        "share of the host's CPU time (all CPUs, /proc/stat) not idle, and given by the hypervisor to other guests, "
        "over the timed window (the busiest node; records from before it say n/a). Host CPU probe: a fixed piece "
        "of Python work timed on each rank's thread just before and after the window (mean of the two, the "
        "slowest rank; lower is a faster CPU): it compares hosts, so a cell that waits on the host and ran slower "
        "in one launch can be told apart from a slower CPU. Steps on a slow host: a lighter probe before each "
        "timed step and after the last; a step whose reading before or after it, on any rank, is over "
        f"{host_steady.SLOW_RATIO}x the launch's fastest counts as on a slow host, and the real tokens/s per GPU over the "
        "other steps is what a steady host would have given (bench/report/host_steady.py; the headline stays "
        "the median over all steps)."])
    for i, (_m, _k, title, group) in enumerate(tables.setting_groups(df), 1):
        section.items.append(Table(f"card_state_{i}", title, tables.card_state_table(group), tables.warnings_for(group)))
    return section


def prediction_section(df: pd.DataFrame, out_dir: Path) -> Section | None:
    from bench.estimate import ESTIMATOR_VERSION

    pred = tables.prediction_frame(df)
    if not len(pred):
        return None
    section = Section("Predicted vs measured peak (torch reserved)",
                      ["Error = (predicted - measured) / measured; positive means the estimate was cautious. "
                       "'At run time' is the prediction stored in the record when the cell ran (records are never "
                       "rewritten), made by the estimator version shown; 'current estimator' re-predicts the same "
                       f"cell with this version of bench (estimator v{ESTIMATOR_VERSION}, the path `bench "
                       "estimate-check` takes), which is what the +-10% target applies to.",
                       margins_text()])
    section.items.append(Table("prediction", "Prediction per cell", tables.prediction_table(pred)))
    if path := plots.prediction_errors(pred, out_dir / "prediction_errors.png"):
        section.items.append(Plot(path, "Histogram of memory prediction errors"))
    return section


def margins_text() -> str:
    """The pre-flight margins in force and why (bench/estimate/margins.py)."""
    from bench.estimate import DEFAULT_FIT, DEFAULT_SKIP, margin_for_framework
    from bench.estimate import load_margins as load

    data = load()
    why = ("A cell 'fits' only if its predicted need plus the fit margin is within capacity (room for the "
           "estimator's under-prediction, the costly error); `bench run` skips it as predicted_oom only if the "
           "need exceeds capacity by more than the skip margin (room for over-prediction).")
    if not data or not data.get("pooled"):
        return (f"{why} Margins in force: the stated defaults, fit +{DEFAULT_FIT:.0%} and skip +{DEFAULT_SKIP:.0%}, "
                "as no out-of-sample judge record exists yet (results/ESTIMATOR.md).")
    per_fw = "; ".join(f"{fw}: {margin_for_framework(fw, data).describe()}" for fw in data["frameworks"])
    return (f"{why} Margins in force (bench/estimate/margins.json, estimator v{data['estimator_version']}, from "
            f"{', '.join(data['folders'])}): the {data['coverage']:.0%} quantile of the out-of-sample errors per "
            f"framework: {per_fw}. Other frameworks: fit +{data['pooled']['fit']:.1%}, skip "
            f"+{data['pooled']['skip']:.1%} (all judged cells).")


def pick_trace_record(records: list[RunRecord], cell_id: str | None) -> RunRecord | None:
    """The requested cell (id or id prefix), else the first ok GPU cell with an NVML trace."""
    def has_trace(r: RunRecord) -> bool:
        return bool(((r.nvml or {}).get("trace") or {}).get("t"))

    if cell_id:
        matches = [r for r in records if r.cell_id.startswith(cell_id) and has_trace(r)]
        return matches[-1] if matches else None
    return next((r for r in records if r.status == "ok" and has_trace(r)), None)


def trace_section(records: list[RunRecord], options: ReportOptions, out_dir: Path) -> Section | None:
    record = pick_trace_record(records, options.trace_cell)
    if record is None:
        if options.trace_cell:
            return Section("NVML trace", [f"No NVML trace recorded for cell {options.trace_cell}."])
        return None
    title = f"{record.label} ({record.cell_id}, {record.status})"
    # The trace counts from the sampler's own start (nvml.started_at), a moment before the launch
    # (record.started_at); only a record without it falls back to the launch time.
    nvml = {**record.nvml, "started_at": record.nvml.get("started_at") or record.started_at}
    path = plots.nvml_trace(nvml, record.started_at, title, out_dir / "nvml_trace.png")
    section = Section("NVML trace", [f"Cell {title}; choose another with --trace-cell CELL_ID."])
    if path:
        section.items.append(Plot(path, f"NVML trace of {title}"))
    return section


def nodes_section(records: list[RunRecord], console: Console) -> Section | None:
    table = nodes.node_table(records)
    if table is None:
        return None
    differ = table[table["nodes differ"] != "no"]
    for _, row in differ.iterrows():
        console.print(f"[bold red]{escape(row['cell'])}: its nodes differ: {escape(row['nodes differ'])}[/]")
    return Section("Nodes", ["Cells of several nodes: each node's own fingerprint (env.nodes) and NVML sampler "
                             "(nvml.per_node). 'nodes differ' names every setting (software, cards, driver, "
                             "NCCL/GLOO variables, NICs, InfiniBand ports) that is not the same on every node."],
                   [Table("nodes", "The nodes of each multi-node cell", table,
                          [f"{r['cell']}: its nodes differ ({r['nodes differ']})" for _, r in differ.iterrows()])])


def all_cells_table(df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, row in df.iterrows():
        ok = row["status"] == "ok"
        stop = row.get("timing_stop_reason")
        rows.append({"cell": row["cell_id"], "run": row["label"], "machine": row["machine"], "status": row["status"],
                     tables.POLICY: tables.policy(row),
                     "tok/s/GPU [95% CI]": tables.throughput_text(row),
                     "step s": f"{row['step_time_s']:.3g}" if tables.is_num(row.get("step_time_s")) else row["status"],
                     "timed steps": f"{row['timed_steps']:.0f}" if ok and tables.is_num(row.get("timed_steps")) else "",
                     "timing stopped": stop if isinstance(stop, str) else ("fixed steps (older record)" if ok else ""),
                     "wall s": f"{row['wall_s']:.1f}",
                     "error": row["error"] if isinstance(row.get("error"), str) else ""})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the whole report

def status_summary(df: pd.DataFrame) -> str:
    counts = df["status"].value_counts()
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def write_report(results_dirs: list[Path], out_dir: Path, console: Console | None = None,
                 options: ReportOptions | None = None) -> Path:
    console = console or Console()
    options = options or ReportOptions()
    records = load_all(results_dirs)
    df = build(results_dirs, records)
    out_dir.mkdir(parents=True, exist_ok=True)
    table_options = tables.TableOptions(budget=resolve_budget(options, results_dirs), compare=tuple(options.compare),
                                        compare_gpus=options.compare_gpus)
    sections = [verdict_section(df), definitions_section(), scaling_section(df, out_dir),
                head_to_head_section(df, table_options)]
    printed = list(sections)  # the answer, then scaling and head-to-head (and the fast paths) in the terminal
    if fast := fast_paths.section(df):  # only where the records hold a fast path beside the plain step
        sections.append(fast)
        printed.append(fast)
    sections += [memory_section(df, out_dir), efficiency_section(df), energy_section(df)]
    optional = (card_state_section(df), prediction_section(df, out_dir), trace_section(records, options, out_dir),
                nodes_section(records, console))
    sections += [s for s in optional if s]
    sections.append(Section("All cells", ["Raw figures of every cell: cells.csv."],
                            [Table("all_cells", "Every cell", all_cells_table(df))]))
    title = f"bench report: {', '.join(d.name for d in results_dirs)}"
    intro = [f"{len(df)} cells from {', '.join(map(str, results_dirs))} on "
             f"{', '.join(df['machine'].unique())}: {status_summary(df)}."]
    if (df["device"] == "cpu").any():  # first, before any figure: CPU speedups read like findings
        intro.insert(0, f"Note: {CPU_CAVEAT}")
        console.print(f"[yellow]note[/]: {escape(CPU_CAVEAT)}")
    for folder in results_dirs:  # before any figure too: what a later finding says of these records
        if erratum := folder_errata(folder):
            if stale := stale_cells(folder):
                erratum += f" (This report leaves out the records of the {len(stale)} stale cell(s) named.)"
            intro.insert(0, f"Erratum for {folder}: {erratum}")
            console.print(f"[bold red]erratum[/] for {escape(str(folder))}: {escape(erratum)}")
    write_csvs(sections, out_dir)
    df.drop(columns=["setting_key"]).to_csv(out_dir / "cells.csv", index=False)
    (out_dir / "index.md").write_text(to_markdown(title, intro, sections, out_dir))
    (out_dir / "index.html").write_text(to_html(title, intro, sections, out_dir, options.html_images))
    for section in (printed[0], *printed[2:]):
        for item in section.items:
            if isinstance(item, Table):
                print_table(console, f"{section.title}: {item.title}", item.frame)
                for warning in item.warnings:
                    console.print(f"[bold red]{escape(warning)}[/]")
    console.print(f"report written to {out_dir}/index.md and index.html")
    return out_dir


def print_table(console: Console, title: str, frame: pd.DataFrame) -> None:
    table = RichTable(title=escape(title), title_justify="left")  # '[cpu]' is text, not rich markup
    for i, column in enumerate(frame.columns):
        table.add_column(escape(str(column)), justify="left" if i == 0 else "right")
    for _, row in frame.iterrows():
        table.add_row(*[escape(str(v)) for v in row])
    console.print(table)
