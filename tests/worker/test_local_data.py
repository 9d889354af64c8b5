"""Local data sets: real CPU cells through the CLI for each padding mode, plus readers and bad input.

The tests build their own small tokenizer (the `tokenizers` library, saved as a PreTrainedTokenizerFast
folder) and data files; nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import bench, write_matrix

from bench.spec import CellSettings
from bench.worker.local_data import IGNORE_INDEX, local_batches

WORDS = "the a model train step token batch shard rank data pad pack long short gpu memory speed".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """texts.jsonl, texts.parquet, a saved dataset folder and a tokenizer folder."""
    import datasets
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(40)]
    jsonl = folder / "texts.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    ds = datasets.Dataset.from_dict({"text": texts})
    ds.to_parquet(str(folder / "texts.parquet"))
    ds.save_to_disk(str(folder / "saved"))

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    fast.save_pretrained(str(folder / "tokenizer"))
    return {"jsonl": jsonl, "parquet": folder / "texts.parquet", "saved": folder / "saved",
            "tokenizer": folder / "tokenizer"}


def _cell(source: Path, tokenizer: Path, padding: str) -> CellSettings:
    return CellSettings(data={"source": str(source), "tokenizer": str(tokenizer), "padding": padding},
                        train={"seq_len": 32, "micro_batch": 3})


# ---------------------------------------------------------------- real CPU cells through the CLI

@pytest.mark.launch_aside
def test_each_padding_mode_runs_and_counts_real_tokens(tmp_path, corpus):
    data = {"source": str(corpus["jsonl"]), "tokenizer": str(corpus["tokenizer"])}
    matrix = write_matrix(tmp_path, "local", gpus=2, data=data, grid={"data.padding": ["longest", "max_length", "pack"]})
    results = tmp_path / "results"
    bench("run", str(matrix), "--results", str(results), check=True)
    records = [json.loads(x) for x in (results / "runs.jsonl").read_text().splitlines() if x.strip()]
    by_mode = {r["settings"]["data"]["padding"]: r for r in records}
    assert set(by_mode) == {"longest", "max_length", "pack"}
    for mode, record in by_mode.items():
        assert record["status"] == "ok", (mode, record.get("error"))
        steps = [s for rank in record["ranks"] for s in rank["steps"]]
        tokens, real = sum(s["tokens"] for s in steps), sum(s["real_tokens"] for s in steps)
        if mode == "pack":
            assert real == tokens == len(steps) * 2 * 64
        else:
            assert 0 < real < tokens, mode
    full = 2 * 64  # micro_batch x seq_len in the shared TINY settings
    assert all(s["tokens"] == full for r in by_mode["max_length"]["ranks"] for s in r["steps"])
    assert any(s["tokens"] < full for r in by_mode["longest"]["ranks"] for s in r["steps"])


# ---------------------------------------------------------------- readers and batches in process

@pytest.mark.parametrize("kind", ["jsonl", "parquet", "saved"])
def test_every_format_gives_padded_batches_with_masked_labels(corpus, kind):
    batch = next(local_batches(_cell(corpus[kind], corpus["tokenizer"], "max_length"), 0, torch.device("cpu")))
    assert batch["input_ids"].shape == (3, 32)
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == IGNORE_INDEX).all()
    assert (batch["labels"][~pad] == batch["input_ids"][~pad]).all()
    assert batch["real_tokens"] == int((~pad).sum())


def test_longest_pads_to_the_batch_and_pack_has_no_padding(corpus):
    longest = next(local_batches(_cell(corpus["jsonl"], corpus["tokenizer"], "longest"), 0, torch.device("cpu")))
    assert longest["input_ids"].shape[1] == int(longest["attention_mask"].sum(1).max())
    packed = next(local_batches(_cell(corpus["jsonl"], corpus["tokenizer"], "pack"), 0, torch.device("cpu")))
    assert "attention_mask" not in packed and packed["real_tokens"] == packed["input_ids"].numel() == 96


def test_batches_cycle_when_the_shard_runs_out(corpus):
    batches = local_batches(_cell(corpus["jsonl"], corpus["tokenizer"], "max_length"), 0, torch.device("cpu"))
    firsts = [next(batches)["input_ids"] for _ in range(40)]  # 120 records read from 40
    assert all(b.shape == (3, 32) for b in firsts)


# ---------------------------------------------------------------- bad input: exit 2 before launch

@pytest.mark.parametrize("change,expect", [
    ({"source": "/nowhere/data.jsonl"}, "data.source '/nowhere/data.jsonl': no such file"),
    ({"text_field": "body"}, "data.text_field 'body': not a column"),
    ({"tokenizer": "/nowhere/tok"}, "data.tokenizer '/nowhere/tok': no tokenizer.json"),
])
def test_bad_data_settings_exit_2(tmp_path, corpus, change, expect):
    data = {"source": str(corpus["jsonl"]), "tokenizer": str(corpus["tokenizer"]), **change}
    matrix = write_matrix(tmp_path, "baddata", data=data)
    proc = bench("run", str(matrix), "--results", str(tmp_path / "results"))
    assert proc.returncode == 2, proc.stderr
    assert expect in proc.stderr and "Fix:" in proc.stderr
