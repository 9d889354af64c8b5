"""A slowdown injected on purpose, to prove that the nightly gate catches one (``--slow-step 0.10``).

Off unless the worker's environment sets ``BENCH_SLOW_STEP`` (``bench run/nightly --slow-step F`` sets it for
the launch; it is not a cell setting, so the cell keeps the id of its baseline). When on, every timed step does
real extra device work costing the fraction F of the plain step:

- calibration, during the warm-up steps: the plain step is timed (median of the warm-up steps after the
  first, which pays for lazy initialisation; the only one if there is one); then one square matmul on the
  step's device (bf16 on CUDA, fp32 on CPU) is sized so that it costs F times that: its size n grows as the
  cube root of the time wanted, up to a cap that keeps its three n x n buffers small (96 MiB on CUDA, 48 MiB
  on CPU: far below the memory check's 256 MiB), and the matmul is repeated where one at the cap is too
  short. Its time is measured after sizing.
- every later step runs the plain step, then that matmul, inside the step's synchronised timed region.

The rank report names it (``injected_slowdown``: fraction, matmul size, repeats, the plain step it was sized
on, the extra time measured), so the record, the report and the check say that the night was slowed.
With no warm-up step the first timed step carries the calibration (and is slower for it).
"""

from __future__ import annotations

import os
import time
from statistics import median
from typing import Callable

import torch

ENV = "BENCH_SLOW_STEP"
MAX_N = {"cuda": 4096, "cpu": 2048}  # 3 buffers: 3 x 4096^2 x 2 B = 96 MiB bf16; 3 x 2048^2 x 4 B = 48 MiB fp32


def launch_env(fraction: float | None) -> dict[str, str]:
    """What ``bench run --slow-step`` adds to a launch's environment (nothing when off)."""
    return {ENV: repr(float(fraction))} if fraction else {}


def fraction_from_env() -> float | None:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    value = float(raw)
    if not 0 < value <= 10:
        raise ValueError(f"{ENV}={raw}: give the slowdown as a fraction of the step, e.g. 0.10 (0 < F <= 10)")
    return value


def injected_slowdown(record) -> dict | None:
    """The slowdown a record's launch was run with (its first rank's report), or None."""
    for rank in record.ranks:
        if rank.get("injected_slowdown"):
            return rank["injected_slowdown"]
    return None


class SlowedStep:
    """``one_step`` with the calibrated matmul appended to every step after warm-up."""

    def __init__(self, one_step: Callable[[], dict], fraction: float, warmup_steps: int, device: torch.device):
        self.one_step, self.fraction, self.warmup_steps, self.device = one_step, fraction, warmup_steps, device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.plain: list[float] = []
        self.calls = 0
        self.buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.repeats = 0
        self.injected: dict | None = None  # what the rank report names

    def __call__(self) -> dict:
        self.calls += 1
        if self.injected is not None:
            parts = self.one_step()
            self._extra_work()
            return parts
        t0 = time.perf_counter()
        parts = self.one_step()
        self._sync()
        self.plain.append(time.perf_counter() - t0)
        if self.calls >= self.warmup_steps:
            self._calibrate()
        return parts

    # ------------------------------------------------------------ calibration

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _allocate(self, n: int) -> None:
        a = torch.randn(n, n, device=self.device, dtype=self.dtype)
        self.buffers = (a, torch.randn(n, n, device=self.device, dtype=self.dtype), torch.empty_like(a))

    def _extra_work(self) -> None:
        a, b, out = self.buffers
        for _ in range(self.repeats):
            torch.matmul(a, b, out=out)

    def _time_work(self, samples: int = 3) -> float:
        self._extra_work()  # first call: kernel selection, caches
        self._sync()
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            self._extra_work()
            self._sync()
            times.append(time.perf_counter() - t0)
        return median(times)

    def _calibrate(self) -> None:
        plain = median(self.plain[1:]) if len(self.plain) > 1 else self.plain[0]
        target = self.fraction * plain
        n, self.repeats, cap = 256, 1, MAX_N.get(self.device.type, MAX_N["cpu"])
        for _ in range(6):  # n ~ cube root of time: a few rounds settle it
            self._allocate(n)
            took = self._time_work()
            wanted = max(16, round(n * (target / took) ** (1 / 3)))
            if wanted > cap:  # one matmul at the cap is too short: repeat it
                if n != cap:
                    n = cap
                    continue
                self.repeats = max(1, round(target / (took / self.repeats)))
                break
            if abs(wanted - n) <= 0.03 * n:
                break
            n = wanted
        self._allocate(n)
        measured = self._time_work()
        self.injected = {"fraction": self.fraction, "matmul_n": n, "repeats": self.repeats,
                         "dtype": str(self.dtype).removeprefix("torch."), "plain_step_s": plain,
                         "target_extra_s": target, "measured_extra_s": measured,
                         "calibrated_on_steps": len(self.plain)}


def from_env(one_step: Callable[[], dict], warmup_steps: int, device: torch.device) -> Callable[[], dict]:
    """``one_step`` itself when BENCH_SLOW_STEP is unset, else the slowed step."""
    fraction = fraction_from_env()
    return SlowedStep(one_step, fraction, warmup_steps, device) if fraction else one_step


def describe(one_step) -> dict | None:
    """For the rank report: the injected slowdown of a step made by ``from_env``, or None."""
    return getattr(one_step, "injected", None)
