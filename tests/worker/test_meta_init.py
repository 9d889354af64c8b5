"""bench.worker.meta_init on CPU: build on meta, materialise module by module, and the same under FSDP2/FSDP1 (gloo)."""

from __future__ import annotations

import functools
import json
import math
import socket

import pytest
import torch

from bench.spec import models
from bench.worker.meta_init import build_on_meta, materialise, materialise_module

from conftest import REPO

VOCAB = models.config_dict("tiny-llama")["vocab_size"]
LORA = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target": "all-linear"}


def _config(**overrides):
    from transformers import AutoConfig

    config = AutoConfig.for_model(**{**models.config_dict("tiny-llama"), **overrides})
    config.use_cache = False
    return config


def _reference(config):
    """The same architecture built the ordinary way, on CPU, to compare what must not be random."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")


def _loss_and_backward(model):
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 32))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item()


def _tensors(model):
    return [*model.named_parameters(), *model.named_buffers()]


def test_model_built_on_meta_has_no_storage():
    model = build_on_meta(_config(), torch.float32, "sdpa")
    tensors = _tensors(model)
    assert len(tensors) > 10
    assert all(t.is_meta for _, t in tensors), [n for n, t in tensors if not t.is_meta]
    # The rotary buffers are non-persistent, so a checkpoint would never fill them: they must be meta too.
    assert model.model.rotary_emb.inv_freq.is_meta


# llama3 is the rope type of the shipped Llama 3.x configs; its inv_freq is rescaled, not just theta-based.
LLAMA3_ROPE = models.config_dict("llama-3.2-1b")["rope_scaling"]


@pytest.mark.parametrize("rope_scaling", [None, LLAMA3_ROPE], ids=["default-rope", "llama3-rope"])
def test_materialise_gives_hf_style_init(rope_scaling):
    config = _config(rope_scaling=rope_scaling)
    torch.manual_seed(0)
    model = build_on_meta(config, torch.float32, "sdpa")
    materialise(model, "cpu")

    tensors = _tensors(model)
    assert not [n for n, t in tensors if t.is_meta]
    assert all(t.device.type == "cpu" and torch.isfinite(t).all() for _, t in tensors)
    norms = [m for m in model.modules() if "RMSNorm" in type(m).__name__]
    assert len(norms) == 2 * config.num_hidden_layers + 1
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    std = config.initializer_range
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for m in linears:
        assert abs(m.weight.std().item() - std) < 0.15 * std, m
        assert abs(m.weight.mean().item()) < 0.1 * std, m
    assert abs(model.model.embed_tokens.weight.std().item() - std) < 0.1 * std

    # to_empty-style allocation leaves garbage in the rotary buffers; they must equal a normal build's.
    ref = _reference(config).model.rotary_emb
    rotary = model.model.rotary_emb
    torch.testing.assert_close(rotary.inv_freq, ref.inv_freq, rtol=0, atol=0)
    torch.testing.assert_close(rotary.original_inv_freq, ref.original_inv_freq, rtol=0, atol=0)
    if rope_scaling is not None:
        # Guards the test itself: llama3 scaling really changes the frequencies.
        assert not torch.allclose(ref.inv_freq, _reference(_config()).model.rotary_emb.inv_freq)

    loss = _loss_and_backward(model)
    # Near-uniform predictions at random init: cross-entropy close to ln(vocab) (7.62 for 2048).
    assert abs(loss - math.log(VOCAB)) < 0.5, loss
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_tied_embeddings_stay_tied():
    config = _config(tie_word_embeddings=True)
    model = build_on_meta(config, torch.float32, "sdpa")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # transformers ties already on meta
    materialise(model, "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.lm_head.weight.is_meta
    # One tensor, counted once: the untied model has one more vocab x hidden matrix.
    n_unique = sum(p.numel() for p in model.parameters())
    assert n_unique == sum(p.numel() for p in _reference(_config()).parameters()) - VOCAB * config.hidden_size
    _loss_and_backward(model)
    assert model.model.embed_tokens.weight.grad is not None


def test_materialise_module_touches_only_its_own_tensors():
    """The FSDP1 contract: called once per module, children are materialised by their own call."""
    model = build_on_meta(_config(), torch.float32, "sdpa")
    layer = model.model.layers[0]
    materialise_module(layer, "cpu", model)  # a decoder layer owns no tensors itself
    assert all(t.is_meta for _, t in _tensors(layer))

    q = layer.self_attn.q_proj
    materialise_module(q, torch.device("cpu"), model)
    assert not q.weight.is_meta and abs(q.weight.std().item() - 0.02) < 0.003
    assert layer.self_attn.k_proj.weight.is_meta

    # A second call must not re-draw values that are already real (e.g. a tied weight seen twice).
    before = q.weight.clone()
    materialise_module(q, "cpu", model)
    assert torch.equal(q.weight, before)


# --- two processes over gloo --------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_worker(rank: int, world: int, port: int, flavour: str, tie: bool, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        config = _config(tie_word_embeddings=tie)
        torch.manual_seed(0)  # FSDP1 builds each unit in full on every rank: the ranks must draw alike
        model = build_on_meta(config, torch.float32, "sdpa")
        full_numel = sum(p.numel() for p in model.parameters())  # tied weight counted once
        n_modules = len(list(model.modules()))  # before FSDP1 inserts its wrapper modules
        layer_cls = type(model.model.layers[0])
        report = {"full_numel": full_numel}
        if flavour == "fsdp2":
            from torch.distributed.fsdp import fully_shard
            from torch.distributed.tensor import DTensor

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            assert all(p.is_meta for p in model.parameters())  # sharding happened on meta
            materialise(model, "cpu")
            q = model.model.layers[0].self_attn.q_proj.weight
            assert isinstance(q, DTensor)
            report["q_local"], report["q_full"] = q.to_local().numel(), q.numel()
            report["local_numel"] = sum(p.to_local().numel() for p in model.parameters())
            report["norm_ones"] = bool((model.model.norm.weight.to_local() == 1).all())
            report["tied"] = model.lm_head.weight is model.model.embed_tokens.weight
            wrapped = model
        else:
            from torch.distributed.fsdp import FullyShardedDataParallel
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            calls = []

            def param_init_fn(module):
                calls.append(module)
                materialise_module(module, torch.device("cpu"), model)

            wrapped = FullyShardedDataParallel(
                model, param_init_fn=param_init_fn, device_id=torch.device("cpu"),
                auto_wrap_policy=ModuleWrapPolicy({layer_cls}), use_orig_params=True)
            # torch calls param_init_fn on every module once, not once per wrapped root.
            report["init_calls"] = len(calls)
            report["init_calls_unique"] = len({id(m) for m in calls})
            report["n_modules"] = n_modules
            report["local_numel"] = sum(p.numel() for p in wrapped.parameters())
            report["norm_ones"] = bool((model.model.norm.weight == 1).all())
            report["tied"] = model.lm_head.weight is model.model.embed_tokens.weight
        report["no_meta"] = not any(t.is_meta for _, t in _tensors(wrapped))
        report["inv_freq"] = model.model.rotary_emb.inv_freq.tolist()

        optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
        report["loss"] = _loss_and_backward(wrapped)
        optimizer.step()
        optimizer.zero_grad()
        report["loss_after_step"] = _loss_and_backward(wrapped)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(report, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.launch_aside
@pytest.mark.timeout(120)
# About 10 s each on 2 cores. FSDP1 runs only tied: its BFS reaches lm_head before embed_tokens, the
# case where replacing (rather than swapping) the parameter would split the tie.
@pytest.mark.parametrize(("flavour", "tie"), [("fsdp2", False), ("fsdp2", True), ("fsdp1", True)],
                         ids=["fsdp2-untied", "fsdp2-tied", "fsdp1-tied"])
def test_sharded_materialise_on_gloo(flavour, tie, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sharded_worker, args=(2, _free_port(), flavour, tie, str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    ref_inv_freq = _reference(_config()).model.rotary_emb.inv_freq.tolist()
    for rep in reports:
        assert rep["no_meta"] and rep["norm_ones"]
        assert rep["tied"] is tie
        assert rep["inv_freq"] == ref_inv_freq
        assert abs(rep["loss"] - math.log(VOCAB)) < 0.5, rep["loss"]
        assert math.isfinite(rep["loss_after_step"]) and rep["loss_after_step"] < rep["loss"]
        # Each rank holds about half of the (deduplicated) parameters, never the whole model.
        assert 0.3 * rep["full_numel"] < rep["local_numel"] < 0.7 * rep["full_numel"], rep
    assert sum(rep["local_numel"] for rep in reports) == reports[0]["full_numel"]
    if flavour == "fsdp2":
        # Per-parameter sharding: each rank keeps half of every weight.
        assert all(rep["q_local"] * 2 == rep["q_full"] for rep in reports)
    else:
        assert all(rep["init_calls"] == rep["init_calls_unique"] == rep["n_modules"] for rep in reports)
    # Same data, same (synchronised) weights: every rank sees the same loss.
    assert reports[0]["loss"] == pytest.approx(reports[1]["loss"], rel=1e-5)


def test_works_under_accelerate_tied_weights_wrapper():
    """accelerate's FSDP1 path wraps param_init_fn in ensure_weights_retied, which uses its return value."""
    from accelerate.utils.fsdp_utils import ensure_weights_retied

    model = build_on_meta(_config(tie_word_embeddings=True), torch.float32, "sdpa")
    init_fn = ensure_weights_retied(
        functools.partial(materialise_module, device=torch.device("cpu"), model=model), model, torch.device("cpu"))
    # Breadth-first like FSDP1's _get_modules_to_materialize: lm_head comes before model.embed_tokens.
    queue = [model]
    while queue:
        module = queue.pop(0)
        init_fn(module)
        queue.extend(module.children())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(t.is_meta for _, t in _tensors(model))


