"""The memory estimator: a cell's peak GPU memory per rank, predicted before it launches (no torch).

Rooms: ``prediction`` (the stored Prediction, versions, calibration, the fit decision), ``terms`` (what the
additive model and the replay both read), ``states`` and ``activations`` (model states and activations by
formula), ``cell_states`` (a cell's model states per rank, from ``states``), ``additive`` (``predict``: the peak over the moments that can hold it), ``allocator`` and
``replay/`` (torch's caching allocator and a cell's allocations replayed through it, one module per
framework), ``offload_blocks`` (FSDP1 parameter offload's initialisation blocks, free at the peak), ``capacity`` (a cell's capacity and the pre-flight decision of ``bench run``), ``protocol``, ``check`` and
``margins`` (judging the estimator against GPU records, and the margins that follow), ``table`` (``bench
estimate``). The rest of bench reads the estimator through the names below.
"""

from bench.estimate.additive import predict
from bench.estimate.check import predict_for_record, run_check
from bench.estimate.margins import DEFAULT_FIT, DEFAULT_SKIP, MARGINS_FILE, margin_for_framework
from bench.estimate.margins import load as load_margins
from bench.estimate.margins import write as write_margins
from bench.estimate.prediction import ESTIMATOR_VERSION, GIB, Prediction, predicted_oom, prediction_dict
from bench.estimate.capacity import capacity_for, preflight
from bench.estimate.table import run_estimate

__all__ = [
    "DEFAULT_FIT", "DEFAULT_SKIP", "ESTIMATOR_VERSION", "GIB", "MARGINS_FILE", "Prediction", "capacity_for",
    "load_margins", "margin_for_framework", "predict", "predict_for_record", "predicted_oom", "prediction_dict",
    "preflight", "run_check", "run_estimate", "write_margins",
]
