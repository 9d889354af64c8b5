"""A slowdown injected on purpose, to prove that the nightly gate catches one (``--slow-step 0.10``).

Off unless the worker's environment sets ``BENCH_SLOW_STEP`` (``bench run/nightly --slow-step F`` sets it for
the launch; it is not a cell setting, so the cell keeps the id of its baseline). When on, every step after
warm-up is made F slower than itself with real extra device work:

- the plain step runs and is timed (synchronised);
- then square matmuls on the step's device (bf16 on CUDA, fp32 on CPU) run, each synchronised, until the
  extra time reaches F times that plain step. The extra work therefore tracks each step: a step that is
  slower or faster than the warm-up (ZeRO-3's first steps took 3.5x its later ones on 2x H200) or that leaves
  the device idle part of the time (a matmul queued behind a host-bound step hides in its gaps: a first
  version, sized once during warm-up, slowed such steps by 3-7 % for a stated 10 %) is still slowed by F.
- the matmul's size is chosen once, at the end of warm-up, so that one matmul costs at most 2 % of the extra
  time wanted (fine steps: the overshoot is under one matmul), and its three n x n buffers stay small
  (at most 96 MiB on CUDA, 48 MiB on CPU: far below the memory check's 256 MiB). With no warm-up step the
  first step is left plain and carries the sizing.

The rank report names it (``injected_slowdown``: fraction, matmul size, the extra time asked and reached, as
a fraction of the plain step, median over the slowed steps), so the record, the report and the check say that
the night was slowed and by how much it really was.
"""

from __future__ import annotations

import os
import time
from statistics import median
from typing import Callable

import torch

ENV = "BENCH_SLOW_STEP"
MAX_N = {"cuda": 4096, "cpu": 2048}  # 3 buffers: 3 x 4096^2 x 2 B = 96 MiB bf16; 3 x 2048^2 x 4 B = 48 MiB fp32
MIN_N = 32


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
    """``one_step`` followed, after warm-up, by matmuls that make it ``fraction`` slower than itself."""

    def __init__(self, one_step: Callable[[], dict], fraction: float, warmup_steps: int, device: torch.device):
        self.one_step, self.fraction, self.warmup_steps, self.device = one_step, fraction, warmup_steps, device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.plain: list[float] = []  # every plain step's time, warm-up included
        self.reached: list[float] = []  # extra time / plain time, per slowed step
        self.calls = 0
        self.buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.matmul_s = 0.0

    def __call__(self) -> dict:
        self.calls += 1
        t0 = time.perf_counter()
        parts = self.one_step()
        self._sync()
        plain = time.perf_counter() - t0
        self.plain.append(plain)
        if self.buffers is not None:
            self.reached.append(self._extra_work(self.fraction * plain) / plain)
        elif self.calls >= self.warmup_steps:
            self._size_matmul()
        return parts

    @property
    def injected(self) -> dict | None:
        """What the rank report names; None until a step was slowed."""
        if not self.reached:
            return None
        n = self.buffers[0].shape[0]
        return {"fraction": self.fraction, "matmul_n": n, "dtype": str(self.dtype).removeprefix("torch."),
                "matmul_s": self.matmul_s, "sized_on_step_s": self._warm_step_s(),
                "slowed_steps": len(self.reached), "reached_fraction_median": median(self.reached),
                "reached_fraction_min": min(self.reached), "reached_fraction_max": max(self.reached)}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _extra_work(self, seconds: float) -> float:
        """Synchronised matmuls until ``seconds`` have passed; returns the time they took."""
        a, b, out = self.buffers
        t0 = time.perf_counter()
        while (took := time.perf_counter() - t0) < seconds:
            torch.matmul(a, b, out=out)
            self._sync()
        return took

    def _warm_step_s(self) -> float:
        # The first call pays for lazy initialisation: the later warm-up steps, when there are any.
        return median(self.plain[1:]) if len(self.plain) > 1 else self.plain[0]

    def _time_one_matmul(self, n: int) -> float:
        a = torch.randn(n, n, device=self.device, dtype=self.dtype)
        self.buffers = (a, torch.randn(n, n, device=self.device, dtype=self.dtype), torch.empty_like(a))
        times = []
        for _ in range(4):  # the first: kernel selection, caches
            t0 = time.perf_counter()
            torch.matmul(self.buffers[0], self.buffers[1], out=self.buffers[2])
            self._sync()
            times.append(time.perf_counter() - t0)
        return median(times[1:])

    def _size_matmul(self) -> None:
        grain = 0.02 * self.fraction * self._warm_step_s()
        n = MAX_N.get(self.device.type, MAX_N["cpu"])
        while (took := self._time_one_matmul(n)) > grain and n > MIN_N:
            n //= 2
        self.matmul_s = took


def from_env(one_step: Callable[[], dict], warmup_steps: int, device: torch.device) -> Callable[[], dict]:
    """``one_step`` itself when BENCH_SLOW_STEP is unset, else the slowed step."""
    fraction = fraction_from_env()
    return SlowedStep(one_step, fraction, warmup_steps, device) if fraction else one_step


def describe(one_step) -> dict | None:
    """For the rank report: the injected slowdown of a step made by ``from_env``, or None."""
    return getattr(one_step, "injected", None)
