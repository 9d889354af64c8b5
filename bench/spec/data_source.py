"""A local data source a matrix names (``data.source``): checked before launch, opened as one data set.

JSON lines, parquet or a folder saved with ``Dataset.save_to_disk``, with a local tokenizer. The worker
batches it (bench/worker/local_data.py); the check says what is wrong with it before anything launches.
``datasets`` and ``tokenizers`` are imported when a data set is opened, not with this module.
"""

from __future__ import annotations

from pathlib import Path

from bench.spec.schema import CellSettings

_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def check_data(cell: CellSettings, vocab_size: int) -> str | None:
    """Why the cell's data settings cannot work (missing files, wrong field, tokenizer too big), or None."""
    d = cell.data
    src = Path(d.source)
    if not src.exists():
        return f"data.source {d.source!r}: no such file or folder. Fix: give a local .jsonl/.json/.parquet file, a saved dataset folder, or 'synthetic'"
    if src.is_file() and src.suffix not in _SUFFIXES:
        return f"data.source {d.source!r}: unknown format {src.suffix!r}. Fix: use JSON lines (.jsonl), parquet (.parquet) or a folder saved with Dataset.save_to_disk"
    if not d.tokenizer:
        return "data.source is a file but data.tokenizer is not set. Fix: give a local tokenizer folder"
    tok_file = Path(d.tokenizer) / "tokenizer.json"
    if not tok_file.is_file():
        return f"data.tokenizer {d.tokenizer!r}: no tokenizer.json there. Fix: give a folder saved with tokenizer.save_pretrained"
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(str(tok_file)).get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        return (f"data.tokenizer {d.tokenizer!r}: {size} tokens but the model's vocab_size is {vocab_size}. "
                "Fix: use the model's own tokenizer or a smaller one")
    try:
        columns = load_records(cell).column_names
    except Exception as e:  # noqa: BLE001 - any reader error is bad input, reported with its cause
        return f"data.source {d.source!r}: cannot be read ({type(e).__name__}: {e}). Fix: check the file's format"
    if d.text_field not in columns:
        return f"data.text_field {d.text_field!r}: not a column of {d.source!r} (columns: {columns}). Fix: name the text column"
    return None


def load_records(cell: CellSettings):
    """The data set as one `datasets.Dataset` (the 'train' split of a saved DatasetDict)."""
    import datasets

    src = Path(cell.data.source)
    if src.is_dir():
        ds = datasets.load_from_disk(str(src))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        return ds
    return datasets.load_dataset(_SUFFIXES[src.suffix], data_files=str(src), split="train")
