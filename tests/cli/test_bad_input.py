"""Bad input is refused before any launch: a clear error naming the cause and the fix, exit code 2."""

from __future__ import annotations

import json

import pytest

from conftest import bench, write_matrix

from bench.records import SCHEMA_VERSION


def assert_refused(tmp_path, matrix, *words, results=None, extra=()):
    results = results or tmp_path / "results"
    proc = bench("run", str(matrix), "--results", str(results), *extra)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, f"{word!r} not in:\n{err}"
    assert not list(tmp_path.rglob("launch.log")), "nothing may be launched"
    return err


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ngrid: {strategy: [ddp, zero1\n")
    assert_refused(tmp_path, path, "malformed YAML", "line", "Fix:")


def test_missing_matrix_file(tmp_path):
    assert_refused(tmp_path, tmp_path / "nope.yaml", "no such matrix file", "Fix:")


def test_unknown_model_name(tmp_path):
    assert_refused(tmp_path, write_matrix(tmp_path, model="llama-9000"), "unknown model 'llama-9000'", "tiny-llama")


def test_unknown_strategy(tmp_path):
    assert_refused(tmp_path, write_matrix(tmp_path, grid={"strategy": ["ddp", "zero9"]}), "zero9")


def test_unknown_key_is_named_with_the_allowed_ones(tmp_path):
    assert_refused(tmp_path, write_matrix(tmp_path, train={"seqlen": 64}), "train.seqlen", "seq_len", "Fix:")


def test_timing_key_misspelt_or_caps_out_of_order(tmp_path):
    assert_refused(tmp_path, write_matrix(tmp_path, train={"timing": {"max_step": 10}}),
                   "train.timing.max_step", "max_steps", "max_timed_s", "Fix:")
    assert_refused(tmp_path, write_matrix(tmp_path, train={"steps": 30, "timing": {"max_steps": 10}}),
                   "train.timing.max_steps (10) is below train.steps (30)", "Fix:")


def test_timeout_too_short_for_start_up_and_timed_cap(tmp_path):
    matrix = write_matrix(tmp_path, train={"timing": {"max_timed_s": 100}}, limits={"timeout_s": 200, "startup_s": 150})
    assert_refused(tmp_path, matrix, "limits.timeout_s (200 s)", "limits.startup_s (150 s)",
                   "train.timing.max_timed_s (100 s", "at least 250")


def test_impossible_combination(tmp_path):
    # A matrix whose only cell cannot run here: nothing would be measured, so it is refused (a matrix with
    # runnable cells records the impossible ones as unsupported: tests/strategies/test_unsupported_cells.py).
    matrix = write_matrix(tmp_path, adapter={"type": "qlora"})  # bitsandbytes 4-bit on a CPU cell
    assert_refused(tmp_path, matrix, "none of the 1 cell(s) can run", "qlora", "Fix:")


def test_impossible_combination_strict(tmp_path):
    # --strict keeps the refuse-all: one impossible cell beside a runnable one stops the matrix, every reason said
    matrix = write_matrix(tmp_path, grid={"strategy": ["ddp", "fsdp_full_shard"], "precision": ["fp32", "fp16"]})
    assert_refused(tmp_path, matrix, "3 cell(s) cannot run", "needs GPUs", "fp16 is not supported on CPU",
                   "Fix:", extra=("--strict",))


def test_bad_selector(tmp_path):
    assert_refused(tmp_path, write_matrix(tmp_path), "selector", extra=("--only", "strategy"))


def test_results_folder_under_a_regular_file(tmp_path):
    # As root, permission bits stop no write: a parent that is a file is a folder no one can make.
    (tmp_path / "afile").write_text("x")
    assert_refused(tmp_path, write_matrix(tmp_path), "which is a file", "--results",
                   results=tmp_path / "afile" / "results")


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, SCHEMA_VERSION + 10])
def test_results_file_from_a_newer_schema(tmp_path, version):
    results = tmp_path / "results"
    results.mkdir()
    line = {"schema_version": version, "matrix": "t", "cell_id": "x", "status": "ok"}
    (results / "runs.jsonl").write_text(json.dumps(line) + "\n")
    assert_refused(tmp_path, write_matrix(tmp_path), "newer bench", f"schema {version}", "upgrade bench",
                   results=results)
    assert (results / "runs.jsonl").read_text() == json.dumps(line) + "\n"  # left as it was


def test_empty_matrix_file_is_told_how_to_start(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert_refused(tmp_path, path, "the file is empty", "Fix:", "matrices/smoke.yaml")


def test_binary_matrix_file_is_refused_not_a_traceback(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary")
    assert_refused(tmp_path, path, "not a text file", "Fix:")


@pytest.mark.parametrize("train, words", [
    ({"learning_rate": 1e-4}, ["train.learning_rate", "did you mean 'lr'"]),
    ({"seqlen": 64}, ["did you mean 'seq_len'"]),
    ({"gradient_accumulation_steps": 2}, ["did you mean 'grad_accum'"]),
])
def test_a_misspelt_or_habitual_key_is_answered_with_the_right_one(tmp_path, train, words):
    assert_refused(tmp_path, write_matrix(tmp_path, train=train), *words)


def test_fixes_add_information_not_repeat_the_error(tmp_path):
    err = assert_refused(tmp_path, write_matrix(tmp_path, gpus=0), "gpus", "Fix: give a value > 0")
    assert "e.g. gpus: 1" in err
    err = assert_refused(tmp_path, write_matrix(tmp_path, train={"seq_len": "long"}), "train.seq_len")
    assert "e.g. seq_len: 512" in err
