"""Datasets: where they come from, how they are split, and the one on-disk form every stage reads.

Three kinds of source, each an adapter that ends in the same place:
- numeric tables (``digits``, ``.npz``, ``.csv``, ``.parquet``): ``tasks.techniques.data.tables``;
- an image folder with one sub-folder per class: ``tasks.techniques.data.images``;
- text in CSV, JSONL or Parquet with a text and a label column, tokenized: ``tasks.techniques.data.texts``.

``sources.prepare`` picks the adapter; each writes a split folder: ``contract.json`` (the ``InputContract``), and per part (``train``,
``val``, ``test``, ``new``) one ``.npy`` per input plus ``labels.npy``. Stages open those arrays
memory-mapped (``load_splits``), so a dataset larger than memory is read a batch at a time, and the
Ray workers read them from shared storage by path. Images and text are decoded and tokenized once,
one file or one chunk at a time, straight into the memory-mapped arrays: memory does not grow with
the dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.contract import DTYPES, InputContract, Kind

PARTS = ("train", "val", "test", "new")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataConfig(TechniqueConfig):
    """Where the data comes from, how it becomes tensors, and how it is split."""

    source: str = Field("digits", description="'digits' (ships with scikit-learn), a .npz/.csv/.parquet table, a text "
                        "file (.csv/.jsonl/.parquet with data.text_column), or an image folder (one sub-folder per class)")
    label_column: str = Field("label", description="label column of a table or text file")
    text_column: str | None = Field(None, description="text column: makes a CSV/JSONL/Parquet file text data")
    tokenizer: str | None = Field(None, description="tokenizer folder for text (default: the Hugging Face model folder's own)")
    max_length: int | None = Field(None, ge=2, description="text: tokens per sample; longer texts are truncated (and "
                                   "counted). Default: what covers 99% of the texts, rounded up to a multiple of 8, "
                                   "within the model's position limit and its tokenizer's model_max_length")
    image_size: int | None = Field(None, ge=8, description="images: side of the square center crop (default: the "
                                   "first image's shorter side)")
    resize: int | None = Field(None, ge=8, description="images: shorter side is resized to this before the crop "
                               "(default: image_size)")
    image_mode: Literal["RGB", "L"] = Field("RGB", description="images: colour (3 channels) or grey (1); default: "
                                            "the model's num_channels")
    resample: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] = Field(
        "bilinear", description="images: resampling filter of the resize (default: the model's image processor's)")
    rescale: bool = Field(True, description="images: scale pixels to [0, 1] before the mean and std (false: 0..255)")
    mean: tuple[float, ...] = Field(IMAGENET_MEAN, description="images: per-channel mean subtracted after scaling to [0, 1]")
    std: tuple[float, ...] = Field(IMAGENET_STD, description="images: per-channel std divided by")
    num_classes: int | None = Field(None, ge=2, description="number of classes; labels must be < it (default: max label + 1)")
    classes: tuple[str, ...] | None = Field(None, description="class names in the model's output order; must be the "
                                            "data's names (default: the Hugging Face model's id2label order when its "
                                            "names are the data's, else sorted)")
    image_shape: tuple[int, int, int] | None = Field(
        None, description="(C, H, W) of flattened images in a table, for CNNs; digits sets (1, 8, 8) itself"
    )
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="share of samples held out for validation")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="share of samples held out for the final test")
    seed: int = Field(0, description="seed of the deterministic shuffle before splitting")
    standardize: bool = Field(True, description="tables: scale features by train-split mean/std")
    new_source: str | None = Field(None, description="new table data for fine-tuning (same format and features as "
                                   "source); split the same way, its train part mixed in by train.mix")


def source_kind(cfg: DataConfig) -> Kind:
    """Which adapter reads ``cfg.source``: a folder is images, a text column makes text, else a table."""
    if cfg.source != "digits" and Path(cfg.source).is_dir():
        return "image"
    return "text" if cfg.text_column else "table"


def data_name(cfg: DataConfig) -> str:
    """A short name of the data for registry names and dataset names: 'digits', or the file/folder's stem."""
    return "digits" if cfg.source == "digits" else Path(cfg.source.rstrip("/")).stem or "data"