def test_fsdp1_style_partial_matches_signature():
    """functools.partial(materialise_module, device=..., model=...) is the one-argument param_init_fn."""
    model = build_on_meta(_config(), torch.float32, "sdpa")
    init_fn = functools.partial(materialise_module, device=torch.device("cpu"), model=model)
    for module in model.modules():
        init_fn(module)
    assert not any(t.is_meta for _, t in _tensors(model))
    assert torch.isfinite(model.model.rotary_emb.inv_freq).all()


def _lora_on_meta(**config_overrides):
    from peft import LoraConfig, get_peft_model

    model = build_on_meta(_config(), torch.float32, "sdpa")
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **config_overrides))


def test_lora_adapters_materialise_with_peft_init():
    """B zero and A kaiming-uniform (peft's init_lora_weights=True), the base as Hugging Face inits it."""
    from bench.worker.meta_init import mark_lora_init

    model = _lora_on_meta(target_modules="all-linear")
    mark_lora_init(model)
    materialise(model, "cpu")
    named = dict(model.named_parameters())
    lora_a = [t for n, t in named.items() if "lora_A" in n]
    lora_b = [t for n, t in named.items() if "lora_B" in n]
    assert lora_a and len(lora_a) == len(lora_b)
    assert all(torch.count_nonzero(t) == 0 for t in lora_b)
    for t in lora_a:  # kaiming_uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
        bound = 1 / math.sqrt(t.shape[1])
        assert 0.5 * bound < float(t.abs().max()) <= bound
    base = named["base_model.model.model.layers.0.mlp.up_proj.base_layer.weight"]
    assert abs(float(base.std()) - _config().initializer_range) < 0.2 * _config().initializer_range


