"""Record fields the report must show: a garbage collection inside the timed window (issue 16), compile time
apart from step time and compilation inside timed steps, the modules Liger replaced, an auto cell's proposal
and trail (issue 21). Records: results/llama8b's ddp launches (H100) re-set as in test_fast_path_table."""

from __future__ import annotations

import pandas as pd
import pytest

from bench.records import append_record
from bench.spec import CellSettings
from bench.report import cautions, document as report, fast_paths, metrics
from test_fast_path_table import cell, launches, templates  # noqa: F401 - the fixture
from test_verdict import build


def with_gc(records, collections: list[int]):
    for r, n in zip(records, collections):
        for rank in r.ranks:
            rank["gc"] = {"policy": "collected+frozen before, disabled inside the timed window",
                          "collections_in_window": n if rank["rank"] == 0 else 0, "frozen_objects": 1000}
    return records


def test_a_collection_inside_the_timed_window_is_a_warning(templates, tmp_path):
    clean = with_gc(launches(templates[1], "none", 4, 1.0, 40.0), [0, 0, 0])
    dirty = with_gc(launches(templates[1], "liger", 4, 0.8, 28.0), [0, 2, 0])
    assert metrics.figures(dirty[1])["gc_collections_in_window"] == 2
    df = build(clean + dirty)
    assert list(df["gc_collections_in_window"]) == [0, 2]  # the worst launch of each cell
    warning = cautions.gc_warning(df)
    assert warning and "garbage collector ran inside the timed window of ddp x1 GPU (2)" in warning
    assert cautions.gc_warning(build(clean)) is None
    assert cautions.gc_warning(build(launches(templates[1], "none", 4, 1.0, 40.0))) is None  # older records: no field
    folder = tmp_path / "res"
    for r in clean + dirty:
        append_record(folder, r)
    report.write_report([folder], tmp_path / "rep")
    verdict_part = (tmp_path / "rep" / "index.md").read_text().split("## Definitions")[0]
    assert "garbage collector ran inside the timed window" in verdict_part


def compiled(records, compile_s: float, in_timed: float):
    for r in records:
        r.settings = {**r.settings, "train": {**r.settings["train"], "compile": True}}
        settings = CellSettings.model_validate(r.settings)
        r.cell_id, r.label = settings.cell_id, settings.label
        for rank in r.ranks:
            rank["compile"] = {"layers": 32, "regions": 33, "compile_s": compile_s,
                               "compile_s_in_timed_steps": in_timed, "compiled_in_timed_steps": in_timed > 0,
                               "warmup_excess_s": compile_s}
    return records


def liger(records, modules: dict[str, int]):
    for r in records:
        for rank in r.ranks:
            rank["kernels"] = {"kernels": "liger", "liger_modules": modules, "causal_lm_forward": "x"}
    return records


def test_compile_seconds_liger_modules_and_compilation_inside_timed_steps(templates):
    one = templates[1]
    plain = launches(one, "none", 4, 1.0, 40.0)
    fast = liger(compiled(launches(one, "liger", 4, 0.7, 30.0), 41.5, 0.0), {"LigerRMSNorm": 65, "LigerSwiGLUMLP": 32})
    (_t, group), = fast_paths.groups(build(plain + fast))
    (c,) = fast_paths.comparisons(group)
    assert c.fast_path == "kernels liger + torch.compile"
    applied = fast_paths.table([c], "cuda").iloc[0]["fast path applied"]
    assert applied == "97 modules replaced by Liger; compiled in 41.5 s (warm-up, apart from step time)"
    assert cautions.compile_warning(group) is None
    late = compiled(launches(one, "none", 4, 0.9, 40.0), 30.0, 2.5)
    (_t, group), = fast_paths.groups(build(plain + late))
    (c,) = fast_paths.comparisons(group)
    assert fast_paths.table([c], "cuda").iloc[0]["fast path applied"].endswith(
        "warning: 2.5 s compiling inside timed steps")
    warning = cautions.compile_warning(group)
    assert warning and "compiled inside the timed steps of ddp x1 GPU (2.5 s)" in warning
    section = fast_paths.section(build(plain + late))
    assert section.items[0].warnings == [warning]


