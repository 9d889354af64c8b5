"""`bench estimate MATRIX`: the predicted memory of every cell, as a table (or JSON), nothing launched."""

from __future__ import annotations

import json
import math

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.estimate.additive import predict
from bench.estimate.auto_batch import propose, with_micro_batch
from bench.estimate.capacity import capacity_for
from bench.estimate.prediction import COMPONENTS, Prediction, prediction_dict
from bench.spec import CellSettings, MatrixError, expand, load_matrix, select
from bench.strategies import check_names

SHORT = {"params": "params", "grads": "grads", "optimizer": "optim", "master_weights": "master",
         "activations": "activ", "adapter": "adapter", "overhead": "overhead"}


def estimate_cells(matrix_path: str, device: str | None, capacity_gib: float | None,
                   only: list[str], exclude: list[str],
                   max_gpus: int | None = None) -> list[tuple[CellSettings, Prediction | None, str]]:
    """Each selected cell, its prediction and its name in the table (an auto cell predicted at its proposal).
    Estimating plans a GPU run, so an ``auto`` device means cuda. ``max_gpus`` keeps the cells a box of that
    many GPUs can run."""
    matrix = load_matrix(matrix_path)
    device = device or ("cuda" if matrix.device == "auto" else matrix.device)
    cells = select(expand(matrix, source=matrix_path, device=device), only, exclude)
    if not cells:
        raise MatrixError(f"{matrix_path}: no cell left after --only/--exclude. Fix: loosen the selection")
    if max_gpus is not None:
        if not (cells := [c for c in cells if c.gpus <= max_gpus]):
            raise MatrixError(f"{matrix_path}: no cell uses {max_gpus} GPU(s) or fewer. Fix: raise --gpus")
    # Only bad names stop the estimate: a machine without the cell's GPUs can still plan for them.
    check_names(cells, matrix_path)
    out = []
    for cell in cells:
        capacity, source = capacity_for(cell, capacity_gib)
        if cell.train.micro_batch == "auto":  # shown at the micro-batch bench run would launch first
            concrete, pred = _auto_row(cell, capacity, source, matrix.estimate_margin)
            out.append((cell, pred, row_name(concrete, auto=True)))  # the auto cell's id, as bench run keeps it
            continue
        pred = predict(cell, margin=matrix.estimate_margin, capacity_gib=capacity, capacity_source=source)
        out.append((cell, pred, row_name(cell)))
    return out


def row_name(cell: CellSettings, auto: bool = False) -> str:
    """The cell's label (which names its fast paths) with its micro-batch, the proposal's when auto."""
    return f"{cell.label} mb {cell.train.micro_batch}{' (auto)' if auto else ''}"


def _auto_row(cell: CellSettings, capacity: float | None, source: str | None,
              margin: float | None) -> tuple[CellSettings, Prediction | None]:
    """An auto cell at the largest micro-batch predicted to fit (its launch confirms or steps down)."""
    if capacity is None:
        raise MatrixError(f"{cell.label}: train.micro_batch auto is sized to a GPU's memory, unknown here. Fix: pass "
                          "--capacity-gib (e.g. 139 for an H200) or set gpu_memory_gib")
    proposed, pred = propose(cell, capacity, source, margin)
    if proposed is None:  # not even 1 fits: shown at 1, whose verdict says by how much
        return with_micro_batch(cell, 1), predict(with_micro_batch(cell, 1), margin=margin, capacity_gib=capacity,
                                                  capacity_source=source)
    return with_micro_batch(cell, proposed), pred


def _fmt(gib: float) -> str:
    return f"{gib:.2f}" if gib < 100 else f"{gib:.0f}"


def card_gib(pred: Prediction) -> float:
    """The smallest card the cell fits on: everything its process holds on the device (torch's reserved, the
    CUDA context, NCCL) plus the framework's fit margin for the estimator's under-prediction, rounded up."""
    return math.ceil(pred.device_total_gib * (1 + pred.fit_margin) * 10) / 10


def fits_line(cell: CellSettings, pred: Prediction | None) -> str:
    if pred is None:
        return "fits on cards with: unknown (the strategy config could not be read)"
    if cell.device == "cpu":
        per_node = f" ({_fmt(pred.host_gib / cell.nodes)} GiB per node)" if cell.nodes > 1 else ""
        return f"runs on CPU: about {_fmt(pred.host_gib)} GiB of host memory for all processes{per_node}"
    return f"fits on cards with >= {card_gib(pred):g} GiB (fit margin {pred.fit_margin:.0%})"


def render(rows: list[tuple[CellSettings, Prediction | None, str]], console: Console) -> None:
    """The table where it fits the terminal; else (its 15 columns would shrink to ellipses) a block per cell."""
    table = build_table(rows)
    natural = console.measure(table, options=console.options.update_width(10_000)).maximum
    if natural <= console.width:
        console.print(table)
        console.print("[dim]card >= GiB: the smallest card each cell fits on: +ctx with the framework's fit margin.[/]")
    else:
        render_blocks(rows, console)
    console.print(f"[dim]{escape(LEGEND)}[/]")
    if any(cell.nodes > 1 for cell, _, _ in rows):
        console.print(f"[dim]{escape(NODES_NOTE)}[/]")
    if compiled := sum(cell.train.compile for cell, _, _ in rows):
        console.print(f"[yellow]note[/]: {escape(compile_note(compiled))}")