@pytest.mark.parametrize("overrides", [{"target_modules": ["q_proj", "embed_tokens"]},
                                       {"target_modules": "all-linear", "init_lora_weights": "gaussian"}],
                         ids=["embedding-target", "gaussian-init"])
def test_lora_that_meta_cannot_reproduce_is_refused(overrides):
    from bench.worker.meta_init import mark_lora_init

    with pytest.raises(NotImplementedError):
        mark_lora_init(_lora_on_meta(**overrides))


# ---------------------------------------------------------------- which cells the worker builds on meta

@pytest.mark.parametrize("settings,built_on_meta", [
    ({"strategy": "fsdp_full_shard"}, True),
    ({"strategy": "fsdp_shard_grad_op"}, True),
    ({"strategy": "fsdp2"}, True),
    ({"strategy": "fsdp2_no_reshard"}, True),
    ({"strategy": "fsdp_full_shard", "device": "cpu"}, False),  # accelerate's FSDP is CUDA-only
    ({"strategy": "fsdp_full_shard_offload"}, False),
    ({"strategy": "fsdp_full_shard", "adapter": {"type": "lora"}}, True),  # all-linear: peft's init on meta
    ({"strategy": "fsdp2", "adapter": {"type": "lora", "target": ["q_proj", "v_proj"]}}, True),
    ({"strategy": "fsdp_full_shard", "adapter": {"type": "qlora"}}, False),
    ({"strategy": "zero3"}, False),  # zero.Init partitions at construction
    ({"strategy": "ddp"}, False),
    ({"strategy": "configs/accelerate_fsdp.yaml"}, False),  # a user's own config runs as written
])
def test_fsdp_cells_without_quantised_adapters_build_on_meta(settings, built_on_meta):
    from bench import strategies
    from bench.spec import CellSettings
    from bench.strategies.build import builds_on_meta

    cell = CellSettings(**{"device": "cuda", "gpus": 2, **settings})
    assert builds_on_meta(cell, strategies.get(cell.strategy)) is built_on_meta