def test_an_auto_cells_proposal_and_trail_are_shown(templates, tmp_path):
    one = templates[1]
    auto = launches(one, "liger", "auto", 2.0, 72.0, chosen=6)
    for r in auto:
        r.micro_batch_auto = {**r.micro_batch_auto, "proposed": 8,
                              "trail": [{"mb": 8, "status": "oom", "peak_gib": 79.0},
                                        {"mb": 6, "status": "ok", "peak_gib": 72.0}]}
    records = launches(one, "none", "auto", 1.5, 70.0, chosen=6) + auto
    (_t, group), = fast_paths.groups(build(records))
    (c,) = fast_paths.comparisons(group)
    side = fast_paths.table([c], "cuda").iloc[0]["fast path: tok/s/GPU [95% CI]"]
    assert side.endswith("mb 6 (auto: proposed 8, 8 oom -> 6 ok)")
    folder = tmp_path / "res"
    for r in records:
        append_record(folder, r)
    report.write_report([folder], tmp_path / "rep")
    cells = pd.read_csv(tmp_path / "rep" / "cells.csv")
    assert sorted(cells["micro_batch_trail"]) == ["6 ok", "8 oom -> 6 ok"]
    assert list(cells["micro_batch_proposed"]) == [6, 8]


def test_a_climbed_auto_cell_shows_its_trail_in_launch_order_and_why_it_stopped(templates, tmp_path):
    one = templates[1]
    climbed = {"proposed": 19, "capacity_gib": 80.0, "capacity_source": "card", "chosen": 23,
               "stopped": "oom above", "trail": [{"mb": 19, "status": "ok", "peak_gib": 60.1},
                                                 {"mb": 23, "status": "ok", "peak_gib": 72.0, "corrected_gib": 73.0},
                                                 {"mb": 25, "status": "oom", "peak_gib": None, "corrected_gib": 77.5}]}
    auto = launches(one, "liger", "auto", 2.0, 72.0, chosen=23)
    auto[0].micro_batch_auto = climbed
    for r in auto[1:]:  # later repeats reuse the first ok launch's choice and do not climb
        r.micro_batch_auto = {**climbed, "stopped": "reused", "reused_from_repeat": 0,
                              "trail": [{"mb": 23, "status": "ok", "peak_gib": 72.0, "reused_from_repeat": 0}]}
    assert metrics.figures(auto[0])["micro_batch_trail"] == "19 ok -> 23 ok -> 25 oom"
    records = launches(one, "none", "auto", 1.5, 70.0, chosen=23) + auto
    folder = tmp_path / "res"
    for r in records:
        append_record(folder, r)
    report.write_report([folder], tmp_path / "rep")
    cells = pd.read_csv(tmp_path / "rep" / "cells.csv")
    liger = cells[cells["label"].str.contains("liger")].iloc[0]
    assert liger["micro_batch"] == 23 and liger["repeats_pooled"] == 3  # the climbed choice, all repeats at it
    assert liger["micro_batch_trail"] == "23 ok (reused)" and liger["micro_batch_stopped"] == "reused"
    first = metrics.figures(auto[0])
    assert (first["micro_batch"], first["micro_batch_stopped"]) == (23, "oom above")
    (_t, group), = fast_paths.groups(build(records[:3] + auto[:1]))
    (c,) = fast_paths.comparisons(group)
    side = fast_paths.table([c], "cuda").iloc[0]["fast path: tok/s/GPU [95% CI]"]
    assert side.endswith("mb 23 (auto: proposed 19, 19 ok -> 23 ok -> 25 oom)")


def with_skipped_updates(records, timed: list[int]):
    for r, n in zip(records, timed):
        for rank in r.ranks:
            rank["optimizer_skipped"] = {"warmup": 3, "timed": n}
    return records


def test_timed_steps_without_an_optimizer_update_are_a_warning(templates, tmp_path):
    clean = with_skipped_updates(launches(templates[1], "none", 4, 1.0, 40.0), [0, 0, 0])
    skipping = with_skipped_updates(launches(templates[1], "liger", 4, 0.8, 28.0), [0, 5, 1])
    assert metrics.figures(skipping[1])["optimizer_skipped_in_window"] == 5
    df = build(clean + skipping)
    assert list(df["optimizer_skipped_in_window"]) == [0, 5]  # the worst launch of each cell
    warning = cautions.skipped_update_warning(df)
    assert warning and "skipped its update in timed steps of ddp x1 GPU (5)" in warning and "fp16" in warning
    assert cautions.skipped_update_warning(build(clean)) is None  # warm-up skips alone are the warm-up's business
    folder = tmp_path / "res"
    for r in clean + skipping:
        append_record(folder, r)
    report.write_report([folder], tmp_path / "rep")
    assert "skipped its update" in (tmp_path / "rep" / "index.md").read_text().split("## Definitions")[0]


