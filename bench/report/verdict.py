"""The verdict: per setting group and layout (nodes x processes per node), which strategy to use.

Cells are compared only at one layout: a 2-node x 2-GPU cell (4 processes over the network) is not set
against 1-node x 2-GPU cells, nor against 1 node x 4.

- fastest: the highest launch-median real-token throughput among the cells that fit (status ok, no launch
  failed for the cell's own reasons (oom, crash, hang, timeout, unsupported: a cell that runs one time in
  three is no answer; an interrupted launch is the operator's deadline and does not count), and the peak
  neither over the cap nor over the card);
- indistinguishable from it: the other fitting cells whose throughput ratio to the fastest has a 95 %
  interval holding 1 (bench/report/intervals.py ``ratio``: the two cells' intervals combined on the log
  scale, a 95 % test of "same speed"; two 95 % intervals that merely overlap would call far larger
  differences indistinguishable). The intervals are across launches when a cell has 2+, else within its one
  launch, which leaves launch-to-launch variation out: the table says which. Where either cell has no
  interval (a launch whose timing admitted none, n_eff < 6), the test falls back to whether what there is
  overlaps: the other cell's interval against the point of the one without, or two points (equal only);
- lowest peak memory: the fitting cell with the smallest peak (torch reserved on GPU, the worst launch;
  host RSS on CPU), with its throughput.
Each strategy runs under its own precision policy here (what a user would run), and the policy is named.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from bench.report import intervals, metrics
from bench.report.repeats import OWN_FAILURES


@dataclass(frozen=True)
class Verdict:
    gpus: int  # processes per node
    fastest: pd.Series | None
    indistinguishable: list[pd.Series]
    lowest_memory: pd.Series | None
    not_fitting: list[pd.Series]  # ran and failed, or over the cap/card, or predicted not to fit
    nodes: int = 1
    # Not measured for an outside reason (interrupted, busy, cancelled, skipped): no answer either way, so
    # neither among the fitting nor held against the strategy.
    not_measured: tuple[pd.Series, ...] = ()

    @property
    def layout(self) -> int | str:
        """The row's label: the GPU count on one node (as before multi-node cells), '2 x 2' across nodes."""
        return self.gpus if self.nodes == 1 else f"{self.nodes} x {self.gpus}"


def memory_column(device: str) -> str:
    return "peak_reserved_gib" if device == "cuda" else "host_rss_peak_gib"


def fits(row: pd.Series) -> bool:
    """Ran ok in every launch that did not stop for an outside reason, and stayed within the cap (torch
    reserved) and the card (NVML used)."""
    if row["status"] != "ok" or failed_launches(row):
        return False
    cap, reserved = row.get("gpu_memory_gib"), row.get("peak_reserved_gib")
    if _num(cap) and _num(reserved) and reserved > cap:
        return False
    total, used = row.get("gpu_total_gib"), row.get("nvml_peak_used_gib")
    return not (_num(total) and _num(used) and used > total)


def not_measured(row: pd.Series) -> bool:
    """No launch of the cell ran ok, none failed for its own reasons, and it was not predicted not to fit:
    the operator, the scheduler or another tenant stopped it (bench/report/repeats.py OWN_FAILURES)."""
    return row["status"] not in ("ok", "predicted_oom", *OWN_FAILURES) and not failed_launches(row)


def failed_launches(row: pd.Series) -> str | None:
    """'oom in 1 of 3 launches' where some of the cell's launches failed for its own reasons
    (bench/report/repeats.py); None otherwise."""
    value = row.get("failed_launches")
    return value if isinstance(value, str) and value else None


def _num(value) -> bool:
    return isinstance(value, (int, float)) and value == value  # NaN is not a figure


def interval(row: pd.Series) -> tuple[float, float]:
    """The cell's throughput interval; a cell without one is the point of its median."""
    return metrics.per_gpu_interval(row) or (row["real_tokens_per_s_per_gpu"],) * 2


def ratio_to(row: pd.Series, fastest: pd.Series) -> intervals.Interval | None:
    """The 95 % interval of ``row``'s throughput over the fastest's; None where either has no interval."""
    def figure(r: pd.Series) -> tuple[float, float, float]:
        low, high = metrics.per_gpu_interval(r) or (float("nan"),) * 2
        return float(r["real_tokens_per_s_per_gpu"]), low, high

    return intervals.ratio(figure(row), figure(fastest))


def indistinguishable(row: pd.Series, fastest: pd.Series) -> bool:
    """The ratio's interval holds 1; without an interval on either side, what there is overlaps."""
    if (ratio := ratio_to(row, fastest)) is not None:
        return ratio.low <= 1.0 <= ratio.high
    return intervals.overlap(interval(row), interval(fastest))


def _nodes(group: pd.DataFrame) -> pd.Series:
    """Nodes of each row (1 in frames and records from before multi-node cells)."""
    return group["nodes"].fillna(1).astype(int) if "nodes" in group.columns else pd.Series(1, index=group.index)


def at_layout(group: pd.DataFrame, gpus: int, nodes: int = 1) -> pd.DataFrame:
    """The rows of one layout: ``nodes`` machines of ``gpus`` processes each."""
    return group[(group["gpus"] == gpus) & (_nodes(group) == nodes)]


def decide(group: pd.DataFrame, gpus: int, nodes: int = 1) -> Verdict:
    rows = at_layout(group, gpus, nodes)
    fitting = [row for _, row in rows.iterrows() if fits(row) and _num(row.get(metrics.THROUGHPUT))]
    unmeasured = tuple(row for _, row in rows.iterrows() if not_measured(row))
    not_fitting = [row for _, row in rows.iterrows() if not fits(row) and not not_measured(row)]
    if not fitting:
        return Verdict(gpus, None, [], None, not_fitting, nodes, unmeasured)
    fastest = max(fitting, key=lambda r: r[metrics.THROUGHPUT])
    close = [r for r in fitting if r["cell_id"] != fastest["cell_id"] and indistinguishable(r, fastest)]
    close.sort(key=lambda r: -r[metrics.THROUGHPUT])
    column = memory_column(fastest["device"])
    measured = [r for r in fitting if _num(r.get(column))]
    lowest = min(measured, key=lambda r: (r[column], -r[metrics.THROUGHPUT])) if measured else None
    return Verdict(gpus, fastest, close, lowest, not_fitting, nodes, unmeasured)


def verdicts(group: pd.DataFrame) -> list[Verdict]:
    """One verdict per layout: one node's GPU counts first (as before multi-node cells), then across nodes."""
    layouts = sorted(set(zip(_nodes(group), group["gpus"].astype(int))))
    return [decide(group, int(gpus), int(nodes)) for nodes, gpus in layouts]
