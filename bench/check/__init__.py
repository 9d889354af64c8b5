"""The check: baselines and the nightly gate.

Rooms: ``gate`` (``bench check``: tonight's records against a baseline of nights, the prediction interval
per cell, the findings), ``render`` (their markdown and JSON), ``baseline`` (baseline files, one per
hardware: load, validate, ``bench baseline promote``), ``nightly`` (``bench nightly``: one night run, checked and reported). The rest
of bench reads the check through the names below.

The front is lazy (a name loads its room on first use): ``nightly`` drives the whole launch side, which the
gate and the baselines do not need.
"""

from bench.lazy_front import lazy_front

_ROOM = {
    "Thresholds": "gate", "CheckResult": "gate", "Finding": "gate", "check_paths": "gate",
    "is_timed_ok": "gate", "parse_thresholds": "gate", "run_check": "gate", "to_json": "render",
    "to_markdown": "render",
    "BaselineError": "baseline", "MIN_NIGHTS": "baseline", "describe": "baseline", "hardware_slug": "baseline",
    "load_any": "baseline", "load_nights": "baseline", "promote": "baseline",
    "NightOptions": "nightly", "run_night": "nightly",
}

__all__ = [
    "BaselineError", "CheckResult", "Finding", "MIN_NIGHTS", "NightOptions", "Thresholds", "check_paths",
    "describe", "hardware_slug", "is_timed_ok", "load_any", "load_nights", "parse_thresholds", "promote",
    "run_check", "run_night", "to_json", "to_markdown",
]

__getattr__, __dir__ = lazy_front(__name__, _ROOM, globals(), __all__)