def test_steps_that_trained_nothing_are_a_warning(templates):
    good = launches(templates[1], "none", 4, 1.0, 40.0)
    bad = launches(templates[1], "liger", 4, 0.8, 28.0)
    for r in good + bad:
        for rank in r.ranks:
            rank["optimizer_updated_nothing"] = r in bad and rank["rank"] == 0
    assert metrics.figures(bad[0])["optimizer_updated_nothing"] is True
    warning = cautions.updated_nothing_warning(build(good + bad))
    assert warning and warning.startswith("Warning: the optimizer of ddp x1 GPU holds no state")
    assert warning.count("ddp x1 GPU") == 1  # the bad cell only
    assert cautions.updated_nothing_warning(build(good)) is None


@pytest.mark.parametrize("field", ["micro_batch_stopped", "gc_collections_in_window", "compile_s", "liger_modules",
                                   "micro_batch_trail", "optimizer_skipped_in_window",
                                   "optimizer_updated_nothing"])
def test_older_records_have_none_of_them(templates, field):
    assert field not in metrics.figures(templates[1])


def test_cards_that_waited_on_the_host_are_noted_and_their_busy_share_shown():
    # 2x H200 records (results/llama8b-h200-a): ZeRO-3 and FSDP LoRA cards busy 70-86 %, the others 93-97 %.
    from bench.records.store import latest_runs, load_records
    from bench.report import tables
    from conftest import REPO

    df = build(latest_runs(load_records(REPO / "results" / "llama8b-h200-a")))
    note = cautions.host_bound_note(df)
    assert note and note.startswith("Note: the cards of fsdp_full_shard x1 GPU (71 %)")
    for host_bound in ("fsdp_full_shard x2 GPU", "zero3 x1 GPU", "zero3 x2 GPU"):
        assert host_bound in note
    for busy in ("ddp x1 GPU", "zero1 x2 GPU", "zero2 x1 GPU"):
        assert busy not in note
    assert cautions.host_bound_note(df[df["util_mean_pct"] >= cautions.HOST_BOUND_BUSY_PCT]) is None
    assert note in cautions.verdict_warnings(df) and note in tables.warnings_for(df)
    state = tables.card_state_table(df).set_index("run")
    assert state.loc["fsdp_full_shard x1 GPU", "card busy % (NVML util)"] == "71"
    assert state.loc["ddp x1 GPU", "card busy % (NVML util)"] == "95"


def test_the_hosts_busy_and_stolen_cpu_are_shown_per_cell_and_older_records_say_so():
    from bench.records.store import latest_runs, load_records
    from bench.report import tables
    from conftest import REPO

    records = latest_runs(load_records(REPO / "results" / "llama8b-h200-a"))
    stolen = [r for r in records if r.label.endswith("zero3 x2gpu")]
    for rank, steal, probe in zip(stolen[0].ranks, (0.02, 0.12), (4.0, 5.0)):  # one node: the worse rank counts
        rank["host"] = {"steal_share": steal, "host_busy_share": 0.41, "rank_cpu_per_wall": 1.0,
                        "cpu_probe_ms_before": probe, "cpu_probe_ms_after": probe + 1}
    df = build(records)
    row = df[df["label"].str.endswith("zero3 x2gpu")].iloc[0]
    assert row["steal_share"] == pytest.approx(0.12) and row["host_busy_share"] == pytest.approx(0.41)
    assert row["cpu_probe_ms"] == pytest.approx(5.5)  # the slower rank's mean of before and after
    state = tables.card_state_table(df).set_index("run")
    assert state.loc["zero3 x2 GPU", "host CPU busy / stolen %"] == "41 / 12.0"
    assert state.loc["zero3 x2 GPU", "host CPU probe ms"] == "5.50"
    assert state.loc["ddp x1 GPU", "host CPU busy / stolen %"] == "n/a (older record)"
    assert state.loc["ddp x1 GPU", "host CPU probe ms"] == "n/a (older record)"
    warning = cautions.steal_warning(df)
    assert warning and warning.startswith("Warning: while zero3 x2 GPU (12%) were timed") and warning in tables.warnings_for(df)
    assert cautions.steal_warning(df[~df["label"].str.endswith("zero3 x2gpu")]) is None


