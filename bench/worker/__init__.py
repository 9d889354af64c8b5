"""The worker: the code inside each rank, run as ``python -m bench.worker`` under `accelerate launch`.

Rooms: ``train`` (the fixed step, read top to bottom like a plain training script: parse, build, wrap,
warm up, time, report), ``guard`` (the launch did what the cell asked), ``prepare``
(each framework's wrapping, backward and optimizer step), ``model_build``, ``meta_init``,
``qlora`` (building the model), ``data``, ``local_data`` (batches), ``timing`` (when to stop timing),
``gc_window`` (the garbage collector kept out of the timed window), ``host_window`` (what the host's
CPUs did meanwhile), ``transfers`` (host-device traffic
under offload), ``slowdown`` (a slowdown injected on purpose), ``memory_snapshot`` (the allocator's history
over the warm-up, asked for by ``bench run --memory-snapshot``). It imports only bench.spec,
bench.strategies and bench.records.rank_files: nothing of the parent's machinery.

The front is lazy: ``python -m bench.worker`` and a room's import load only what they need.
"""

from bench.lazy_front import lazy_front

_ROOM = {
    "main": "train",
}

__all__ = [
    "main",
]

__getattr__, __dir__ = lazy_front(__name__, _ROOM, globals(), __all__)
