"""Python's garbage collector kept out of the timed window.

A generation-2 collection walks every tracked object (a model and its optimizer hold millions) and took a
whole step's time: in three 40-step DDP launches of a 1B model, timed step ~21 took 2.7x a normal step.
So before the window the heap is collected and what survives is frozen (moved to a permanent generation
no collection walks), the collector is disabled inside, and after the window it is enabled, unfrozen and
collected on purpose. A library may still call gc.collect() itself inside the window: every collection
that starts there is counted through gc.callbacks and recorded, so a stray one is seen, not guessed.
"""

from __future__ import annotations

import gc

POLICY = "collected+frozen before, disabled inside the timed window"


class GcWindow:
    """``open()`` before the first timed step, ``close()`` after the last; ``record()`` for the rank report."""

    def __init__(self) -> None:
        self.opened = False
        self.collections_in_window = 0
        self.collected_before: int | None = None
        self.frozen_objects: int | None = None
        self.collected_after: int | None = None

    def _count(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.collections_in_window += 1

    def open(self) -> None:
        self.collected_before = gc.collect()  # unreachable objects of start-up and warm-up, freed now
        gc.freeze()
        self.frozen_objects = gc.get_freeze_count()
        gc.disable()
        gc.callbacks.append(self._count)
        self.opened = True

    def close(self) -> None:
        if not self.opened:
            return
        if self._count in gc.callbacks:
            gc.callbacks.remove(self._count)
        gc.enable()
        gc.unfreeze()
        self.collected_after = gc.collect()
        self.opened = False

    def record(self) -> dict:
        return {"policy": POLICY, "collections_in_window": self.collections_in_window,
                "collected_after_warmup": self.collected_before, "frozen_objects": self.frozen_objects,
                "collected_after_window": self.collected_after}