def test_host_bound_cells_whose_host_cpu_probe_read_slow_are_warned_of():
    # 2x H200, the same machine (results/llama8b-h200-d): probes of 4-10 ms; the host-bound cells that read slow.
    from bench.records.store import latest_runs, load_records
    from bench.report import tables
    from conftest import REPO

    df = build(latest_runs(load_records(REPO / "results" / "llama8b-h200-d")))
    warning = cautions.slow_host_warning(df)
    assert warning and warning.startswith("Warning: the host CPU probe of zero3 x1 GPU (8.3 ms)")
    assert "zero3 x2 GPU (7.6 ms)" in warning and "the fastest here (4.2 ms)" in warning
    assert "fsdp_full_shard x1 GPU" not in warning  # host-bound, but its probe read 4.2 ms: the fastest
    assert "ddp x1 GPU" not in warning  # 8.8 ms, but its cards were busy (96 %): it does not wait on the host
    assert warning in cautions.verdict_warnings(df) and warning in tables.warnings_for(df)
    # nothing to say: every probe alike, or records from before the probe (run a)
    assert cautions.slow_host_warning(df[df["cpu_probe_ms"] < 5]) is None
    assert cautions.slow_host_warning(build(latest_runs(load_records(REPO / "results" / "llama8b-h200-a")))) is None


def test_a_folder_s_erratum_opens_every_report_made_from_it(templates, tmp_path):
    """A bench bug found after a run (FSDP1 without use_orig_params stepped orphaned parameters) leaves the
    records as measured; the folder's ERRATA.md says what is wrong with them, before any figure."""
    from bench.records import ERRATA_FILE

    wrong, right = tmp_path / "wrong", tmp_path / "right"
    for folder, r in ((wrong, launches(templates[1], "none", 4, 1.0, 40.0)[0]),
                      (right, launches(templates[1], "liger", 4, 0.8, 28.0)[0])):
        append_record(folder, r)
    (wrong / ERRATA_FILE).write_text("The FSDP1 cell's optimizer stepped nothing <see README>.\n")
    report.write_report([right, wrong], tmp_path / "rep")
    md = (tmp_path / "rep" / "index.md").read_text()
    head = md.split("## Verdict")[0]
    assert f"Erratum for {wrong}: The FSDP1 cell's optimizer stepped nothing <see README>." in head
    assert f"Erratum for {right}" not in md
    assert "stepped nothing &lt;see README&gt;." in (tmp_path / "rep" / "index.html").read_text()  # escaped
    report.write_report([right], tmp_path / "rep2")
    assert "Erratum" not in (tmp_path / "rep2" / "index.md").read_text()


def test_the_cells_an_erratum_names_stale_are_left_out_and_kept_on_file(templates, tmp_path):
    """An erratum may name cells whose records are wrong ("- stale cell `<id>`: label"): the report leaves them
    out (a rerun in another folder takes their place) and says so; runs.jsonl keeps them."""
    from bench.records import ERRATA_FILE, load_records

    wrong, right = tmp_path / "wrong", tmp_path / "right"
    stale = launches(templates[1], "none", 4, 1.0, 40.0)[0]
    append_record(wrong, stale)
    append_record(wrong, launches(templates[2], "none", 4, 1.0, 40.0)[0])  # another cell of the folder
    append_record(right, launches(templates[1], "liger", 4, 0.8, 28.0)[0])
    (wrong / ERRATA_FILE).write_text(f"Optimizer stepped nothing.\n\n- stale cell `{stale.cell_id}`: {stale.label}\n")
    report.write_report([right, wrong], tmp_path / "rep")
    cells = pd.read_csv(tmp_path / "rep" / "cells.csv")
    assert stale.cell_id not in set(cells["cell_id"]) and len(cells) == 2
    assert "leaves out the records of the 1 stale cell(s) named" in (tmp_path / "rep" / "index.md").read_text()
    assert len(load_records(wrong)) == 2  # on file still


def test_estimate_check_leaves_out_the_stale_cells_of_a_committed_folder():
    from bench.estimate.check import check_folder
    from bench.records import load_records, stale_cells
    from conftest import REPO

    folder = REPO / "results" / "corpus-gpu"
    stale = stale_cells(folder)
    assert stale and stale <= {r.cell_id for r in load_records(folder)}  # the erratum names cells of the folder
    assert not stale & {row.cell_id for row in check_folder(folder)}


def test_an_erratum_naming_a_cell_the_folder_lacks_is_bad_input(templates, tmp_path):
    """A mistyped id would leave the wrong records in every report without a word: report and estimate-check
    stop with exit 2 and say which id and where to copy it from."""
    from bench.records import ERRATA_FILE
    from conftest import bench

    folder = tmp_path / "r"
    append_record(folder, launches(templates[1], "none", 4, 1.0, 40.0)[0])
    (folder / ERRATA_FILE).write_text("Wrong.\n\n- stale cell `0123456789ab`: a cell this folder never ran\n")
    for args in (("report", str(folder), "--out", str(tmp_path / "rep")), ("estimate-check", str(folder))):
        proc = bench(*args)
        assert proc.returncode == 2, proc.stderr
        assert "names stale cell(s) 0123456789ab" in proc.stderr and "Fix: copy each id" in proc.stderr
