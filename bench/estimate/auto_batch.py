"""``train.micro_batch: auto``: the largest micro-batch the estimator says fits a capacity.

"Fits" is the estimator's own fit decision (bench/estimate/prediction.py ``with_capacity``): the prediction
times (1 + the framework's fit margin) within the capacity, so the proposal errs small by the margin that
the measured out-of-sample errors give. The prediction grows with the micro-batch (activations and logits
scale with the tokens, states do not), so the largest fitting value is found by doubling, then bisection.
The launch confirms it (bench/launch/auto_batch.py steps down on an out-of-memory).
"""

from __future__ import annotations

from bench.estimate.additive import predict
from bench.estimate.prediction import CALIBRATION, Calibration, Prediction
from bench.spec import CellSettings

MAX_MICRO_BATCH = 512  # a search bound, far above what a training step of a real model fits


def with_micro_batch(cell: CellSettings, micro_batch: int) -> CellSettings:
    """The same cell at a given micro-batch (its own cell id)."""
    return cell.model_copy(update={"train": cell.train.model_copy(update={"micro_batch": micro_batch})})


def propose(cell: CellSettings, capacity_gib: float, capacity_source: str | None, margin: float | None = None,
            calib: Calibration = CALIBRATION) -> tuple[int | None, Prediction | None]:
    """(largest micro-batch predicted to fit, its prediction); (None, None) when not even 1 fits or the
    strategy cannot be described."""
    def fits(mb: int) -> Prediction | None:
        pred = predict(with_micro_batch(cell, mb), calib, margin, capacity_gib, capacity_source)
        return pred if pred is not None and pred.fits else None

    best, best_pred = None, None
    high = 1
    while high <= MAX_MICRO_BATCH and (pred := fits(high)):  # doubling: 1, 2, 4 ... until one does not fit
        best, best_pred, high = high, pred, high * 2
    if best is None:
        return None, None
    low, high = best, min(high, MAX_MICRO_BATCH + 1)  # low fits, high does not (or is past the bound)
    while high - low > 1:
        mid = (low + high) // 2
        if pred := fits(mid):
            low, best_pred = mid, pred
        else:
            high = mid
    return low, best_pred
