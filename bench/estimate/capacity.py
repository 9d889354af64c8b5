"""The pre-flight decision of ``bench run``: a cell's capacity (an explicit one, its memory cap, or its
cards read through NVML), its prediction, and a ``predicted_oom`` record instead of a launch when it cannot fit.
"""

from __future__ import annotations

from bench.estimate.additive import predict
from bench.estimate.prediction import CALIBRATION, Calibration, GIB, Prediction, prediction_dict
from bench.spec import CellSettings


def capacity_for(cell: CellSettings, override_gib: float | None = None) -> tuple[float | None, str | None]:
    """(GiB, source) a cell must fit: an explicit capacity, its memory cap, or its GPU; unknown on CPU."""
    if override_gib is not None:
        return override_gib, "--capacity-gib"
    if cell.gpu_memory_gib:
        return cell.gpu_memory_gib, "gpu_memory_gib"
    if cell.device == "cuda":
        total = _device_total_bytes(cell.gpus)
        if total:
            return total / GIB, "device"
    return None, None


def _device_total_bytes(gpus: int) -> int | None:
    """The smallest total memory of the cell's cards, read through NVML: asking torch would create a
    CUDA context in the parent process, memory that the cell's own ranks would then not have."""
    from bench.machine.gpu_state import nvml, nvml_handle_for_cuda_index

    lib = nvml()
    if lib is None:
        return None
    try:
        return min(lib.nvmlDeviceGetMemoryInfo(nvml_handle_for_cuda_index(i)).total for i in range(gpus))
    except Exception:  # noqa: BLE001 - fewer visible cards or no NVML: the capacity stays unknown
        return None


def predict_for_run(cell: CellSettings, margin: float | None, capacity_override_gib: float | None = None,
                    calib: Calibration = CALIBRATION) -> Prediction | None:
    capacity, source = capacity_for(cell, capacity_override_gib)
    return predict(cell, calib, margin, capacity, source)


def oom_message(pred: Prediction) -> str:
    return (f"predicted {pred.required_gib:.2f} GiB per rank ({pred.peak_phase} peak) against "
            f"{pred.capacity_gib:.2f} GiB ({pred.capacity_source}), over by more than the margin "
            f"{pred.margin:.0%}; not launched. Use --force to launch it anyway")


def preflight(plan, matrix_name: str, fingerprint: dict, margin: float | None, force: bool,
              capacity_override_gib: float | None, strategy_info: dict):
    """(prediction dict for the record, a predicted_oom RunRecord when the cell must not launch, else None)."""
    from bench.records import not_launched_record

    try:
        pred = predict_for_run(plan.cell, margin, capacity_override_gib)
    except Exception as exc:  # noqa: BLE001 - an estimator bug must never stop a benchmark: launch unpredicted
        import warnings

        warnings.warn(f"no memory prediction for {plan.cell.label}: {exc!r}", stacklevel=2)
        pred = None
    stored = prediction_dict(pred)
    if pred is None or not pred.predicted_oom or force:
        return stored, None
    record = not_launched_record(matrix_name, plan.cell, plan.repeat, fingerprint, "predicted_oom", oom_message(pred),
                                 strategy_info, prediction=stored, cell_dir=str(plan.cell_dir),
                                 command=plan.shell_command())
    return stored, record
