"""Tensor and context parallelism inside a rank (bench/worker/parallel.py), on 2 CPU processes over gloo.

accelerate refuses a ParallelismConfig under MULTI_CPU, so a whole CPU cell with tp/cp is `unsupported`
(bench/strategies/degrees.py); what runs here is the worker's own part on torch's DTensor over gloo: the
model split by transformers' plan on a "tp" mesh must train exactly as the whole model does. The same
processes keep the evidence behind two refusals: LoRA on the split model computes another loss, and torch's
context parallelism has no rule for the CPU attention kernel.
"""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch

from bench.spec import CellSettings, Train, models
from bench.worker import parallel
from bench.worker.data import data_parallel_rank
from bench.worker.prepare import build_optimizer, trainable_groups

VOCAB = models.ModelShape.of("tiny-llama").vocab
TRAIN = Train(lr=1e-3, weight_decay=0.01)  # torch AdamW's own default weight decay


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tie: bool):
    from transformers import AutoConfig

    # Given at construction: transformers ties the head when it builds the model from this flag.
    config = AutoConfig.for_model(**{**models.config_dict("tiny-llama"), "tie_word_embeddings": tie})
    config.use_cache = False
    return config


def _build(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # every rank builds the same whole model, as the reference does
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")


def _batch():
    return torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))


def _join(rank: int, world: int, port: int):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "ACCELERATE_USE_CPU": "1"})
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from torch.distributed.device_mesh import init_device_mesh

    accelerator = Accelerator(cpu=True)  # MULTI_CPU over gloo: what clips the gradients below
    return accelerator, init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))


def _train_worker(rank: int, world: int, port: int, tie: bool, mode: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    accelerator, mesh = _join(rank, world, port)
    try:
        config = _config(tie)
        report: dict = {}
        if mode == "meta":
            from bench.worker.meta_init import build_on_meta, materialise

            model = parallel.apply_tensor_parallel(build_on_meta(config, torch.float32, "sdpa"), mesh["tp"], world)
            materialise(model, "cpu")
            q = model.model.layers[0].self_attn.q_proj.weight
            report["no_meta"] = not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
            report["q_std"] = float(q.to_local().std())
            report["q_first"] = q.to_local().flatten()[:4].tolist()
            report["tied"] = model.lm_head.weight is model.model.embed_tokens.weight
            report["loss"] = float(model(input_ids=_batch(), labels=_batch()).loss)
        else:
            reference, model = _build(config), parallel.apply_tensor_parallel(_build(config), mesh["tp"], world)
            q = model.model.layers[0].self_attn.q_proj.weight
            report["q_local_rows"], report["q_rows"] = q.to_local().shape[0], q.shape[0]
            report["head_split"] = isinstance(model.lm_head.weight, DTensor)
            report["tied"] = model.lm_head.weight is model.model.embed_tokens.weight
            if mode == "lora":
                from peft import LoraConfig, get_peft_model

                lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)  # B not zero
                reference, model = get_peft_model(reference, lora), get_peft_model(model, lora)
                _copy_adapters(reference, model, rank)
            report["losses"], report["reference"] = [], []
            for net, key in ((model, "losses"), (reference, "reference")):
                # the worker's optimizer, on the foreach kernels that CUDA defaults to (CPU would take the loop)
                optimizer = build_optimizer(TRAIN, net.parameters(), foreach=True)
                for _ in range(3 if mode == "train" else 1):
                    loss = net(input_ids=_batch(), labels=_batch()).loss
                    loss.backward()
                    accelerator.clip_grad_norm_(net.parameters(), 1.0)  # DTensor and plain gradients together
                    optimizer.step()
                    optimizer.zero_grad()
                    report[key].append(float(loss.detach()))
            if mode == "train":
                report["one_group_error"] = _one_group_error(model)
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(report, f)
    finally:
        dist.destroy_process_group()


def _one_group_error(model) -> str:
    """What torch's AdamW on its foreach kernels says of the split model's parameters in one group (the
    optimizer bench built before issue 22's fix): lr 0 and no weight decay, so that the step, if it ran, would
    change nothing; its first kernel is then the _foreach_lerp_ that crashed on 2x H200."""
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        torch.optim.AdamW(params, lr=0.0, weight_decay=0.0, foreach=True).step()
        return ""
    except RuntimeError as e:
        return str(e)


