"""benchmarks/run_agreement.py: issue 16's a/b bar read from two committed result folders; nothing launched."""

from __future__ import annotations

import importlib.util

from conftest import REPO

spec = importlib.util.spec_from_file_location("run_agreement", REPO / "benchmarks" / "run_agreement.py")
ra = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ra)

NIGHTS = REPO / "results" / "nightly-h200-w60"
SLOWED = REPO / "results" / "nightly-h200-w60-slowed" / "2026-11-30-213e3ff"


def test_two_plain_nights_meet_the_bar(capsys, tmp_path):
    out = tmp_path / "agreement.md"
    code = ra.main([str(NIGHTS / "2026-11-30-213e3ff"), str(NIGHTS / "2026-11-30-213e3ff-2"), "--markdown", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "4 of 4 cells ok on both sides within 2%" in text and "verdict: bar met" in text
    assert "2x NVIDIA H200; wall time 2.6 min" in text  # measured from the records' start and wall times
    assert out.read_text().strip() == text.strip()


def test_a_night_slowed_by_ten_percent_does_not_agree(capsys):
    code = ra.main([str(NIGHTS / "2026-11-30-213e3ff"), str(SLOWED)])
    text = capsys.readouterr().out
    assert code == 1
    assert "0 of 4 cells ok on both sides within 2%" in text and "bar NOT met" in text
    # the injected work runs after the step's two timed parts (bench/worker/slowdown.py): the step is 9 % slower,
    # its forward+backward is not; the optimizer part moves on its own (host-bound small launches)
    assert ("| llama-3.2-1b full zero2 x2gpu | 89,502 | 81,311 | -9.2% | +1.4% | -11.4% | 1/1 | 20/20 | 95/93 | -/- | "
            "NVIDIA H200 |") in text


def test_a_stricter_step_bar_fails_on_launches_that_timed_fewer_steps(capsys):
    assert ra.main([str(NIGHTS / "2026-11-30-213e3ff"), str(NIGHTS / "2026-11-30-213e3ff-2"),
                    "--min-steps", "21"]) == 1
    assert "fewest timed steps of any ok launch: 20 (bar 21)" in capsys.readouterr().out


def test_other_hardware_or_no_records_is_bad_input(capsys, tmp_path):
    assert ra.main([str(NIGHTS / "2026-11-30-213e3ff"), str(REPO / "results" / "llama-full")]) == 2
    assert "different hardware" in capsys.readouterr().err
    assert ra.main([str(NIGHTS / "2026-11-30-213e3ff"), str(tmp_path)]) == 2
    assert "no records" in capsys.readouterr().err


def test_the_1b_pair_meets_the_bar_and_its_miss_is_the_cell_whose_cards_idled_more(capsys):
    # results/llama-full-h200-a2 / -b2 (2x H200): 12 of 13 within 2 %; ZeRO-3 x2 -16 %, its cards 92 % -> 81 % busy
    code = ra.main([str(REPO / "results" / "llama-full-h200-a2"), str(REPO / "results" / "llama-full-h200-b2")])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "12 of 13 cells ok on both sides within 2% (92%; bar 90%)" in text
    # both parts of its step slower by a fifth: ZeRO-3's hooks wait on the host in forward/backward too
    assert ("| llama-3.2-1b full zero3 x2gpu | 71,497 | 59,891 | -16.2% | +19.4% | +19.1% | 1/1 | 65/53 | 92/81 | -/- | "
            "NVIDIA H200 |") in text


def test_the_agreement_of_busy_cards_and_of_cards_waiting_on_the_host_is_shown_apart(capsys):
    # results/llama8b-h200-c / -d (2x H200, one machine): the six cells whose cards stayed busy agree but one; the
    # four that waited on the host (ZeRO-3, FSDP LoRA: 70-87 % busy) but one do not. The bar still counts all ten.
    code = ra.main([str(REPO / "results" / "llama8b-h200-c"), str(REPO / "results" / "llama8b-h200-d")])
    text = capsys.readouterr().out
    assert code == 1 and "6 of 10 cells ok on both sides within 2%" in text
    assert "  - cards busy (NVML >= 90 % on both sides): 5 of 6 within 2%, largest |b / a - 1| 2.7%" in text
    assert "  - cards waiting on the host (NVML < 90 % on either side): 1 of 4 within 2%, largest |b / a - 1| 22.4%" in text
    # the two nights: their one host-bound cell (ZeRO-3) agreed too
    assert ra.main([str(NIGHTS / "2026-11-30-213e3ff"), str(NIGHTS / "2026-11-30-213e3ff-2")]) == 0
    assert "cards waiting on the host (NVML < 90 % on either side): 1 of 1 within 2%" in capsys.readouterr().out


def test_auto_cells_run_at_different_micro_batches_are_left_out_and_said(capsys, tmp_path):
    """Two runs of an auto micro-batch cell that settled on different micro-batches measured two configurations:
    their ratio is no agreement. kernels-h200 against a copy whose auto cells chose one more."""
    import json

    source = REPO / "results" / "kernels-h200"
    other = tmp_path / "kernels-h200-b"
    other.mkdir()
    lines = []
    for line in (source / "runs.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("micro_batch_auto") and record["micro_batch_auto"].get("chosen"):
            record["micro_batch_auto"]["chosen"] += 1
        lines.append(json.dumps(record))
    (other / "runs.jsonl").write_text("\n".join(lines) + "\n")
    ra.main([str(source), str(other)])
    text = capsys.readouterr().out
    auto_rows = [row for row in text.splitlines() if "mb-auto" in row]
    assert len(auto_rows) == 8 and all("not compared" in row for row in auto_rows)
    assert "8 of 8 cells ok on both sides within 2%" in text  # the numbered ones, the same records on both sides
    assert "different micro-batches: 8): 9" in text  # and the interrupted record, not ok on both sides


def test_the_steady_host_figure_is_compared_beside_the_bar_not_as_it(capsys):
    """1x H200, one machine (results/llama8b-steady-h200-a, -b): FSDP LoRA x1 +12.9 %, ZeRO-3 x1 -3.6 %; over
    the steps on a steady host +10.8 % and -1.8 %: the pace explains part of ZeRO-3's difference only."""
    steady_a, steady_b = (str(REPO / "results" / f"llama8b-steady-h200-{s}") for s in "ab")
    assert ra.main([steady_a, steady_b]) == 1
    plain = capsys.readouterr().out
    assert "1 of 3 cells ok on both sides within 2%" in plain and "on a slow host" not in plain
    assert ra.main([steady_a, steady_b, "--host-steady"]) == 1
    text = capsys.readouterr().out
    assert "2 of 3 cells ok on both sides within 2%" in text and "verdict on that figure: bar NOT met" in text
    assert "| llama-3.1-8b lora zero3 x1gpu | 5,569 | 5,466 | -1.8% |" in text
    assert "| 33/39 | NVIDIA H200 |" in text  # the share of steps on a slow host, a / b, in percent


def test_records_from_before_the_per_step_probe_have_no_steady_figure(capsys):
    code = ra.main([str(NIGHTS / "2026-11-30-213e3ff"), str(NIGHTS / "2026-11-30-213e3ff-2"), "--host-steady"])
    text = capsys.readouterr().out
    assert code == 1 and "no cell ok on both sides" in text and "no figure" in text
