"""The fixed training step, run once per rank under `accelerate launch`.

Read top to bottom like a plain training script: parse, build the model, wrap it, run warm-up and
timed steps, write this rank's report. It trains nothing useful: weights are random, data synthetic
(or a local data set), and what is kept is how long each optimizer step took and what it held.

    accelerate launch --config_file accelerate.yaml -m bench.worker --cell cell.json --out ranks/
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch

from bench.records.rank_files import RankFiles, classify_exception
from bench.spec import CellSettings
from bench.strategies.build import builds_on_meta
from bench.strategies.precision import policy_for
from bench.worker import affinity, fast_paths, memory_snapshot, parallel, slowdown, transfers
from bench.worker.gc_window import GcWindow
from bench.worker.host_window import HostWindow
from bench.worker.guard import cell_strategy, check_optimizer_steps_the_model, guard_distributed_setup
from bench.worker.prepare import Preparer, preparer_for, unwrap
from bench.worker.cpu_probe import step_probe_ms
from bench.worker.timing import StoppingRule

PROCESS_START = time.time()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__.splitlines()[0])
    p.add_argument("--cell", required=True, help="cell.json written by bench run")
    p.add_argument("--out", required=True, help="folder for this cell's rank reports and heartbeats")
    return p.parse_args(argv)


# ---------------------------------------------------------------- setup

def make_accelerator(cell: CellSettings):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    timeout = timedelta(seconds=int(os.environ.get("BENCH_COLLECTIVE_TIMEOUT_S", "120")))
    kwargs = {"kwargs_handlers": [InitProcessGroupKwargs(timeout=timeout)]}
    if plugin := fast_paths.dynamo_plugin(cell):  # train.compile: accelerate compiles in prepare (fast_paths.py)
        kwargs["dynamo_plugin"] = plugin
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        # Under DeepSpeed the JSON owns accumulation (accelerate refuses it twice).
        kwargs["gradient_accumulation_steps"] = cell.train.grad_accum
    return Accelerator(**kwargs)


def world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed: under DeepSpeed accelerate's num_processes reads 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def apply_memory_cap(cell: CellSettings, device: torch.device) -> None:
    """Emulate a smaller card: the caching allocator refuses to grow past the cap."""
    if cell.gpu_memory_gib and device.type == "cuda":
        # A single-process launch gets a bare "cuda" device; the cap call needs the card's index.
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cell.gpu_memory_gib * 2**30 / total), index)


def build_model(cell: CellSettings, device: torch.device, on_meta: bool = False):
    """Random init from the shipped config, straight on the target device in the storage dtype.

    Under ZeRO-3 transformers builds the model inside deepspeed.zero.Init (accelerate registered the
    DeepSpeed config), so each rank only ever holds its own shard. ``on_meta``: no storage at all until
    FSDP has sharded it (bench/worker/prepare.py).
    """
    from bench.worker.model_build import build_causal_lm

    return build_causal_lm(cell, device, policy_for(cell), on_meta=on_meta)


def make_batches(cell: CellSettings, vocab: int, rank: int, device: torch.device, world_size: int = 1):
    from bench.worker.data import batch_source

    return batch_source(cell, vocab, rank, device, world_size)


# ---------------------------------------------------------------- the loop

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(cell: CellSettings, model, optimizer, accelerator, batches, device: torch.device,
               preparer: Preparer) -> dict:
    """One optimizer step over grad_accum micro-batches, timed in two parts.

    ``fwd_bwd_s``: forward and backward of every micro-batch; ``optim_s``: gradient clipping, the
    optimizer step and zeroing (where ZeRO-Offload's host-device traffic shows). The device is
    synchronised between the parts so that each figure holds its own kernels, at the cost of one
    short bubble per step. The framework's ``preparer`` runs backward and step (bench/worker/prepare.py).
    """
    losses, tokens, real, fwd_bwd_s, optim_s, skipped = [], 0, 0, 0.0, 0.0, False
    for _ in range(cell.train.grad_accum):
        batch = next(batches)
        tokens += batch["input_ids"].numel()  # before context parallelism splits the inputs in place
        real += int(batch["real_tokens"])
        inputs = parallel.model_inputs(cell, batch)
        with accelerator.accumulate(model):
            t0 = time.perf_counter()
            with parallel.split_sequences(accelerator, cell, inputs):  # cp > 1: bench/worker/parallel.py
                out = model(**inputs)
                preparer.backward(model, out.loss, accelerator)
            sync(device)
            t1 = time.perf_counter()
            skipped = preparer.step(cell, model, optimizer, accelerator) or skipped
            sync(device)
            fwd_bwd_s += t1 - t0
            optim_s += time.perf_counter() - t1
        losses.append(out.loss.detach())
    return {"loss": float(torch.stack(losses).float().mean()), "tokens": tokens, "real_tokens": real,
            "fwd_bwd_s": fwd_bwd_s, "optim_s": optim_s, "optimizer_skipped": skipped}


def slowest_rank(values: list[float], device: torch.device) -> list[float]:
    """Element-wise MAX of ``values`` over all ranks (gloo or NCCL); the values themselves at one process.

    Every rank then holds the slowest rank's figures and, evaluating the same rule on the same numbers,
    stops at the same step: a rank that stopped alone would leave the others waiting in a collective.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def run_steps(cell: CellSettings, one_step, accelerator, device: torch.device, files: RankFiles):
    """Warm-up, then timed steps until the stopping rule (bench/worker/timing.py) says so.

    Every rank starts each step together; after each timed step, outside its timed region, the ranks
    agree on the slowest rank's step time and timed seconds, so the rule sees one series everywhere.
    The garbage collector is kept out of the timed window (bench/worker/gc_window.py); what the host did
    meanwhile is counted (bench/worker/host_window.py), and its pace read before each timed step
    (``host_pace_ms``), so the report can tell the steps timed on a slow host (bench/report/host_steady.py).
    Returns (steps, timed window in wall clock, timing summary on the slowest-rank series, gc record,
    host record).
    """
    rule = StoppingRule.from_train(cell.train)
    steps, window, slowest = [], [None, None], []
    collector, host = GcWindow(), HostWindow()
    reason, timed_s, window_t0, i = None, 0.0, 0.0, 0
    try:
        while reason is None:
            phase = "warmup" if i < cell.train.warmup_steps else "timed"
            if phase == "timed" and window[0] is None:
                host.probe()  # before the barrier, like the collection below: no rank's timed step waits on it
                collector.open()  # before the barrier: every rank enters the window collected and frozen
            # the host's pace just before this step (bench/worker/cpu_probe.py), before the barrier as well
            pace = {"host_pace_ms": step_probe_ms()} if phase == "timed" else {}
            files.heartbeat(phase, i)  # the runner's hang watchdog reads it: one per step
            accelerator.wait_for_everyone()
            sync(device)
            if phase == "timed" and window[0] is None:
                window[0] = time.time()  # wall clock, so the parent's NVML samples can be cut to it
                window_t0 = time.perf_counter()
                host.open()
            started_at = time.time()  # wall clock as well: lines each step up with the NVML samples
            t0 = time.perf_counter()
            parts = one_step()
            sync(device)
            step_s = time.perf_counter() - t0
            steps.append({"step": i, "phase": phase, "started_at": started_at, "time_s": step_s, **parts, **pace})
            if phase == "timed":
                window[1] = time.time()
                slowest_s, timed_s = slowest_rank([step_s, time.perf_counter() - window_t0], device)
                slowest.append(slowest_s)
                reason = rule.stop_reason(slowest, timed_s)
            i += 1
    finally:
        host.close()
        collector.close()
    return steps, window, rule.summary(slowest, timed_s, reason), collector.record(), host.record()


def _process_created_at() -> float:
    import psutil

    return psutil.Process().create_time()


def import_model_code(cell: CellSettings) -> None:
    """Import what building the model will import anyway: the architecture's transformers module (the auto
    classes import it on first use) and peft."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from bench.spec import models

    MODEL_FOR_CAUSAL_LM_MAPPING[type(models.training_config(cell.model))]
    if cell.adapter.type != "none":
        import peft  # noqa: F401


def start_before_build(cell: CellSettings, device: torch.device) -> dict[str, float]:
    """Everything a rank does before building the model, each part timed (seconds).

    The CUDA context is created lazily by the first allocation, and transformers/peft import their model
    code lazily on first use: both are done here, timed apart, so that neither is read as the build's cost.
    """
    t_context = time.time()
    startup = {"interpreter_and_torch_s": PROCESS_START - _process_created_at(),  # python, torch, accelerate
               "process_to_build_s": t_context - PROCESS_START}  # the accelerator and process group
    if device.type == "cuda":
        torch.zeros(1, device=device)
        sync(device)
    t_imports = time.time()
    startup["device_context_s"] = t_imports - t_context
    import_model_code(cell)
    startup["model_code_imports_s"] = time.time() - t_imports
    return startup


def run(cell: CellSettings, files: RankFiles, cell_dir: Path | None = None, pinned: dict | None = None) -> None:
    accelerator = make_accelerator(cell)
    rank, world_size = world()
    files.rank = rank
    device = accelerator.device
    files.heartbeat("init")
    guard_distributed_setup(cell, accelerator, world_size, cell_dir)
    apply_memory_cap(cell, device)
    torch.manual_seed(cell.train.seed)

    startup = start_before_build(cell, device)
    t_build = time.time()
    strategy = cell_strategy(cell, cell_dir)
    on_meta = builds_on_meta(cell, strategy)
    kernels = fast_paths.apply_kernels_before_build(cell)  # Liger patches the model code it is built from
    model = build_model(cell, device, on_meta)
    if strategy.splits_layers:  # before accelerate wraps it: the plan names the model's own modules
        model = parallel.apply_tensor_parallel(model, parallel.tensor_mesh(accelerator), cell.tp)
    preparer = preparer_for(strategy)
    preparer.before_prepare(cell, model, accelerator)
    startup["build_model_s"] = time.time() - t_build
    t = time.time()
    model, optimizer = preparer.prepare(cell, model, accelerator, device, on_meta)
    check_optimizer_steps_the_model(model, optimizer, strategy)
    model.train()
    compiled = fast_paths.compiled_regions(cell, model)  # what accelerate's prepare compiled (train.compile)
    startup["optimizer_and_prepare_s"] = time.time() - t
    build_memory = build_memory_and_reset(device)
    t = time.time()
    batches = make_batches(cell, model_vocab(model), rank, device, world_size)
    startup["batches_s"] = time.time() - t
    init_s = time.time() - t_build

    def one_step() -> dict:
        return train_step(cell, model, optimizer, accelerator, batches, device, preparer)

    one_step = clock = fast_paths.CompileClock(one_step, cell.train.warmup_steps) if compiled else one_step

    one_step = memory_snapshot.from_env(one_step, cell.train.warmup_steps, device, files.folder, rank)  # --memory-snapshot
    one_step = slowdown.from_env(one_step, cell.train.warmup_steps, device)  # --slow-step only: bench/worker/slowdown.py
    steps, window, timing, collector, host = run_steps(cell, one_step, accelerator, device, files)
    total = len(steps)
    traffic = None
    if device.type == "cuda" and transfers.offloads(strategy):
        files.heartbeat("profiled", total)  # one extra step, not timed: see bench/worker/transfers.py
        traffic = transfers.measure(one_step, lambda: sync(device))
    files.heartbeat("done", total)
    report = rank_report(cell, accelerator, model, rank, world_size, device, steps, init_s, window)
    report.update(optimizer_figures(model, optimizer, steps))
    report["timing"] = timing  # the stopping rule, why it stopped, the interval reached (slowest-rank series)
    report["gc"] = collector
    report["host"] = host  # CPU stolen / busy on the host and this rank's CPU use over the timed window
    report["startup_breakdown"] = startup  # where the time before the first step went
    report["model_init"] = "meta, materialised per shard" if on_meta else "on device"
    report["parallel"] = parallel.describe(accelerator, cell, strategy, world_size)  # the degrees it ran, tp/cp 1 included
    if kernels:
        report["kernels"] = {**kernels, **fast_paths.kernels_in_model(unwrap(model))}
    if compiled:
        report["compile"] = clock.record(compiled, steps)  # compile_s apart from the step times
    report.update(build_memory)
    report.update(training_memory(device, build_memory))
    if snapshot := memory_snapshot.describe(one_step, cell.train.warmup_steps, device):
        report["memory_snapshot"] = snapshot  # the allocator's history over the warm-up (bench/worker/memory_snapshot.py)
    if injected := slowdown.describe(one_step):
        report["injected_slowdown"] = injected  # this launch was slowed on purpose
    if traffic is not None:
        report["host_device_traffic"] = traffic
    if pinned is not None:
        report["cpu_affinity"] = affinity.describe(pinned)  # cpu_affinity: cores (bench/worker/affinity.py)
    files.write_report(report)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def build_memory_and_reset(device: torch.device) -> dict:
    """What building and preparing the model held, then the peak statistics reset so that the steps'
    own peak is read apart (FSDP LoRA built on the GPU held 48.5 GiB where training needs 37.6).

    ``peak_allocated_after_prepare_bytes``: the build's allocated peak (meta init keeps it to a shard);
    ``reserved_after_prepare_bytes``: what the caching allocator keeps from the build (freed build tensors
    stay cached; the estimator's released_build_blocks is checked against it); ``peak_reserved_after_
    prepare_bytes``: the most it reserved up to then. None on CPU.
    """
    if device.type != "cuda":
        return {"peak_allocated_after_prepare_bytes": None, "reserved_after_prepare_bytes": None,
                "peak_reserved_after_prepare_bytes": None}
    out = {"peak_allocated_after_prepare_bytes": torch.cuda.max_memory_allocated(device),
           "reserved_after_prepare_bytes": torch.cuda.memory_reserved(device),
           "peak_reserved_after_prepare_bytes": torch.cuda.max_memory_reserved(device)}
    torch.cuda.reset_peak_memory_stats(device)
    return out


def training_memory(device: torch.device, build: dict) -> dict:
    """The steps' peaks (warm-up, timed and any profiled step) since the reset, and the whole run's peaks
    (``torch_peak_*``: the larger of build and training, what the memory estimator is judged against)."""
    if device.type != "cuda":
        return {}
    allocated, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    return {"training_peak_allocated_bytes": allocated, "training_peak_reserved_bytes": reserved,
            "torch_peak_allocated_bytes": max(allocated, build["peak_allocated_after_prepare_bytes"]),
            "torch_peak_reserved_bytes": max(reserved, build["peak_reserved_after_prepare_bytes"])}


def innermost_optimizer(model, optimizer):
    """The optimizer that stepped the weights: under DeepSpeed the engine's own (a user JSON's optimizer block
    becomes FusedAdam on CUDA, wrapped by the ZeRO optimizer), else torch's or bitsandbytes' behind
    accelerate's wrapper."""
    found = getattr(model, "optimizer", None) or optimizer  # a DeepSpeed engine holds the one it built
    while getattr(found, "optimizer", None) is not None:
        found = found.optimizer
    return found


def optimizer_figures(model, optimizer, steps: list[dict]) -> dict:
    """What the optimizer did over the run: its class, the steps whose update fp16's loss scaler skipped, the
    tensors it keeps state for, and whether steps that should have updated the weights updated nothing."""
    skipped = skipped_updates(steps)
    entries = optimizer_state_entries(model, optimizer)
    return {"optimizer_class": type(innermost_optimizer(model, optimizer)).__name__, "optimizer_skipped": skipped,
            "optimizer_state_entries": entries,
            "optimizer_updated_nothing": entries == 0 and len(steps) > sum(skipped.values())}


def optimizer_state_entries(model, optimizer) -> int:
    """Tensors the optimizer keeps state for after the run (every AdamW bench runs keeps moments per updated
    tensor, under DeepSpeed per flat partition). 0 after an update means the steps updated nothing."""
    return len(getattr(innermost_optimizer(model, optimizer), "state", {}) or {})


def skipped_updates(steps: list[dict]) -> dict:
    """How many warm-up and timed steps skipped the optimizer update (fp16's loss scaler lowering its scale
    after inf/NaN gradients). A skipped step does no optimizer work: timed, it reads shorter than a real one."""
    return {phase: sum(bool(s.get("optimizer_skipped")) for s in steps if s["phase"] == phase)
            for phase in ("warmup", "timed")}


def model_vocab(model) -> int:
    return unwrap(model).config.vocab_size


def rank_report(cell, accelerator, model, rank, world_size, device, steps, init_s, window) -> dict:
    import psutil

    inner = unwrap(model)
    trainable = sum(p.numel() for p in inner.parameters() if p.requires_grad)
    report = {
        "rank": rank,
        "world_size": world_size,
        "hostname": os.uname().nodename,
        # where the rank ran: torchrun's node rank (GROUP_RANK; Slurm's SLURM_NODEID under a Slurm launch),
        # its rank on that node, and the Slurm node name (None outside Slurm)
        "node_rank": int(os.environ.get("GROUP_RANK", os.environ.get("SLURM_NODEID", "0"))),
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "slurm_node": os.environ.get("SLURMD_NODENAME"),
        "device": str(device),
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "backend": _backend(),
        "precision_policy": policy_for(cell).name,
        "mixed_precision": accelerator.mixed_precision,
        "trainable_params_local": trainable,
        "init_s": init_s,
        "process_start_to_report_s": time.time() - PROCESS_START,
        "steps": steps,
        "timed_window": window if window[0] is not None else None,  # [time.time() start, end] of timed steps
        # ru_maxrss is in KiB on Linux
        "host_rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "host_rss_now_bytes": psutil.Process().memory_info().rss,
    }
    if device.type == "cuda":
        report.update({
            "gpu_name": torch.cuda.get_device_name(device),
            "gpu_total_bytes": torch.cuda.get_device_properties(device).total_memory,
        })
    return report


def _backend() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def main(argv=None) -> int:
    args = parse_args(argv)
    cell = CellSettings.model_validate_json(Path(args.cell).read_text())
    files = RankFiles(Path(args.out), rank=int(os.environ.get("RANK", "0")))
    try:
        pinned = affinity.apply_from_env()  # before any library starts its threads: they inherit the mask
        run(cell, files, Path(args.cell).parent, pinned)
    except BaseException as exc:  # noqa: BLE001 - the runner classifies every failure from this file
        kind = classify_exception(exc)
        files.write_error(kind, exc, traceback.format_exc())
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        # Leave at once: a normal exit runs the process group's and DeepSpeed's teardown, which can block
        # on collectives the failed step left pending, and turn this error into a hang of the cell.
        os._exit(3 if kind == "oom" else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
