"""Text data: CSV, JSONL or Parquet with a text column and a label column, tokenized by a local tokenizer.

The file is read twice in chunks, never whole: a first pass counts rows, checks the columns and
collects the label set and each text's token count (``max_length``, unset, follows them); the second
tokenizes each chunk (truncation and padding to ``max_length``)
and writes its rows into memory-mapped ``input_ids`` / ``attention_mask`` arrays of their split.
Texts longer than ``max_length`` are truncated and counted (``texts_truncated``), not refused.
Labels may be integers 0..C-1 or strings (mapped to ids in sorted order; the names go into the
contract, so the registered model's users can read the classes back).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from optforge.tasks.techniques.contract import text_contract
from optforge.tasks.techniques.data.data import class_order, write_meta
from optforge.tasks.techniques.data.split import split_indices
from optforge.tasks.techniques.models.folder_defaults import TOKENIZER_UNBOUNDED, covering_length

CHUNK_ROWS = 2048  # rows tokenized at a time: bounds memory, large enough for the fast tokenizer's batching
SUFFIXES = (".csv", ".jsonl", ".parquet")


def _chunks(path: Path, columns: list[str]) -> Iterator:
    """DataFrames of ``CHUNK_ROWS`` rows with ``columns`` (pandas' chunked readers; pyarrow's batches)."""
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix == ".csv":
        yield from pd.read_csv(path, usecols=columns, chunksize=CHUNK_ROWS)
    elif suffix == ".jsonl":
        for chunk in pd.read_json(path, lines=True, chunksize=CHUNK_ROWS):
            yield chunk[columns]
    else:
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=CHUNK_ROWS, columns=columns):
            yield batch.to_pandas()


def _columns(path: Path) -> list[str]:
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix == ".csv":
        return list(pd.read_csv(path, nrows=0).columns)
    if suffix == ".jsonl":
        return list(next(iter(pd.read_json(path, lines=True, chunksize=1))).columns)
    import pyarrow.parquet as pq

    return list(pq.ParquetFile(path).schema_arrow.names)


def check_file(cfg) -> Path:
    """The text file, with its text and label columns present; errors name the field and list the columns."""
    path = Path(cfg.source)
    if not path.is_file():
        raise FileNotFoundError(f"data.source: file not found: {path}")
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"data.source: unsupported text file type '{path.suffix}' for {path}; expected {list(SUFFIXES)}")
    try:
        columns = _columns(path)
    except Exception as exc:
        raise ValueError(f"data.source: cannot read {path} ({type(exc).__name__}: {exc})") from exc
    for field, name in (("data.text_column", cfg.text_column), ("data.label_column", cfg.label_column)):
        if name not in columns:
            raise ValueError(f"{field}: column '{name}' not in {path}; columns are {columns}")
    return path


def load_tokenizer(folder: str | None):
    """A Hugging Face tokenizer from a local folder only (nothing is downloaded)."""
    if not folder:
        raise ValueError("data.tokenizer: text data needs a tokenizer folder: set data.tokenizer, or use a Hugging "
                         "Face model folder (model.arch=huggingface, model.path) that holds its tokenizer")
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"data.tokenizer: tokenizer folder not found: {path}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ValueError(f"data.tokenizer: {path} holds no usable tokenizer ({type(exc).__name__}: {exc})") from exc


def _first_pass(path: Path, cfg, tokenizer, model_classes=None) -> tuple[int, dict | None, list[int]]:
    """(rows, {label value: id} for string labels or None for integer labels, each text's token count);
    checks labels. String labels take ``class_order``: a Hugging Face head's order when its names are the data's."""
    rows, values, lengths = 0, set(), []
    for chunk in _chunks(path, [cfg.text_column, cfg.label_column]):
        rows += len(chunk)
        if chunk[cfg.label_column].isna().any() or chunk[cfg.text_column].isna().any():
            raise ValueError(f"data.source: {path} has empty text or label cells near row {rows}")
        values.update(chunk[cfg.label_column].tolist())
        texts = [str(t) for t in chunk[cfg.text_column].tolist()]
        lengths += [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
    if rows == 0:
        raise ValueError(f"data.source: {path}: the dataset is empty")
    if len(values) < 2:
        raise ValueError(f"data.label_column: {path} has {len(values)} distinct label(s); need at least 2 classes")
    if all(isinstance(v, (int, np.integer)) for v in values):
        if min(values) < 0:
            raise ValueError(f"data.label_column: labels must be in 0..C-1, found {min(values)} in {path}")
        return rows, None, lengths
    order = class_order(values, cfg.classes, model_classes, f"{path} ({cfg.label_column})")
    return rows, {v: i for i, v in enumerate(order)}, lengths


def settled_length(cfg, lengths: list[int], max_positions: int | None, tokenizer) -> tuple[int, str]:
    """(tokens per sample, why): ``data.max_length`` when set (and within the limit), else what covers 99% of
    the texts within the model's positions (``max_positions``) and the tokenizer's ``model_max_length``."""
    bounds = [(max_positions, "the model's position limit")] if max_positions else []
    tokenizer_max = getattr(tokenizer, "model_max_length", None)
    if tokenizer_max and tokenizer_max < TOKENIZER_UNBOUNDED:
        bounds.append((int(tokenizer_max), "the tokenizer's model_max_length"))
    limit = min(bounds) if bounds else None
    if cfg.max_length is not None:
        if limit and cfg.max_length > limit[0]:
            raise ValueError(f"data.max_length: {cfg.max_length} exceeds {limit[0]} tokens, the most this model takes "
                             f"({limit[1]}); set data.max_length to {limit[0]} or less, or leave it unset to follow "
                             "the data")
        return cfg.max_length, "data.max_length"
    length = covering_length(lengths, limit[0] if limit else None)
    return length, (f"covers 99% of the texts (longest {max(lengths)} tokens)"
                    + (f", within {limit[0]} ({limit[1]})" if limit else ""))


def raw_texts(folder: Path, part: str = "test") -> Iterator[str]:
    """The raw texts of a split folder's part, in row order (kept for the test part: the registered model
    takes raw strings, so the champion comparison feeds it these)."""
    with open(Path(folder) / part / "texts.jsonl", encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


def prepare_texts(cfg, out: Path, tokenizer_folder: str | None, max_positions: int | None = None,
                  model_classes=None) -> None:
    """Tokenize ``cfg.source`` into the split folder ``out`` (see ``tasks.techniques.data.data``): to
    ``settled_length`` tokens, string labels in ``class_order``."""
    path = check_file(cfg)
    tokenizer = load_tokenizer(tokenizer_folder)
    rows, mapping, all_lengths = _first_pass(path, cfg, tokenizer, model_classes)
    max_length, length_why = settled_length(cfg, all_lengths, max_positions, tokenizer)
    # Sorted within each part, so a part's rows keep the file's order: the raw test texts can then be
    # appended to test/texts.jsonl as the chunks stream by, and line i is row i of the test part.
    train, val, test = (np.sort(i) for i in split_indices(rows, cfg, "data.source"))
    where = np.empty(rows, np.int64)  # row -> (part, position in part), two small index arrays
    part_of = np.empty(rows, np.int8)
    for p, index in enumerate((train, val, test)):
        part_of[index], where[index] = p, np.arange(len(index))
    names = ("train", "val", "test")
    arrays = []
    for name, index in zip(names, (train, val, test)):
        (out / name).mkdir(parents=True)
        arrays.append({k: np.lib.format.open_memmap(out / name / f"{k}.npy", mode="w+", dtype=np.int64,
                                                    shape=(len(index), max_length))
                       for k in ("input_ids", "attention_mask")} | {"labels": np.empty(len(index), np.int64)})
    start, truncated, longest = 0, 0, 0
    raw_test = open(out / "test" / "texts.jsonl", "w", encoding="utf-8")
    for chunk in _chunks(path, [cfg.text_column, cfg.label_column]):
        texts = [str(t) for t in chunk[cfg.text_column].tolist()]
        raw = chunk[cfg.label_column].tolist()
        labels = np.asarray([mapping[str(v)] for v in raw] if mapping else raw, np.int64)
        lengths = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
        truncated += sum(n > max_length for n in lengths)
        longest = max(longest, *lengths)
        enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="np")
        rows_here = np.arange(start, start + len(texts))
        raw_test.writelines(json.dumps(t) + "\n" for t, p in zip(texts, part_of[rows_here]) if p == 2)
        for p in range(3):
            mask = part_of[rows_here] == p
            pos = where[rows_here[mask]]
            for k in ("input_ids", "attention_mask"):
                arrays[p][k][pos] = enc[k][mask]
            arrays[p]["labels"][pos] = labels[mask]
        start += len(texts)
    raw_test.close()
    num_classes = cfg.num_classes or (len(mapping) if mapping else int(max(a["labels"].max() for a in arrays)) + 1)
    for name, a in zip(names, arrays):
        if a["labels"].max() >= num_classes:
            raise ValueError(f"data.num_classes: labels must be in 0..{num_classes - 1}, found {int(a['labels'].max())}")
        for k in ("input_ids", "attention_mask"):
            a[k].flush()
        np.save(out / name / "labels.npy", a["labels"])
        del a["input_ids"], a["attention_mask"]
    preprocessing = {"max_length": max_length, "padding": "max_length", "truncation": True,
                     "labels": list(mapping) if mapping else None, "max_length_from": length_why}
    stats = {"texts": rows, "texts_truncated": truncated, "longest_text_tokens": longest,
             "median_text_tokens": float(np.median(all_lengths))}
    # The tokenizer travels with the data: serving tokenizes raw strings with exactly this one.
    tokenizer.save_pretrained(str(out / "tokenizer"))
    write_meta(out, text_contract(max_length, num_classes, preprocessing), stats)
