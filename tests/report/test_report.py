"""Reports rendered from records of real CPU runs (the session's `cpu_results`).

Failed cells are made cheaply by copying a real record and setting its status (oom with an error,
predicted_oom with no ranks). GPU-side paths (NVML energy and traces, torch CUDA peaks, MFU, predictions)
use real CPU records dressed as H100 runs by ``test_metrics.as_gpu_record``; real GPU records come later.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pandas as pd
import pytest

from bench.records import CellError, RunRecord, append_record, load_records
from bench.report import document as report, tables as report_tables
from bench.spec import CellSettings, TokenBudget
from conftest import REPO, bench
from test_metrics import as_gpu_record, by_label


def failed_copy(record: RunRecord, status: str, strategy: str | None = None, message: str = "") -> RunRecord:
    r = copy.deepcopy(record)
    if strategy:
        r.settings = {**r.settings, "strategy": strategy}
        cell = CellSettings.model_validate(r.settings)
        r.cell_id, r.label = cell.cell_id, cell.label
    r.status, r.ranks = status, []
    r.error = CellError(kind=status, rank=1, message=message or f"{status} on rank 1")
    return r


def write_folder(folder: Path, records: list[RunRecord]) -> Path:
    for r in records:
        append_record(folder, r)
    return folder


@pytest.fixture(scope="module")
def cpu(cpu_results) -> dict[str, RunRecord]:
    return by_label(load_records(cpu_results))


@pytest.fixture(scope="module")
def mixed(cpu, tmp_path_factory) -> Path:
    """CPU cells (one of them an oom copy) and an H100 group: ddp/zero3 at 1 and 2, zero3 x2 oom,
    zero1 x2 predicted_oom; predictions on some GPU cells."""
    ddp1, ddp2 = cpu["tiny-llama full ddp x1proc"], cpu["tiny-llama full ddp x2proc"]
    z31, z32 = cpu["tiny-llama full zero3 x1proc"], cpu["tiny-llama full zero3 x2proc"]
    cpu_oom = failed_copy(z32, "oom", strategy="zero2", message="RuntimeError: out of memory")
    g_ddp1, g_ddp2, g_z31 = (as_gpu_record(r, reserved_gib=g) for r, g in ((ddp1, 10.0), (ddp2, 10.0), (z31, 8.0)))
    g_ddp1.prediction = {"peak_reserved_gib": 11.0, "capacity_gib": 80.0, "fits": True, "components_gib": {}}
    g_ddp2.prediction = {"peak_reserved_gib": 9.0, "capacity_gib": 80.0, "fits": True, "components_gib": {}}
    g_z32 = failed_copy(as_gpu_record(z32), "oom", message="torch.OutOfMemoryError: CUDA out of memory")
    g_z12 = failed_copy(as_gpu_record(z32), "predicted_oom", strategy="zero1")
    g_z12.prediction = {"peak_reserved_gib": 95.0, "capacity_gib": 80.0, "fits": False, "components_gib": {}}
    folder = tmp_path_factory.mktemp("mixed") / "results"
    return write_folder(folder, [ddp1, ddp2, z31, z32, cpu_oom, g_ddp1, g_ddp2, g_z31, g_z32, g_z12])


def csv_tables(out: Path) -> dict[str, pd.DataFrame]:
    return {p.stem: pd.read_csv(p, dtype=str, keep_default_na=False) for p in out.glob("*.csv") if p.stem != "cells"}


def assert_self_contained(out: Path) -> None:
    html = (out / "index.html").read_text()
    srcs = re.findall(r'<img[^>]*src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    md = (out / "index.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == len(srcs)  # every plot in both documents
    for link in links:  # relative PNG paths that exist next to index.md
        assert not link.startswith(("/", "http")) and link.endswith(".png") and (out / link).is_file()
    assert "nan" not in md.lower().replace("nanogpt", "")


def test_cli_report_from_real_cpu_runs(cpu_results, tmp_path):
    out = tmp_path / "rep"
    proc = bench("report", str(cpu_results), "--out", str(out), "--tokens", "50M", "--epochs", "4", check=True)
    for name in ("Scaling", "Head-to-head", "zero3", "->", "200M"):
        assert name in proc.stdout  # the main tables in the terminal
    assert_self_contained(out)
    assert {"scaling_1.png", "memory_1.png", "tradeoff_1.png"} <= {p.name for p in out.glob("*.png")}
    tables = csv_tables(out)
    scaling = tables["scaling_1"].set_index("strategy")
    assert list(scaling.index) == ["ddp", "zero3"]
    # 3 timed steps: the timing rule admits no interval of the median (bench/report/intervals.py)
    assert re.fullmatch(r"[\d,]+ \[no interval\] \(1 launch\)", scaling.loc["zero3", "2 proc: tok/s/proc [95% CI]"])
    assert re.fullmatch(r"\d+\.\d\dx \(\d+%\)", scaling.loc["zero3", "2 proc: vs same-policy 1 proc"])
    assert re.fullmatch(r"\d+\.\d\dx \(\d+%\)", scaling.loc["zero3", "2 proc: vs ddp@1 (plain)"])  # fp32 both
    assert scaling.loc["ddp", "1 proc: vs ddp@1 (plain)"] == "1.00x (100%)"
    assert (scaling["precision policy"] == "fp32").all()
    h2h = tables["head_to_head_1"].set_index("run")
    assert h2h.loc["ddp x1 proc", "baseline -> this"] == "(the baseline)"
    assert h2h.loc["zero3 x2 proc", "baseline (same policy)"] == "zero3 x1 proc"
    assert re.fullmatch(r".+ -> .+", h2h.loc["zero3 x2 proc", "baseline -> this"])
    assert (tables["energy_1"]["J per real token"] == "n/a (no NVML)").all()
    assert tables["efficiency_1"]["MFU (causal attn.)"].str.startswith("n/a (CPU").all()
    verdict = tables["verdict_1"].set_index("procs")
    assert verdict.loc["2", "fastest that fits (tok/s/proc [95% CI])"].split(" ")[0] in ("ddp", "zero3")
    md = (out / "index.md").read_text()
    assert "Predicted vs measured" not in md and "NVML trace" not in md  # no predictions, no NVML on CPU
    assert re.search(r"^\|[-:| ]+\|$", md, flags=re.M)  # standard pipe tables


def test_failed_cells_show_status_never_blank(mixed, tmp_path):
    out = report.write_report([mixed], tmp_path / "rep", options=report.ReportOptions(compare_gpus=2))
    assert_self_contained(out)
    tables = csv_tables(out)
    for name, table in tables.items():
        if name == "all_cells":
            continue
        assert not (table == "").any().any(), f"{name} has a blank cell"
    titles = (out / "index.md").read_text()
    assert "on cpu" in titles and f"on {as_gpu_record.__defaults__[0]}" in titles  # machines kept apart
    scalings = [t.set_index("strategy") for n, t in sorted(tables.items()) if n.startswith("scaling_")]
    assert len(scalings) == 2
    cpu_table, gpu_table = scalings
    assert cpu_table.loc["zero2", "2 proc: tok/s/proc [95% CI]"] == "oom"
    assert cpu_table.loc["zero2", "1 proc: tok/s/proc [95% CI]"] == report_tables.NO_RECORD
    assert gpu_table.loc["zero3", "2 GPU: tok/s/GPU [95% CI]"] == "oom"
    assert gpu_table.loc["zero3", "2 GPU: vs same-policy 1 GPU"] == "oom"
    assert gpu_table.loc["zero1", "2 GPU: vs ddp@1 (plain)"] == "predicted_oom"
    memory = tables["memory_2"].set_index("run")
    assert memory.loc["zero3 x2 GPU", "torch peak reserved GiB (whole run)"] == "oom"
    assert memory.loc["ddp x2 GPU", "torch peak reserved GiB (whole run)"] == "10.00"
    assert memory.loc["ddp x2 GPU", "torch peak reserved GiB (training steps)"] == "not recorded (older record)"
    gpu_verdict = tables["verdict_2"].set_index("GPUs")
    assert "zero3: oom" in gpu_verdict.loc["2", "did not fit"] and "zero1: predicted_oom" in gpu_verdict.loc["2", "did not fit"]
    assert gpu_verdict.loc["2", "fastest that fits (tok/s/GPU [95% CI])"].startswith("ddp (fp32): ")
    assert memory.loc["ddp x2 GPU", "torch peak allocated GiB"] == "9.00 (ranks differ by 1.00)"
    assert memory.loc["ddp x1 GPU", "capacity GiB"] == "80.0 (card)"


def test_gpu_sections_mfu_energy_prediction_trace(mixed, tmp_path):
    out = report.write_report([mixed], tmp_path / "rep", options=report.ReportOptions())
    tables = csv_tables(out)
    eff = tables["efficiency_2"].set_index("run")
    mfu = eff.loc["ddp x1 GPU", "MFU (causal attn.)"]
    assert re.fullmatch(r"[\d.e-]+%", mfu) and float(mfu[:-1]) > 0
    assert "989.4" in eff.loc["ddp x1 GPU", "peak used (source)"] and "datasheet" in eff.loc["ddp x1 GPU", "peak used (source)"]
    energy = tables["energy_2"].set_index("run")
    assert float(energy.loc["ddp x2 GPU", "J per real token"]) > 0
    assert energy.loc["zero3 x2 GPU", "J per real token"] == "oom"
    card = tables["card_state_2"].set_index("run")
    assert card.loc["ddp x2 GPU", "mean SM clock MHz (timed window)"] == "1980"
    assert card.loc["ddp x2 GPU", "timed samples throttled (power/thermal)"] == "unknown share (older record; none seen)"
    pred = tables["prediction"].set_index("run")
    assert pred.loc["tiny-llama full ddp x1gpu", "error %"] == "+10.0"
    assert pred.loc["tiny-llama full ddp x2gpu", "error %"] == "-10.0"
    assert pred.loc["tiny-llama full zero1 x2gpu", "measured GiB"] == "not measured (predicted_oom)"
    assert (out / "prediction_errors.png").is_file() and (out / "nvml_trace.png").is_file()
    assert_self_contained(out)


def test_trace_cell_option_picks_the_cell(mixed, tmp_path):
    records = load_records(mixed)
    target = next(r for r in records if r.label == "tiny-llama full ddp x2gpu")
    assert report.pick_trace_record(records, target.cell_id[:6]) is target
    first = report.pick_trace_record(records, None)
    assert first is not None and first.status == "ok" and first.nvml
    out = report.write_report([mixed], tmp_path / "rep", options=report.ReportOptions(trace_cell="ffffffffffff"))
    assert "No NVML trace recorded for cell ffffffffffff" in (out / "index.md").read_text()


def test_single_process_only_folder(cpu, tmp_path):
    folder = write_folder(tmp_path / "ones", [cpu["tiny-llama full ddp x1proc"], cpu["tiny-llama full zero3 x1proc"]])
    out = report.write_report([folder], tmp_path / "rep",
                              options=report.ReportOptions(budget=TokenBudget(tokens=10**6)))
    assert_self_contained(out)
    scaling = csv_tables(out)["scaling_1"]
    assert list(scaling.columns) == ["strategy", "precision policy", "1 proc: tok/s/proc [95% CI]",
                                     "1 proc: vs ddp@1 (plain)"]
    assert "Nothing to compare" in (out / "index.md").read_text()


def test_bench_run_leaves_its_matrix_in_the_results_folder(cpu_results):
    copy_ = cpu_results / "matrix.yaml"
    assert copy_.is_file() and (cpu_results.parent / "cpu.yaml").read_text() == copy_.read_text()
    assert report.resolve_budget(report.ReportOptions(), [cpu_results]) is None  # read, no budget in it


def test_budget_from_matrix_file_and_bad_tokens(cpu_results, tmp_path):
    matrix = tmp_path / "m.yaml"
    matrix.write_text("name: m\ntoken_budget: {tokens: 3000000, epochs: 2}\n")
    budget = report.resolve_budget(report.ReportOptions(matrix=matrix), [cpu_results])
    assert (budget.tokens, budget.epochs) == (3_000_000, 2)
    proc = bench("report", str(cpu_results), "--out", str(tmp_path / "x"), "--tokens", "lots")
    assert proc.returncode == 2 and "not a token count" in proc.stderr


@pytest.mark.parametrize("seconds, text", [(6000, "1 h 40 min"), (3120, "52 min"), (3.25, "3.2 s"),
                                           (3600, "1 h"), (200000, "2 d 7 h")])
def test_duration_reads_like_speech(seconds, text):
    assert report_tables.duration(seconds) == text


@pytest.mark.parametrize("text, count", [("50M", 50_000_000), ("1.5B", 1_500_000_000), ("2000", 2000), ("3k", 3000)])
def test_parse_count(text, count):
    assert report.parse_count(text) == count


def test_a_resumed_or_retried_cell_reports_its_last_record(cpu, tmp_path):
    ok = cpu["tiny-llama full ddp x2proc"]
    other = cpu["tiny-llama full ddp x1proc"]
    interrupted = failed_copy(ok, "interrupted", message="interrupted by Ctrl-C")
    crashed, retried = failed_copy(other, "crash", message="RuntimeError: boom"), copy.deepcopy(other)
    folder = write_folder(tmp_path / "resumed", [interrupted, crashed, ok, retried])
    records = report.load_all([folder])
    assert sorted((r.cell_id, r.status) for r in records) == sorted([(ok.cell_id, "ok"), (other.cell_id, "ok")])
    out = report.write_report([folder], tmp_path / "rep")
    cells = pd.read_csv(out / "all_cells.csv", dtype=str, keep_default_na=False)
    assert sorted(cells["status"]) == ["ok", "ok"] and (cells["error"] == "").all()
    assert "2 cells" in (out / "index.md").read_text() and "interrupted" not in (out / "index.md").read_text()
    # The other way round (an ok run, then a failed rerun of it) ends failed: the last record counts.
    again = write_folder(tmp_path / "rerun", [ok, failed_copy(ok, "crash", message="RuntimeError: boom")])
    assert [r.status for r in report.load_all([again])] == ["crash"]


def test_two_folders_with_the_same_cell_on_two_machines_stay_apart(cpu, tmp_path):
    ok = cpu["tiny-llama full ddp x2proc"]
    a, b = as_gpu_record(ok), as_gpu_record(ok, gpu_name="NVIDIA A100-SXM4-80GB")
    assert a.cell_id == b.cell_id
    df = report.build([write_folder(tmp_path / "h100", [a]), write_folder(tmp_path / "a100", [b])])
    assert sorted(df["machine"]) == sorted([a.ranks[0]["gpu_name"], b.ranks[0]["gpu_name"]])


def test_trace_shading_counts_from_the_samplers_start(cpu, tmp_path):
    from bench.report import plots

    rec = as_gpu_record(cpu["tiny-llama full ddp x2proc"])
    rec.nvml["started_at"] = rec.started_at - 2.0  # the sampler starts before the launch
    t = rec.nvml["trace"]["t"]
    assert plots._window_offsets(rec.nvml, rec.started_at, t) == (7.0, 14.0)  # not (5.0, 12.0)
    rec.nvml["started_at"] = None  # a record without it: the launch time, and no crash
    folder = write_folder(tmp_path / "trace", [rec])
    out = report.write_report([folder], tmp_path / "rep")
    assert (out / "nvml_trace.png").is_file()


def test_cells_of_several_nodes_get_an_across_nodes_table_and_plot(cpu, tmp_path):
    """A 2-node x 1-process ddp cell (the ranks of a real 2-process run, relabelled) beside the 1-node cells."""
    two = copy.deepcopy(cpu["tiny-llama full ddp x2proc"])
    two.settings = {**two.settings, "gpus": 1, "nodes": 2}
    cell = CellSettings.model_validate(two.settings)
    two.cell_id, two.label = cell.cell_id, cell.label
    folder = write_folder(tmp_path / "nodes", [cpu["tiny-llama full ddp x1proc"], cpu["tiny-llama full ddp x2proc"], two])
    out = report.write_report([folder], tmp_path / "rep")
    assert_self_contained(out)
    assert {"scaling_1.png", "scaling_nodes_1.png"} <= {p.name for p in out.glob("*.png")}
    tables = csv_tables(out)
    assert list(tables["scaling_1"]["strategy"]) == ["ddp"]  # within one node: the 1-node cells only
    across = tables["scaling_nodes_1"].set_index("strategy")
    assert re.fullmatch(r"\d+\.\d\dx \(\d+%\)", across.loc["ddp", "2 node(s): vs 1 node"])
    assert "Scaling across nodes" in (out / "index.md").read_text()


def test_two_runs_of_a_matrix_on_one_machine_are_pooled_as_launches(tmp_path):
    # results/llama-full-h200-a2 and -b2: one launch per cell each (repeat 0 in both), 2x H200.
    df = report.build([REPO / "results" / "llama-full-h200-a2", REPO / "results" / "llama-full-h200-b2"])
    assert len(df) == 13 and set(df["repeats_ok"]) == {2}
    zero3 = df[df["label"] == "llama-3.2-1b full zero3 x2gpu"].iloc[0]
    assert zero3["interval_basis"] != "1 launch"  # across the two runs' launches
    assert zero3["real_tokens_per_s_ci_low"] < 59_891 * 1.001 and zero3["real_tokens_per_s_ci_high"] > 71_497 * 0.999
    alone = report.build([REPO / "results" / "llama-full-h200-b2"])
    assert set(alone["repeats_ok"]) == {1}  # b's retried cell: its crash superseded inside its own folder


def test_linked_html_refers_to_the_pngs_beside_it_instead_of_embedding_them(mixed, tmp_path):
    embedded = report.write_report([mixed], tmp_path / "embedded", options=report.ReportOptions())
    linked = report.write_report([mixed], tmp_path / "linked", options=report.ReportOptions(html_images="linked"))
    html = (linked / "index.html").read_text()
    srcs = re.findall(r'<img[^>]*src="([^"]*)"', html)
    md_links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (linked / "index.md").read_text())
    assert srcs == md_links  # the same plots, by the same relative paths as the markdown
    assert all((linked / s).is_file() for s in srcs) and "base64" not in html
    assert len(html) < len((embedded / "index.html").read_text()) / 2  # the plots were most of the file
    assert (linked / "index.md").read_text().replace("linked", "embedded") == \
        (embedded / "index.md").read_text().replace("linked", "embedded")  # only the HTML differs


def test_cli_takes_the_html_images_choice_and_refuses_another(cpu_results, tmp_path):
    ok = bench("report", str(cpu_results), "--out", str(tmp_path / "rep"), "--html-images", "linked")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "data:image" not in (tmp_path / "rep" / "index.html").read_text()
    bad = bench("report", str(cpu_results), "--out", str(tmp_path / "rep2"), "--html-images", "inline")
    assert bad.returncode == 2 and "html-images" in bad.stdout + bad.stderr


def test_committed_reports_link_their_plots():
    """report/ travels with the tree to the GPU machine (64 MiB in all): an embedded plot would be there twice."""
    embedded = [p.parent.name for p in (REPO / "report").glob("*/index.html") if "data:image" in p.read_text()]
    assert not embedded, f"render these with `bench report ... --html-images linked`: {embedded}"
