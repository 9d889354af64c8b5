"""The corpus: public fine-tuning projects' own DeepSpeed JSONs and accelerate YAMLs (tests/fixtures/corpus,
sources in its SOURCES.md), each run, planned or refused on CPU as its project would have it.

Every DeepSpeed config that can run on CPU is resolved and planned for 2 CPU processes; one `bench run` of a
generated matrix (module-scoped, tiny model, 1 warm-up and 1 timed step) launches a representative set of them
(RUN_ON_CPU, each a different path through DeepSpeed and accelerate; BENCH_CORPUS_ALL=1 launches all) and
records the CPU refusals as `unsupported`. The FSDP and DDP YAMLs are validated and planned for 2 GPUs, as
matrices/corpus-gpu.yaml runs them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TESTS, bench

from bench.launch.plan import build_plan
from bench.spec import CellSettings, Limits, MatrixError, expand, load_matrix
from bench.strategies import cell_problems
from bench.strategies.user_configs import describe_user_config, load_user_config, resolve_with_originals

CORPUS = TESTS / "fixtures" / "corpus"
FILES = sorted(str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*") if p.suffix in (".json", ".yaml"))

# What a cell must give where the file fixes a value (explicit values must match the cell, as the Trainer
# requires); every other file is "auto" and runs fp32 on CPU. transformers/ds_config_zero3.json is "auto" but
# runs bf16 here: it has no bf16 block, which accelerate adds for bf16 (see test_missing_bf16_block_is_added).
SETTINGS: dict[str, dict] = {
    "axolotl/zero3_bf16.json": {"precision": "bf16"},
    "axolotl/zero3_bf16_cpuoffload_all.json": {"precision": "bf16"},
    "llava/zero3_offload.json": {"precision": "bf16"},
    "transformers/ds_config_zero3.json": {"precision": "bf16"},
    "transformers/ds_config_zero3_explicit.json": {"precision": "fp16", "lr": 3e-5, "weight_decay": 3e-7},
    "trl/deepspeed_zero1.yaml": {"precision": "bf16"},
    "trl/deepspeed_zero3.yaml": {"precision": "fp16"},
    "alignment-handbook/deepspeed_zero3.yaml": {"precision": "bf16"},
    "llamafactory/fsdp_config.yaml": {"precision": "fp16"},
    "llamafactory/fsdp_v2_config.yaml": {"precision": "bf16"},
    "trl/fsdp2.yaml": {"precision": "bf16"},
    "trl/fsdp_qlora.yaml": {"precision": "bf16"},
    "alignment-handbook/fsdp.yaml": {"precision": "bf16"},
}

# Why a file cannot run on CPU, in the words bench says it: each phrase must appear in the refusal.
FSDP_ON_CPU = "needs GPUs (accelerate enables FSDP only on CUDA)"
FP16_ON_CPU = "train.precision fp16 is not supported on CPU. Fix: use bf16 or fp32"
REFUSED_ON_CPU: dict[str, list[str]] = {
    "llamafactory/fsdp_config.yaml": [FSDP_ON_CPU, FP16_ON_CPU],
    "llamafactory/fsdp_v2_config.yaml": [FSDP_ON_CPU],
    "trl/fsdp2.yaml": [FSDP_ON_CPU],
    "trl/fsdp_qlora.yaml": [FSDP_ON_CPU],
    "alignment-handbook/fsdp.yaml": [FSDP_ON_CPU],
    "trl/deepspeed_zero3.yaml": [FP16_ON_CPU],
    # Refused on any machine: DeepSpeed would stop at start-up on either.
    "transformers/ds_config_zero3_explicit.json": [
        "gives neither train_micro_batch_size_per_gpu nor train_batch_size, and DeepSpeed needs one",
        "Fix: add \"train_micro_batch_size_per_gpu\": \"auto\"",
        "zero_optimization.reduce_bucket_size is 0, which DeepSpeed refuses (Input should be greater than 0)",
        FP16_ON_CPU],
}
REFUSED_EVERYWHERE = {"transformers/ds_config_zero3_explicit.json"}

# Launched on CPU by default: one file per path through DeepSpeed and accelerate (ZeRO-0; ZeRO-2 with
# optimizer offload and no optimizer block, where accelerate swaps the torch AdamW for DeepSpeedCPUAdam; JSON
# optimizer + scheduler blocks with full ZeRO-3 offload and an added bf16 block; ZeRO-3 in bf16 with
# zero_force_ds_cpu_optimizer false and mixed key spellings; accelerate's inline ZeRO-1 plugin), four projects.
# A plain ZeRO-2 file (llava/zero2.json) and a plain ZeRO-3 one (axolotl/zero3_bf16.json) take paths these
# already take (ZeRO-1/2's optimizer with and without offload; ZeRO-3 in bf16, and the catalogue's zero3 in the
# session's cpu_results): they plan here with the rest, and BENCH_CORPUS_ALL=1 launches all of them
# (all 18 ran ok on this 2-core machine: 286 s with DeepSpeed's compiled ops cached, against 79 s for 7).
RUN_ON_CPU = [
    "llamafactory/ds_z0_config.json",
    "llamafactory/ds_z2_offload_config.json",
    "transformers/ds_config_zero3.json",
    "axolotl/zero3_bf16_cpuoffload_all.json",
    "trl/deepspeed_zero1.yaml",
]


def _path(name: str) -> str:
    return str(CORPUS / name)


def _is_deepspeed(name: str) -> bool:
    return describe_user_config(_path(name)).family == "deepspeed"


DEEPSPEED = [n for n in FILES if _is_deepspeed(n)]
RUNNABLE_DS = [n for n in DEEPSPEED if n not in REFUSED_ON_CPU]
OTHER_YAMLS = [n for n in FILES if n not in DEEPSPEED]
LAUNCHED = RUNNABLE_DS if os.environ.get("BENCH_CORPUS_ALL") == "1" else RUN_ON_CPU

TINY_TRAIN = {"seq_len": 32, "micro_batch": 1, "precision": "fp32", "warmup_steps": 1, "steps": 1,
              "timing": {"max_steps": 1, "max_timed_s": 10}}


def _cell(name: str, device: str = "cpu", **train) -> CellSettings:
    settings = {**TINY_TRAIN, **SETTINGS.get(name, {}), **train}
    return CellSettings(model="tiny-llama", strategy=_path(name), gpus=2, device=device, train=settings)


def _file_ds(name: str) -> dict:
    """The DeepSpeed config a file gives (a JSON, or the JSON an accelerate YAML points to / builds inline)."""
    _, ds, _, _ = resolve_with_originals(_cell(name), Path("cell"))
    return ds


# ---------------------------------------------------------------- the corpus itself

def test_corpus_holds_at_least_15_configs_from_4_projects_each_with_its_source():
    projects = {n.split("/")[0] for n in FILES}
    assert len(FILES) >= 15 and len(projects) >= 4, (FILES, projects)
    sources = (CORPUS / "SOURCES.md").read_text()
    for name in FILES:
        assert f"| `{name}` |" in sources, f"{name} has no row in SOURCES.md"
        if name.endswith(".yaml"):
            assert (CORPUS / name).read_text().startswith("# Source: "), name
    assert set(REFUSED_ON_CPU) | set(RUNNABLE_DS) | set(OTHER_YAMLS) == set(FILES)
    assert set(RUN_ON_CPU) <= set(RUNNABLE_DS)


# ---------------------------------------------------------------- one batch of real CPU launches

@pytest.fixture(scope="module")
def corpus_records(tmp_path_factory) -> dict[str, dict]:
    """One `bench run` of every launched DeepSpeed file plus every CPU refusal, records by fixture name."""
    folder = tmp_path_factory.mktemp("corpus")
    names = LAUNCHED + list(REFUSED_ON_CPU)
    matrix = {
        "name": "corpus", "model": "tiny-llama", "device": "cpu", "gpus": 2, "train": TINY_TRAIN,
        "limits": {"timeout_s": 240, "hang_s": 90, "collective_timeout_s": 30, "startup_s": 200},
        # Files that fix a setting are include cells; an empty grid would add a default (ddp) cell.
        "grid": {"strategy": [_path(n) for n in names if n not in SETTINGS]},
        "include": [{"strategy": _path(n), **SETTINGS[n]} for n in names if n in SETTINGS],
    }
    path = folder / "corpus.yaml"
    path.write_text(yaml.safe_dump(matrix, sort_keys=False))
    start = time.time()
    bench("run", str(path), "--results", str(folder / "results"), check=True, timeout=1200)
    print(f"corpus batch: {len(LAUNCHED)} launches in {time.time() - start:.0f} s")
    by_path = {str(CORPUS / n): n for n in names}
    records = [json.loads(line) for line in (folder / "results" / "runs.jsonl").read_text().splitlines() if line]
    return {by_path[r["settings"]["strategy"]]: r for r in records}


def _expected_optimizer(ds: dict) -> str:
    """The class that steps the weights under DeepSpeed on CPU: a JSON optimizer block is built by DeepSpeed
    (DeepSpeedCPUAdam when offloaded, else FusedAdam, which DeepSpeed compiles for CPU too); without one the
    worker's torch AdamW runs, which accelerate swaps for DeepSpeedCPUAdam under offload unless the file
    sets zero_force_ds_cpu_optimizer false."""
    offload = (ds["zero_optimization"].get("offload_optimizer") or {}).get("device", "none") != "none"
    if "optimizer" in ds:
        return "DeepSpeedCPUAdam" if offload else "FusedAdam"
    return "DeepSpeedCPUAdam" if offload and ds.get("zero_force_ds_cpu_optimizer", True) else "AdamW"


@pytest.mark.slow
@pytest.mark.parametrize("name", LAUNCHED)
def test_deepspeed_config_runs_on_two_cpu_processes(corpus_records, name):
    record = corpus_records[name]
    assert record["status"] == "ok", record.get("error")
    assert [r["world_size"] for r in record["ranks"]] == [2, 2]
    ds = json.loads((Path(record["cell_dir"]) / "deepspeed.json").read_text())
    assert '"auto"' not in json.dumps(ds)
    info = record["strategy_info"]
    stage = ds["zero_optimization"]["stage"]
    assert info["family"] == "deepspeed" and f": ZeRO-{stage}" in info["summary"]
    offloads = (ds["zero_optimization"].get("offload_param") or {}).get("device", "none") != "none"
    assert ("parameters offloaded to the CPU" in info["summary"]) == offloads
    if "optimizer" in ds:  # the JSON's own block ran, and the record names it
        assert info["optimizer"].startswith("DeepSpeed AdamW from the JSON's optimizer block")
    else:
        assert "optimizer" not in info
    if "scheduler" in ds:
        assert info["scheduler"] == f"DeepSpeed {ds['scheduler']['type']} from the JSON's scheduler block"
    assert {r["optimizer_class"] for r in record["ranks"]} == {_expected_optimizer(ds)}
    precision = SETTINGS.get(name, {}).get("precision", "fp32")
    assert ds.get("bf16", {}).get("enabled", False) is (precision == "bf16")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REFUSED_ON_CPU))
def test_cpu_refusal_is_recorded_with_every_reason(corpus_records, name):
    record = corpus_records[name]
    assert record["status"] == "unsupported" and not record["ranks"]
    for phrase in REFUSED_ON_CPU[name]:
        assert phrase in record["error"]["message"], record["error"]["message"]


# ---------------------------------------------------------------- planned without launching

@pytest.mark.parametrize("name", RUNNABLE_DS)
def test_every_runnable_deepspeed_config_plans_for_two_cpu_processes(tmp_path, name):
    cell = _cell(name)
    assert cell_problems(cell, visible_gpus=0) == []
    plan = build_plan(cell, tmp_path, Limits())
    accel = yaml.safe_load(plan.files["accelerate.yaml"])
    ds = json.loads(plan.files["deepspeed.json"])
    assert accel["distributed_type"] == "DEEPSPEED" and accel["num_processes"] == 2
    assert accel["deepspeed_config"]["deepspeed_config_file"] == str(plan.cell_dir / "deepspeed.json")
    assert '"auto"' not in json.dumps(ds)
    assert ds["train_micro_batch_size_per_gpu"] == 1 and ds["train_batch_size"] == 2
    original = load_user_config(_path(name))
    stage = (original.get("zero_optimization") or {}).get("stage",
                                                          (original.get("deepspeed_config") or {}).get("zero_stage"))
    assert ds["zero_optimization"]["stage"] == stage
    assert f"original_{Path(name).name}" in plan.files  # the user's file is kept beside the resolved one


@pytest.mark.parametrize("name", OTHER_YAMLS)
def test_fsdp_and_ddp_yamls_plan_for_two_gpus(tmp_path, name):
    original = load_user_config(_path(name))
    cell = _cell(name, device="cuda")
    assert cell_problems(cell, visible_gpus=None) == []
    plan = build_plan(cell, tmp_path, Limits(), parent_visible_devices=None)
    accel = yaml.safe_load(plan.files["accelerate.yaml"])
    assert accel["distributed_type"] == original["distributed_type"] and accel["num_processes"] == 2
    assert accel["mixed_precision"] == {"fp32": "no"}.get(cell.train.precision, cell.train.precision)
    assert accel.get("fsdp_config") == original.get("fsdp_config")  # FSDP settings pass through untouched
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "0,1" and "deepspeed.json" not in plan.files
    if original.get("num_processes") != 2:  # the cell's process count wins, and the notes say so
        assert f"num_processes {original.get('num_processes')!r} -> 2" in plan.files["resolution_notes.txt"]


def test_ddp_yaml_plans_on_cpu_processes_too(tmp_path):
    plan = build_plan(_cell("trl/multi_gpu.yaml"), tmp_path, Limits())
    accel = yaml.safe_load(plan.files["accelerate.yaml"])
    assert "--multi_gpu" in plan.argv and plan.env["ACCELERATE_USE_CPU"] == "1"
    assert "gpu_ids" not in accel and "use_cpu" not in accel


# ---------------------------------------------------------------- the GPU matrix

def test_gpu_matrix_holds_every_config_that_needs_a_gpu_and_plans_each():
    """matrices/corpus-gpu.yaml: the FSDP YAMLs, the JSON optimizer blocks, the offloading and fp16 files."""
    matrix_path = REPO / "matrices" / "corpus-gpu.yaml"
    cells = expand(load_matrix(matrix_path), source=str(matrix_path), device="cuda")
    in_matrix = {str(Path(c.strategy).relative_to("tests/fixtures/corpus")) for c in cells}

    def needs_gpu(name: str) -> bool:
        if name in OTHER_YAMLS:
            return describe_user_config(_path(name)).family != "ddp"
        ds = _file_ds(name) if name not in REFUSED_ON_CPU else load_user_config(_path(name))
        return (describe_user_config(_path(name)).offloads or "optimizer" in ds
                or SETTINGS.get(name, {}).get("precision") == "fp16")

    assert in_matrix == {n for n in FILES if needs_gpu(n)} - REFUSED_EVERYWHERE
    for cell in cells:
        assert cell.model == "llama-3.2-1b" and cell.gpus == 2 and cell.train.seq_len == 1024
        assert cell_problems(cell, visible_gpus=None) == [], cell.strategy


# ---------------------------------------------------------------- what the corpus found in bench

def test_explicit_betas_eps_and_warmup_are_kept_where_no_matrix_setting_exists(tmp_path):
    """transformers' explicit ZeRO-3 file: betas [0.8, 0.999] and 500 warm-up steps were refused as
    mismatches although no matrix key can set them; they are the user's, kept and noted."""
    ds = load_user_config(_path("transformers/ds_config_zero3_explicit.json"))
    ds["train_micro_batch_size_per_gpu"] = "auto"
    ds["zero_optimization"]["reduce_bucket_size"] = "auto"
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(ds))
    cell = CellSettings(model="tiny-llama", strategy=str(path), gpus=2, device="cuda",
                        train={"precision": "fp16", "lr": 3e-5, "weight_decay": 3e-7})
    assert cell_problems(cell, visible_gpus=None) == []
    _, resolved, notes, _ = resolve_with_originals(cell, tmp_path)
    assert resolved["optimizer"]["params"]["betas"] == [0.8, 0.999]
    assert resolved["scheduler"]["params"]["warmup_num_steps"] == 500
    assert "optimizer.params.betas = [0.8, 0.999] kept as the file gives it (no matrix setting for it)" in notes
    # What a matrix does set must still match: lr is train.lr.
    with pytest.raises(MatrixError, match=r"optimizer.params.lr is 3e-05 in the file but the cell's train.lr"):
        resolve_with_originals(CellSettings(**{**cell.model_dump(), "train": {"precision": "fp16"}}), tmp_path)


def test_missing_bf16_block_is_added_for_a_bf16_cell_as_accelerate_does():
    """transformers' ZeRO-3 file has an fp16 block only: a bf16 cell ran DeepSpeed in fp32 while the record
    said bf16. accelerate's set_mixed_precision adds {"enabled": true} for the Trainer's --bf16; so does bench."""
    _, ds, notes, _ = resolve_with_originals(_cell("transformers/ds_config_zero3.json"), Path("cell"))
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    assert any(n.startswith("bf16 = {'enabled': True} added") for n in notes)
    _, fp32, _, _ = resolve_with_originals(_cell("transformers/ds_config_zero3.json", precision="fp32"), Path("c"))
    assert "bf16" not in fp32  # nothing to add for fp32: DeepSpeed's default is off


def test_a_zero_value_deepspeed_refuses_is_said_before_launch_on_any_machine():
    cell = _cell("transformers/ds_config_zero3_explicit.json", device="cuda")
    reasons = "\n".join(cell_problems(cell, visible_gpus=None))
    for phrase in REFUSED_ON_CPU["transformers/ds_config_zero3_explicit.json"][:3]:
        assert phrase in reasons
    assert FP16_ON_CPU not in reasons
