"""Matrix schema errors and grid expansion (unit tests, nothing launched)."""

from __future__ import annotations

import pytest

from bench.spec import CellSettings, MatrixError, expand, load_matrix, select
from bench.strategies import validate_cells
from conftest import write_matrix


def _load(tmp_path, **fields):
    return load_matrix(write_matrix(tmp_path, "m", **fields))


def test_unknown_key_names_key_and_fix(tmp_path):
    with pytest.raises(MatrixError) as e:
        _load(tmp_path, train={"seq_lenn": 128})
    msg = str(e.value)
    assert "m.yaml" in msg and "train.seq_lenn" in msg and "allowed keys here" in msg and "seq_len" in msg


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(MatrixError) as e:
        _load(tmp_path, train={"micro_batch": "four"})
    assert "train.micro_batch" in str(e.value) and "Fix:" in str(e.value)


@pytest.mark.parametrize("fields, key, fix", [
    ({"cp": 1.5}, "  cp: ", "Fix: give a whole number, e.g. cp: 1"),
    ({"grid": {"tp": []}}, "  grid.tp: an empty list", "Fix: give at least one value, or remove grid.tp to keep tp at 1"),
    ({"grid": {"seq_len": []}}, "  grid.seq_len: ", "remove grid.seq_len to keep seq_len at 64"),
    ({"train": None}, "  train: ", "Fix: give its keys as a mapping, e.g. train: {seq_len: 512, micro_batch: 1}"),
    ({"adapter": {"target": "attn"}}, "  adapter.target: 'attn' names no module set", "Fix: use 'all-linear'"),
])
def test_each_error_names_its_key_and_a_fix_that_adds_to_it(tmp_path, fields, key, fix):
    with pytest.raises(MatrixError) as e:
        _load(tmp_path, **fields)
    msg = str(e.value)
    assert key in msg and fix in msg, msg
    assert "(top level)" not in msg and "Fix: Value error" not in msg and "Fix: Input should" not in msg
    assert msg.count("Fix:") == 1


@pytest.mark.parametrize("text, said", [("", "the file is empty. Fix: write a matrix in it"),
                                        ("- ddp\n", "not a list. Fix: write `key: value` lines")])
def test_a_file_without_a_mapping_is_told_how_to_start(tmp_path, text, said):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(MatrixError, match=said):
        load_matrix(path)


def test_bad_literal_lists_choices(tmp_path):
    with pytest.raises(MatrixError) as e:
        _load(tmp_path, train={"precision": "bf8"})
    assert "train.precision" in str(e.value) and "'bf16'" in str(e.value)


def test_unknown_grid_axis(tmp_path):
    with pytest.raises(MatrixError) as e:
        _load(tmp_path, grid={"strat": ["ddp"]})
    assert "grid.strat" in str(e.value) and "strategy" in str(e.value)


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ngrid: [unclosed\n")
    with pytest.raises(MatrixError, match="malformed YAML"):
        load_matrix(path)


def test_grid_product_and_short_keys(tmp_path):
    m = _load(tmp_path, grid={"strategy": ["ddp", "zero2"], "gpus": [1, 2], "seq_len": [32, 64]})
    cells = expand(m, device="cpu")
    assert len(cells) == 8
    assert {c.train.seq_len for c in cells} == {32, 64}
    assert len({c.cell_id for c in cells}) == 8


def test_adapter_axis_of_whole_sections(tmp_path):
    m = _load(tmp_path, grid={"adapter": [{"type": "none"}, {"type": "lora", "r": 8}]})
    cells = expand(m, device="cpu")
    assert [(c.adapter.type, c.adapter.r) for c in cells] == [("none", 16), ("lora", 8)]


def test_exclude_and_include(tmp_path):
    m = _load(tmp_path, grid={"strategy": ["ddp", "zero3"], "gpus": [1, 2]},
              exclude=[{"strategy": "zero3", "gpus": 1}], include=[{"strategy": "zero2", "gpus": 2}])
    labels = sorted((c.strategy, c.gpus) for c in expand(m, device="cpu"))
    assert labels == [("ddp", 1), ("ddp", 2), ("zero2", 2), ("zero3", 2)]


def test_cell_id_is_stable_and_setting_sensitive():
    a = CellSettings(model="tiny-llama", strategy="ddp", gpus=2)
    assert a.cell_id == CellSettings(model="tiny-llama", strategy="ddp", gpus=2).cell_id
    assert a.cell_id != CellSettings(model="tiny-llama", strategy="ddp", gpus=1).cell_id
    assert len(a.cell_id) == 12


def test_impossible_combinations_are_refused(tmp_path):
    m = _load(tmp_path, grid={"strategy": ["fsdp_full_shard", "single"], "gpus": [2]})
    with pytest.raises(MatrixError) as e:
        validate_cells(expand(m, device="cpu"), "m.yaml", visible_gpus=0)
    msg = str(e.value)
    assert "needs GPUs" in msg and "'single' runs one process" in msg


def test_unknown_model_and_strategy(tmp_path):
    m = _load(tmp_path, model="llama-9000", strategy="zero7")
    with pytest.raises(MatrixError) as e:
        validate_cells(expand(m, device="cpu"), "m.yaml", visible_gpus=0)
    assert "unknown model 'llama-9000'" in str(e.value)


def test_more_gpus_than_machine(tmp_path):
    m = _load(tmp_path, device="cuda", gpus=4)
    with pytest.raises(MatrixError, match="--only gpus"):
        validate_cells(expand(m), "m.yaml", visible_gpus=2)


def test_select_only_and_exclude(tmp_path):
    m = _load(tmp_path, grid={"strategy": ["ddp", "zero2", "zero3"], "gpus": [1, 2]})
    cells = expand(m, device="cpu")
    assert {(c.strategy, c.gpus) for c in select(cells, ["strategy=ddp,zero3", "gpus=2"], [])} == {("ddp", 2), ("zero3", 2)}
    assert len(select(cells, [], ["strategy=zero2"])) == 4
    with pytest.raises(MatrixError, match="not a setting"):
        select(cells, ["colour=red"], [])


def test_labels_tell_fast_path_variants_apart(tmp_path):
    m = _load(tmp_path, model="llama-3.2-1b", device="cuda", gpus=1,
              grid={"train.kernels": ["none", "liger"], "train.micro_batch": [4, "auto"]})
    labels = [c.label for c in expand(m)]
    assert len(set(labels)) == 4, labels  # progress lines and tables no longer show four look-alikes
    assert labels[0] == "llama-3.2-1b full ddp x1gpu"  # the plain step's label is the one records always had
    assert {lab.removeprefix(labels[0]) for lab in labels} == {"", " mb-auto", " liger", " liger mb-auto"}