def _copy_adapters(reference, model, rank: int) -> None:
    """Give the split model's adapters the reference's values, cut the way peft sized them (local shards)."""
    whole = dict(reference.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                full = whole[name]
                dim = next((d for d in range(full.dim()) if p.shape[d] != full.shape[d]), None)
                p.copy_(full if dim is None else full.chunk(2, dim=dim)[rank])


def _spawn(tmp_path, *args) -> list[dict]:
    import torch.multiprocessing as mp

    mp.spawn(_train_worker, args=(2, _free_port(), *args, str(tmp_path)), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.launch_aside
@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_tensor_parallel_trains_as_the_whole_model(tie, tmp_path):
    for rep in _spawn(tmp_path, tie, "train"):
        assert rep["q_local_rows"] * 2 == rep["q_rows"]  # each rank holds half of q_proj's output rows
        # The head is split by vocabulary; a tied one stays tied to the (split) embedding.
        assert rep["head_split"] and rep["tied"] is tie
        # Same weights, same data, clipped AdamW (bench's, on foreach kernels): three steps of the split model
        # follow the whole one.
        assert rep["losses"] == pytest.approx(rep["reference"], rel=2e-5), rep
        assert rep["losses"][-1] < rep["losses"][0]
        # ... which the same kernels refuse with every parameter in one group (the GPU crash of issue 22)
        assert "_foreach_lerp_" in rep["one_group_error"] and "mixed torch.Tensor and DTensor" in \
            rep["one_group_error"], rep["one_group_error"]


@pytest.mark.launch_aside
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_meta_model_split_then_materialised_holds_each_rank_s_slices(tmp_path):
    reports = _spawn(tmp_path, True, "meta")
    for rep in reports:
        assert rep["no_meta"] and rep["tied"]
        assert rep["q_std"] == pytest.approx(0.02, rel=0.15)  # transformers' init: normal(0, initializer_range)
        assert abs(rep["loss"] - math.log(VOCAB)) < 0.5
    assert reports[0]["q_first"] != reports[1]["q_first"]  # two slices of one weight, not one slice twice


@pytest.mark.launch_aside
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_lora_on_the_split_model_computes_another_loss(tmp_path):
    """Why adapters under tensor parallelism are unsupported: peft sizes LoRA to the local shards, but the
    adapter path of the row-wise layers is never summed over the ranks. If a peft release fixes it, this test
    fails: lift the refusal in bench/strategies/degrees.py then."""
    for rep in _spawn(tmp_path, False, "lora"):
        assert rep["losses"][0] != pytest.approx(rep["reference"][0], rel=1e-4), rep


def _cp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.tensor.experimental import context_parallel

    _, mesh = _join(rank, world, port)
    try:
        q = torch.randn(1, 2, 16, 8)
        try:
            with context_parallel(mesh, buffers=[q], buffer_seq_dims=[2]):
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
            outcome = "ran"
        except NotImplementedError as e:
            outcome = str(e)
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"outcome": outcome}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.launch_aside
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_context_parallel_has_no_rule_for_the_cpu_attention_kernel(tmp_path):
    """Why cp is refused on CPU (the CUDA path is bench/worker/parallel.py's split_sequences)."""
    import torch.multiprocessing as mp

    mp.spawn(_cp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        outcome = json.loads((tmp_path / f"rank{r}.json").read_text())["outcome"]
        assert "flash_attention_for_cpu" in outcome and "sharding strategy" in outcome, outcome


# ---------------------------------------------------------------- no processes

def test_context_parallel_inputs_shift_labels_on_the_whole_sequence():
    ids = torch.arange(12).view(2, 6)
    cell = CellSettings(strategy="fsdp2", gpus=2, cp=2, device="cuda", train={"seq_len": 6})
    inputs = parallel.model_inputs(cell, {"input_ids": ids, "labels": ids, "real_tokens": 12})
    assert inputs["shift_labels"].tolist() == [[1, 2, 3, 4, 5, -100], [7, 8, 9, 10, 11, -100]]
    assert inputs["position_ids"].tolist() == [list(range(6))] * 2
    assert set(parallel.model_inputs(cell.model_copy(update={"cp": 1}), {"input_ids": ids, "labels": ids})) == \
        {"input_ids", "labels"}


@pytest.mark.parametrize(("tp", "cp", "ranks"), [(1, 1, [0, 1, 2, 3]), (2, 1, [0, 0, 1, 1]), (2, 2, [0, 0, 0, 0]),
                                                 (1, 2, [0, 0, 1, 1])])
def test_the_ranks_of_a_tensor_or_context_group_read_one_batch(tp, cp, ranks):
    cell = CellSettings(strategy="fsdp2", gpus=4, tp=tp, cp=cp, device="cuda")
    assert [data_parallel_rank(cell, r, 4)[0] for r in range(4)] == ranks
    assert data_parallel_rank(cell, 0, 4)[1] == 4 // (tp * cp)


@pytest.mark.parametrize(("strategy", "gpus", "cp", "want"), [
    ("fsdp2", 1, 1, {"tp": 1, "cp": 1, "dp_shard": 1, "dp_replicate": 1, "mesh": []}),
    ("ddp", 4, 1, {"tp": 1, "cp": 1, "dp_shard": 1, "dp_replicate": 4, "mesh": []}),
    ("fsdp2", 4, 1, {"tp": 1, "cp": 1, "dp_shard": 4, "dp_replicate": 1, "mesh": []}),
    ("zero3", 2, 1, {"tp": 1, "cp": 1, "dp_shard": 2, "dp_replicate": 1, "mesh": []}),
])
def test_every_rank_report_says_its_degrees_without_a_parallelism_config(strategy, gpus, cp, want):
    """tp 1 / cp 1 cells record their degrees too (rank report "parallel"): from the cell and its strategy where
    accelerate built no ParallelismConfig (the accelerator here stands in for a CUDA one: only its config is read;
    the world comes from torch.distributed, since under DeepSpeed accelerate's num_processes reads 1, as here)."""
    from types import SimpleNamespace

    from bench import strategies

    cell = CellSettings(strategy=strategy, gpus=gpus, cp=cp, device="cuda")
    accelerator = SimpleNamespace(parallelism_config=None, num_processes=1)
    assert parallel.describe(accelerator, cell, strategies.for_cell(cell), gpus) == want


def test_a_parallelism_config_s_degrees_are_recorded_as_accelerate_holds_them():
    from types import SimpleNamespace

    from accelerate.parallelism_config import ParallelismConfig

    from bench import strategies

    cell = CellSettings(strategy="fsdp2", gpus=2, cp=2, device="cuda")
    accelerator = SimpleNamespace(parallelism_config=ParallelismConfig(dp_shard_size=1, cp_size=2), num_processes=2)
    assert parallel.describe(accelerator, cell, strategies.for_cell(cell), 2) == \
        {"tp": 1, "cp": 2, "dp_shard": 1, "dp_replicate": 1, "mesh": ["cp"]}


@pytest.fixture
def one_rank_mesh(one_rank_group):
    """A one-rank mesh over this process's gloo group: enough for real DTensors, no process launched."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))


def test_the_optimizer_keeps_the_split_model_s_dtensors_apart_from_its_plain_tensors(one_rank_mesh):
    """Issue 22: torch's foreach kernels (CUDA's default) refuse one list of both kinds; bench's optimizer gives
    each kind its own group, with the cell's lr and weight decay, and its foreach step runs. The layer is split
    by torch's own API (transformers' plan leaves a one-rank mesh whole), to the same kinds: a split linear
    beside a plain norm."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    model = parallelize_module(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)),
                               one_rank_mesh["tp"], {"0": ColwiseParallel()})
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    assert [isinstance(p, DTensor) for p in model.parameters()] == [True, True, False, False]
    with pytest.raises(RuntimeError, match="mixed torch.Tensor and DTensor"):
        torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0, foreach=True).step()
    optimizer = build_optimizer(TRAIN, model.parameters(), foreach=True)
    assert [{isinstance(p, DTensor) for p in g["params"]} for g in optimizer.param_groups] == [{True}, {False}]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert {(g["lr"], g["weight_decay"]) for g in optimizer.param_groups} == {(1e-3, 0.01)}
    optimizer.step()


@pytest.mark.parametrize("name", ["adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit"])
def test_a_model_of_plain_tensors_keeps_one_group_of_its_trainable_parameters(name):
    model = torch.nn.Linear(64, 64)
    model.bias.requires_grad_(False)
    (group,) = trainable_groups(model.parameters())
    assert len(group["params"]) == 1 and group["params"][0] is model.weight
    optimizer = build_optimizer(Train(optimizer=name, lr=1e-3, weight_decay=0.1), model.parameters())
    (group,) = optimizer.param_groups
    assert group["params"][0] is model.weight and (group["lr"], group["weight_decay"]) == (1e-3, 0.1)
    assert name != "adamw_bnb_8bit" or type(optimizer).__module__.startswith("bitsandbytes")