# ---------------------------------------------------------------- the worker's path through accelerate

def _accelerate_worker(rank: int, world: int, port: int, version: int, precision: str, out_dir: str,
                       adapter: str = "none") -> None:
    import os

    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from bench import strategies
    from bench.worker import train as worker
    from bench.worker.prepare import preparer_for
    from bench.spec import CellSettings

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if precision == "bf16" else "no")
    # accelerate turns FSDP on only for CUDA-like devices; everything below this switch is its real code
    # (prepare, the FSDP1 param_init_fn plumbing, FSDP2's fully_shard and optimizer re-mapping).
    plugin = {1: dict(sharding_strategy="FULL_SHARD", use_orig_params=True, sync_module_states=False),
              2: dict(reshard_after_forward=True)}[version]
    fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=version, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"], cpu_ram_efficient_loading=False, **plugin)
    if precision == "bf16":
        fsdp_plugin.set_mixed_precision("bf16")  # what accelerate does when it sets FSDP up itself
    accelerator.state.fsdp_plugin = fsdp_plugin
    # Both state objects: parts of prepare read accelerate's PartialState rather than AcceleratorState.
    for state in (accelerator.state, PartialState()):
        state.distributed_type = DistributedType.FSDP
        state.device = torch.device("cpu")  # FSDP1 on CPU wants an index-free device_id
    device = accelerator.device
    cell = CellSettings(strategy={1: "fsdp_full_shard", 2: "fsdp2"}[version], gpus=world, device="cpu",
                        train={"precision": precision, "seq_len": 32, "micro_batch": 2, "lr": 1e-3},
                        adapter=LORA if adapter == "lora" else {"type": "none"})
    torch.manual_seed(0)
    model = worker.build_model(cell, device, on_meta=True)
    preparer = preparer_for(strategies.get(cell.strategy))
    preparer.before_prepare(cell, model, accelerator)  # as worker.run does: FSDP1's adapters in units apart
    full_numel = sum(p.numel() for p in model.parameters())
    model, optimizer = preparer.prepare(cell, model, accelerator, device, on_meta=True)
    params = [p for p in model.parameters() if p.requires_grad]
    in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]

    def local(p):
        return p.to_local() if hasattr(p, "to_local") else p

    before = [local(p).detach().clone() for p in params]  # FSDP1 views: a rank may hold none of a tensor
    batches = worker.make_batches(cell, worker.model_vocab(model), rank, device)
    losses = [worker.train_step(cell, model, optimizer, accelerator, batches, device, preparer)["loss"] for _ in range(2)]
    report = {
        "full_numel": full_numel, "local_numel": sum(local(p).numel() for p in model.parameters()),
        "meta_left": [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta],
        "optimizer_holds_model_params": len(in_optimizer) == len(params)
                                       and {id(p) for p in in_optimizer} == {id(p) for p in params},
        "updated": sum(not torch.equal(b, local(p).detach()) for b, p in zip(before, params)),
        "tensors": len(params), "losses": losses,
    }
    # peft's init as materialised, before the steps: B zero (the adapted model starts as the base one), A not.
    initial = dict(zip([n for n, p in model.named_parameters() if p.requires_grad], before))
    for part in ("lora_A", "lora_B"):
        shards = [t for n, t in initial.items() if part in n and t.numel()]  # this rank's non-empty shards
        report[f"{part}_tensors"] = len(shards)
        report[f"{part}_max"] = max((float(t.abs().max()) for t in shards), default=None)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(report, f)


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("version", "precision", "adapter"),
                         [(1, "bf16", "none"), (2, "bf16", "none"), (1, "fp32", "none"), (1, "bf16", "lora"),
                          (2, "bf16", "lora")],
                         ids=["fsdp1-bf16", "fsdp2-bf16", "fsdp1-fp32", "fsdp1-bf16-lora", "fsdp2-bf16-lora"])