@dataclass(frozen=True)
class Part:
    """One split: named input arrays (in memory or memory-mapped) and their labels, row-aligned."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Inputs of rows ``start:stop`` as contiguous arrays (read from disk when memory-mapped)."""
        return {k: np.ascontiguousarray(v[start:stop]) for k, v in self.inputs.items()}

    def take(self, index) -> dict[str, np.ndarray]:
        """Inputs of the rows ``index`` (cycled indices allowed), contiguous."""
        index = np.asarray(index) % max(1, len(self))
        return {k: np.ascontiguousarray(v[index]) for k, v in self.inputs.items()}

    def head(self, n: int) -> Part:
        return Part({k: v[:n] for k, v in self.inputs.items()}, self.labels[:n])

    def tail(self, n: int) -> Part:
        """The last ``n`` rows (``n=0``: none)."""
        start = len(self) - n
        return Part({k: v[start:] for k, v in self.inputs.items()}, self.labels[start:])

    def batches(self, size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        for start in range(0, len(self), size):
            yield self.rows(start, start + size), np.asarray(self.labels[start : start + size])

    @staticmethod
    def concat(a: Part, b: Part) -> Part:
        if not len(b):
            return a
        return Part({k: np.concatenate([a.inputs[k], b.inputs[k]]) for k in a.inputs}, np.concatenate([a.labels, b.labels]))


@dataclass(frozen=True)
class Splits:
    """Train/val/test (and data.new_source's train part) plus the contract that describes their inputs."""

    contract: InputContract
    train: Part
    val: Part
    test: Part
    new: Part = field(default=None)  # type: ignore[assignment]
    stats: dict = field(default_factory=dict)  # what preparing the data counted (e.g. texts_truncated)

    def __post_init__(self):
        if self.new is None:
            empty = {t.name: np.zeros((0, *t.concrete(0, self.contract.sequence_length or 1)[1:]), DTYPES[t.dtype][0])
                     for t in self.contract.inputs}
            object.__setattr__(self, "new", Part(empty, np.zeros(0, np.int64)))

    @property
    def fit(self) -> Part:
        """What training iterates over: the old train split, then data.new_source's train part. Sample
        indices (MixingSampler's, the teacher logits' rows, augmented copies' rows) refer to this order."""
        return Part.concat(self.train, self.new)

    @property
    def num_classes(self) -> int:
        return self.contract.num_classes

    def part(self, name: str) -> Part:
        return getattr(self, name)

    def test_by_source(self) -> dict[str, Part]:
        """The test split as ``{"old": data.source's rows, "new": data.new_source's rows}``; empty without new data.

        Fine-tuning on new data can forget the old: the two accuracies, not their mix, show whether it did.
        """
        n_new = int(self.stats.get("test_new_rows", 0))
        if not n_new:
            return {}
        return {"old": self.test.head(len(self.test) - n_new), "new": self.test.tail(n_new)}


def write_part(folder: Path, part: Part) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in part.inputs.items():
        np.save(folder / f"{name}.npy", np.ascontiguousarray(array))
    np.save(folder / "labels.npy", np.asarray(part.labels, np.int64))


def save_splits(splits: Splits, folder: str | Path) -> Path:
    """Write ``splits`` as a split folder (module docstring), all or nothing (see ``publish``)."""
    folder = Path(folder)
    with staging(folder.parent) as tmp:
        for name in PARTS:
            write_part(tmp / name, splits.part(name))
        write_meta(tmp, splits.contract, splits.stats)
        return publish(tmp, folder)


def write_meta(folder: Path, contract: InputContract, stats: dict) -> None:
    (folder / "contract.json").write_text(json.dumps(contract.to_dict(), indent=2))
    (folder / "stats.json").write_text(json.dumps(stats, indent=2, default=float))


class staging:
    """A temporary folder beside the destination, removed unless ``publish`` moved it into place."""

    def __init__(self, parent: Path):
        parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(dir=parent, prefix=".staging-"))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def publish(tmp: Path, folder: Path) -> Path:
    """Rename the finished ``tmp`` to ``folder`` (atomic on one file system). A folder that already exists
    holds the same content (it is named by it), so it is kept and ``tmp`` dropped."""
    try:
        os.rename(tmp, folder)
    except OSError:
        if not (folder / "contract.json").exists():
            raise
    return folder


def load_splits(folder: str | Path) -> Splits:
    """Open a split folder; arrays are memory-mapped read-only (no pickle: ``allow_pickle=False``)."""
    folder = Path(folder)
    contract = InputContract.from_dict(json.loads((folder / "contract.json").read_text()))
    stats_file = folder / "stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    parts = {}
    for name in PARTS:
        sub = folder / name
        if not (sub / "labels.npy").exists():
            parts[name] = None
            continue
        inputs = {t.name: np.load(sub / f"{t.name}.npy", mmap_mode="r", allow_pickle=False) for t in contract.inputs}
        parts[name] = Part(inputs, np.load(sub / "labels.npy", allow_pickle=False))
    return Splits(contract, parts["train"], parts["val"], parts["test"], parts["new"], stats)


def fingerprint(folder: str | Path) -> str:
    """Content hash of a split folder's arrays and contract (16 hex chars), read in 1 MiB chunks."""
    folder = Path(folder)
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "stats.json"):
        h.update(f.relative_to(folder).as_posix().encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def class_order(found, wanted=None, preferred=None, where: str = "the data") -> list[str]:
    """The class names in output order: ``wanted`` (``data.classes``) when set, which must be the data's names;
    else ``preferred`` (a Hugging Face head's ``id2label`` order) when its names are the data's, so a fine-tuned
    head keeps meaning what it meant; else sorted."""
    names = sorted(map(str, found))
    if wanted:
        if sorted(map(str, wanted)) != names:
            raise ValueError(f"data.classes: {list(wanted)} are not the class names of {where}: {names}")
        return [str(c) for c in wanted]
    if preferred and sorted(map(str, preferred)) == names:
        return [str(c) for c in preferred]
    return names