LEGEND = ("B/param per rank: weights + grads + (master + optimizer) in the ZeRO paper's notation, /N = sharded over "
          "N ranks. +ctx adds the CUDA context and NCCL buffers (outside torch). host: all ranks together "
          "(offloaded states + processes). verdict: fits = within capacity with the framework's fit margin to "
          "spare; tight = not so; skip = predicted_oom (over capacity by more than the skip margin), launched "
          "anyway with --force. Margins: bench/estimate/margins.json.")


NODES_NOTE = ("Cells of several nodes (label 'Nnodes'): per-card figures for nodes x gpus ranks; ZeRO and FSDP shard "
              "over all of them (FSDP HYBRID_SHARD within a node only), so /N in B/param counts every rank.")


def compile_note(cells: int) -> str:
    """Said under the table when cells compile: the estimator predicts them as eager (bench/estimate/activations.py)."""
    return (f"{cells} cell(s) with train.compile (label 'compile'): torch.compile is not modelled, they are predicted "
            "as the same cell without it (the first compiled cells on a GPU, results/kernels-h200-b, 8B LoRA at one "
            "GPU, reserved 98-103 % of the same cells eager)")


def _formula(pred: Prediction) -> str:
    bpp = pred.bytes_per_param
    formula = f"{bpp['per_rank']} ({bpp['applies_to']})"
    if "frozen_base" in bpp:
        formula += f"; base {bpp['frozen_base']:g}"
    return formula


def _packed(items: list[str], width: int, indent: str = "  ") -> list[str]:
    """``items`` on as few lines as fit ``width``, never split inside an item."""
    lines, line = [], ""
    for item in items:
        if line and len(indent) + len(line) + 3 + len(item) > width:
            lines.append(indent + line)
            line = ""
        line = f"{line}   {item}" if line else item
    return lines + ([indent + line] if line else [])


def render_blocks(rows: list[tuple[CellSettings, Prediction | None, str]], console: Console) -> None:
    """Narrow terminals: one block per cell, every figure on lines that fit the width."""
    console.print("Predicted peak GPU memory per rank (GiB; torch reserved = sum of the components)")
    for cell, pred, name in rows:
        console.print(f"[bold]{escape(name)}[/]  id={cell.cell_id}")
        if pred is not None:
            console.print(f"  B/param per rank: {escape(_formula(pred))}")
            parts = [f"{SHORT[c]} {_fmt(pred.components_gib[c])}" for c in COMPONENTS]
            totals = [f"reserved {_fmt(pred.peak_reserved_gib)}", f"+ctx {_fmt(pred.device_total_gib)}",
                      f"capacity {'-' if pred.capacity_gib is None else _fmt(pred.capacity_gib)}",
                      f"host {_fmt(pred.host_gib)}", f"verdict {verdict(pred)}"]
            for line in _packed(parts, console.width) + _packed(totals, console.width):
                console.print(escape(line))
        console.print(f"  {escape(fits_line(cell, pred))}")


def build_table(rows: list[tuple[CellSettings, Prediction | None, str]]) -> Table:
    table = Table(title="Predicted peak GPU memory per rank (GiB; torch reserved = sum of the components)")
    table.add_column("cell", overflow="fold")
    table.add_column("B/param per rank", overflow="fold")
    for name in COMPONENTS:
        table.add_column(SHORT[name], justify="right")
    for name in ("reserved", "+ctx", "capacity", "verdict", "host", "card >= GiB"):
        table.add_column(name, justify="right" if name != "verdict" else "left")
    for cell, pred, name in rows:
        if pred is None:
            table.add_row(escape(name), "?", *[""] * len(COMPONENTS), "", "", "", "unknown strategy config",
                          "", "?")
            continue
        table.add_row(escape(name), escape(_formula(pred)), *[_fmt(pred.components_gib[c]) for c in COMPONENTS],
                      _fmt(pred.peak_reserved_gib), _fmt(pred.device_total_gib),
                      "-" if pred.capacity_gib is None else _fmt(pred.capacity_gib), verdict(pred),
                      _fmt(pred.host_gib), "-" if cell.device == "cpu" else f"{card_gib(pred):g}")
    return table


def verdict(pred: Prediction) -> str:
    if pred.capacity_gib is None:
        return "capacity unknown"
    if pred.predicted_oom:
        return f"skip ({pred.required_gib / pred.capacity_gib:.0%})"
    return f"{'fits' if pred.fits else 'tight'} ({pred.required_gib / pred.capacity_gib:.0%}, {pred.peak_phase})"


def run_estimate(matrix_path: str, device: str | None, capacity_gib: float | None, only: list[str],
                 exclude: list[str], as_json: bool, console: Console | None = None, max_gpus: int | None = None) -> int:
    rows = estimate_cells(matrix_path, device, capacity_gib, only, exclude, max_gpus)
    if as_json:
        print(json.dumps([{"cell_id": c.cell_id, "label": c.label, "name": name, "nodes": c.nodes,
                           "ranks": c.processes, "prediction": prediction_dict(p)}
                          for c, p, name in rows], indent=1))
    else:
        render(rows, console or Console())
    return 0