@pytest.mark.launch_aside
def test_worker_meta_path_through_accelerate(version, precision, adapter, tmp_path):
    """bench.worker's build_model(on_meta) + the FSDP preparer's prepare under accelerate's own FSDP prepare, 2 ranks;
    with LoRA, the adapters start as peft starts them (B zero) and are what trains."""
    import torch.multiprocessing as mp

    mp.spawn(_accelerate_worker, args=(2, _free_port(), version, precision, str(tmp_path), adapter), nprocs=2,
             join=True)
    for rank in range(2):
        rep = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert rep["meta_left"] == []
        assert 0.3 * rep["full_numel"] < rep["local_numel"] < 0.7 * rep["full_numel"], rep
        assert rep["optimizer_holds_model_params"]  # not the collapsed data_ptr() mapping of meta tensors
        assert rep["updated"] >= rep["tensors"] // 3, rep  # the optimizer steps reached the materialised shards
        assert all(abs(loss - math.log(VOCAB)) < 1.0 for loss in rep["losses"]), rep["losses"]
        if adapter == "lora":
            assert rep["lora_A_tensors"] > 0 and rep["lora_B_tensors"] > 0, rep
            assert rep["lora_B_max"] == 0.0 and rep["lora_A_max"] > 0, rep
        else:
            assert rep["lora_A_tensors"] == rep["lora_B_tensors"] == 0


# ---------------------------------------------------------------- GPU records (committed) against the prediction
GPU_RECORD_FILES = ["results/meta-init-h100/fsdp_full_shard/runs.jsonl", "results/meta-init-h100/fsdp2/runs.jsonl",
                    "results/llama-full-h100x4/runs.jsonl", "results/llama-full-h100x4-1b-rerun/runs.jsonl",
                    *(f"results/meta-init-h200/{name}/runs.jsonl"
                      for name in ("fsdp_full_shard", "fsdp2", "fsdp_full_shard-lora", "fsdp2-lora")),
                    "results/llama8b-meta-h200/runs.jsonl", "results/llama8b-meta-h200-b/runs.jsonl"]


def _meta_built_records():
    
    repo = REPO
    for name in GPU_RECORD_FILES:
        for line in (repo / name).read_text().splitlines():
            record = json.loads(line)
            if record["status"] == "ok" and record["ranks"][0].get("model_init", "").startswith("meta"):
                yield name, record


def test_gpu_build_peaks_of_meta_models_match_the_fsdp_sharding_prediction():
    """H100 and H200 records (Llama-3.2-1B/3B full fine-tune: FSDP1 x3 kinds, NO_SHARD and FSDP2 at 2 and 4
    ranks; Llama-3.2-1B and Llama-3.1-8B LoRA under FSDP1/FSDP2): the peak that building and sharding
    reached is the prediction of bench.worker.prepare.build_peak_bytes, and under every sharding strategy it
    stays below the whole model, which an on-device build would hold at least."""
    from bench.spec import CellSettings
    from bench.worker.meta_init import parameter_bytes
    from bench.worker.prepare import build_peak_bytes
    from bench.worker.train import build_model

    sizes = {}
    checked = set()
    for name, record in _meta_built_records():
        s = record["settings"]
        # The model as the worker built it (its precision policy's dtypes, the adapter), on meta.
        key = json.dumps({k: s[k] for k in ("model", "adapter", "train")}, sort_keys=True)
        if key not in sizes:
            sizes[key] = parameter_bytes(build_model(CellSettings(**s), torch.device("cpu"), on_meta=True))
        total, root = sizes[key]
        want = build_peak_bytes(s["strategy"], s["gpus"], total, root)
        for rank in record["ranks"]:
            got = rank["peak_allocated_after_prepare_bytes"]
            assert abs(got - want) < 0.005 * want, (name, s["model"], s["strategy"], s["gpus"], got, want)
            if s["strategy"] != "fsdp_no_shard" and s["gpus"] > 1:  # one rank: FSDP1 runs NO_SHARD
                assert got < 0.95 * total, (name, s["strategy"], got)
        checked.add((s["model"], s["adapter"]["type"], s["strategy"], s["gpus"]))
    # the files hold what this test claims to cover
    assert {st for _, _, st, _ in checked} >= {"fsdp_full_shard", "fsdp_shard_grad_op", "fsdp_hybrid_shard",
                                               "fsdp_no_shard", "fsdp2", "fsdp2_no_reshard"}
    assert {(m, g) for m, _, _, g in checked} >= {("llama-3.2-1b", 2), ("llama-3.2-1b", 4), ("llama-3.2-3b", 2),
                                                  ("llama-3.2-3b", 4)}
    assert {(m, st) for m, a, st, _ in checked if a == "lora"} >= {
        ("llama-3.2-1b", "fsdp_full_shard"), ("llama-3.2-1b", "fsdp2"), ("llama-3.1-8b", "fsdp_full_shard")}
