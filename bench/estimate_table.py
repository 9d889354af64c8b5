"""`bench estimate MATRIX`: the predicted memory of every cell, as a table (or JSON), nothing launched."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from bench.estimate import COMPONENTS, Prediction, capacity_for, predict
from bench import models, strategies
from bench.matrix import CellSettings, MatrixError, expand, load_matrix, select

SHORT = {"params": "params", "grads": "grads", "optimizer": "optim", "master_weights": "master",
         "activations": "activ", "adapter": "adapter", "overhead": "overhead"}


def estimate_cells(matrix_path: str, device: str | None, capacity_gib: float | None,
                   only: list[str], exclude: list[str]) -> list[tuple[CellSettings, Prediction | None]]:
    """Each selected cell with its prediction. Estimating plans a GPU run, so an ``auto`` device means cuda."""
    matrix = load_matrix(matrix_path)
    device = device or ("cuda" if matrix.device == "auto" else matrix.device)
    cells = select(expand(matrix, source=matrix_path, device=device), only, exclude)
    if not cells:
        raise MatrixError(f"{matrix_path}: no cell left after --only/--exclude. Fix: loosen the selection")
    out = []
    for cell in cells:
        # Only bad names stop the estimate: a machine without the cell's GPUs can still plan for them.
        if msg := models.check_model_name(cell.model) or strategies.check_strategy_name(cell.strategy):
            raise MatrixError(f"{matrix_path}: cell {cell.label}: {msg}")
        capacity, source = capacity_for(cell, capacity_gib)
        out.append((cell, predict(cell, margin=matrix.estimate_margin, capacity_gib=capacity, capacity_source=source)))
    return out


def _fmt(gib: float) -> str:
    return f"{gib:.2f}" if gib < 100 else f"{gib:.0f}"


def render_table(rows: list[tuple[CellSettings, Prediction | None]], console: Console) -> None:
    table = Table(title="Predicted peak GPU memory per rank (GiB; torch reserved = sum of the components)")
    table.add_column("cell", overflow="fold")
    table.add_column("B/param per rank", overflow="fold")
    for name in COMPONENTS:
        table.add_column(SHORT[name], justify="right")
    for name in ("reserved", "+ctx", "capacity", "verdict", "host"):
        table.add_column(name, justify="right" if name != "verdict" else "left")
    for cell, pred in rows:
        if pred is None:
            table.add_row(cell.label, "?", *[""] * len(COMPONENTS), "", "", "", "unknown strategy config", "")
            continue
        bpp = pred.bytes_per_param
        formula = f"{bpp['per_rank']} ({bpp['applies_to']})"
        if "frozen_base" in bpp:
            formula += f"; base {bpp['frozen_base']:g}"
        table.add_row(cell.label, formula, *[_fmt(pred.components_gib[c]) for c in COMPONENTS],
                      _fmt(pred.peak_reserved_gib), _fmt(pred.device_total_gib),
                      "-" if pred.capacity_gib is None else _fmt(pred.capacity_gib), verdict(pred),
                      _fmt(pred.host_gib))
    console.print(table)
    console.print("[dim]B/param per rank: weights + grads + (master + optimizer) in the ZeRO paper's notation, "
                  "/N = sharded over N ranks. +ctx adds the CUDA context and NCCL buffers (outside torch). "
                  "host: all ranks together (offloaded states + processes). verdict: fits = within capacity with the "
                  "framework's fit margin to spare; tight = not so; skip = predicted_oom (over capacity by more than "
                  "the skip margin), launched anyway with --force. Margins: bench/estimate_margins.json.[/]")


def verdict(pred: Prediction) -> str:
    if pred.capacity_gib is None:
        return "capacity unknown"
    if pred.predicted_oom:
        return f"skip ({pred.required_gib / pred.capacity_gib:.0%})"
    return f"{'fits' if pred.fits else 'tight'} ({pred.required_gib / pred.capacity_gib:.0%}, {pred.peak_phase})"


def run_estimate(matrix_path: str, device: str | None, capacity_gib: float | None, only: list[str],
                 exclude: list[str], as_json: bool, console: Console | None = None) -> int:
    rows = estimate_cells(matrix_path, device, capacity_gib, only, exclude)
    if as_json:
        from bench.estimate import prediction_dict

        print(json.dumps([{"cell_id": c.cell_id, "label": c.label, "prediction": prediction_dict(p)}
                          for c, p in rows], indent=1))
    else:
        render_table(rows, console or Console())
    return 0
