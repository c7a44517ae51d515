"""Datasets: the embedded default (scikit-learn's digits), user files, validation, split, fingerprint.

Everything downstream sees one shape of data: float32 features ``X`` of shape (N, F) and int64
labels ``y`` in ``[0, num_classes)``. Image data stays flat; a model that wants images reshapes
with ``image_shape``. Keeping one layout keeps ONNX export, quantization and benchmarking simple.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from tasks.techniques.config import TechniqueConfig
from tasks.techniques.files import atomic_write


class DataConfig(TechniqueConfig):
    """Where the data comes from and how it is split."""

    source: str = Field("digits", description="'digits' (ships with scikit-learn) or a path to .npz, .csv or .parquet")
    label_column: str = Field("label", description="label column of a CSV/Parquet file; every other column is a feature")
    num_classes: int | None = Field(None, ge=2, description="number of classes; labels must be < it (default: max label + 1)")
    image_shape: tuple[int, int, int] | None = Field(
        None, description="(C, H, W) of flattened images, for CNNs; digits sets (1, 8, 8) itself"
    )
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="share of samples held out for validation")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="share of samples held out for the final test")
    seed: int = Field(0, description="seed of the deterministic shuffle before splitting")
    standardize: bool = Field(True, description="scale features by train-split mean/std (stored with the splits)")


@dataclass(frozen=True)
class Splits:
    """Train/val/test arrays plus what a model needs to know about them."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    image_shape: tuple[int, int, int] | None

    @property
    def num_features(self) -> int:
        return int(self.X_train.shape[1])


def load_arrays(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int] | None]:
    """Read (X, y, image_shape) from the configured source, validated."""
    if cfg.source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Pixel values are 0..16; dividing keeps them in [0, 1] before standardisation.
        X, y = digits.data / 16.0, digits.target
        image_shape = cfg.image_shape or (1, 8, 8)
    else:
        X, y = _read_file(Path(cfg.source), cfg.label_column)
        image_shape = cfg.image_shape
    X, y = validate_arrays(X, y, origin=cfg.source)
    if cfg.num_classes is not None and y.max() >= cfg.num_classes:
        raise ValueError(f"data.num_classes: labels must be in 0..{cfg.num_classes - 1}, found {int(y.max())} in {cfg.source}")
    if image_shape is not None and int(np.prod(image_shape)) != X.shape[1]:
        raise ValueError(
            f"data.image_shape: {list(image_shape)} holds {int(np.prod(image_shape))} values "
            f"but {cfg.source} has {X.shape[1]} features per sample"
        )
    return X, y, image_shape


def _read_file(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise FileNotFoundError(f"data.source: file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files if name in ("X", "y")}
        except Exception as exc:  # BadZipFile, OSError, or numpy refusing pickled data: not a valid .npz
            raise ValueError(f"data.source: {path} is not a readable .npz file ({type(exc).__name__}: {exc})") from exc
        missing = {"X", "y"} - set(arrays)
        if missing:
            raise ValueError(f"data.source: {path} lacks array(s) {sorted(missing)}; expected arrays 'X' and 'y'")
        return arrays["X"], arrays["y"]
    if suffix in (".csv", ".parquet"):
        import pandas as pd

        try:
            frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
        except Exception as exc:
            raise ValueError(f"data.source: cannot read {path} ({type(exc).__name__}: {exc})") from exc
        if label_column not in frame.columns:
            raise ValueError(
                f"data.label_column: column '{label_column}' not in {path}; columns are {list(frame.columns)}"
            )
        features = frame.drop(columns=[label_column])
        non_numeric = [c for c in features.columns if not np.issubdtype(features[c].dtype, np.number)]
        if non_numeric:
            raise ValueError(f"data.source: {path} has non-numeric feature columns {non_numeric}")
        return features.to_numpy(), frame[label_column].to_numpy()
    raise ValueError(f"data.source: unsupported file type '{suffix}' for {path}; expected .npz, .csv or .parquet")


def validate_arrays(X: np.ndarray, y: np.ndarray, origin: str) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes, finiteness and labels; return (float32 X, int64 y)."""
    X, y = np.asarray(X), np.asarray(y)
    if X.ndim != 2:
        raise ValueError(f"data.source: {origin}: X must be 2-D (samples, features), got shape {X.shape}")
    if y.ndim != 1:
        raise ValueError(f"data.source: {origin}: y must be 1-D, got shape {y.shape}")
    if len(X) != len(y):
        raise ValueError(f"data.source: {origin}: X has {len(X)} rows but y has {len(y)}")
    if len(X) == 0:
        raise ValueError(f"data.source: {origin}: the dataset is empty")
    if not np.issubdtype(X.dtype, np.number):
        raise ValueError(f"data.source: {origin}: X must be numeric, got dtype {X.dtype}")
    X = X.astype(np.float32)
    bad = ~np.isfinite(X)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise ValueError(f"data.source: {origin}: X has NaN or infinite values in {len(rows)} rows (first: {rows[:5].tolist()})")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise ValueError(f"data.source: {origin}: labels must be integers 0..C-1, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise ValueError(f"data.source: {origin}: labels must be in 0..C-1, found {int(y.min())}")
    if len(np.unique(y)) < 2:
        raise ValueError(f"data.source: {origin}: need at least 2 classes, found {len(np.unique(y))}")
    return X, y


def split(X: np.ndarray, y: np.ndarray, image_shape, cfg: DataConfig) -> Splits:
    """Deterministic shuffle-and-split by ``cfg.seed``; standardise with train statistics."""
    n = len(X)
    order = np.random.default_rng(cfg.seed).permutation(n)
    n_test, n_val = max(1, round(n * cfg.test_fraction)), max(1, round(n * cfg.val_fraction))
    if n - n_test - n_val < 1:
        raise ValueError(f"data.source: {n} samples are too few for val_fraction and test_fraction")
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    if cfg.standardize:
        mean = X[train].mean(axis=0)
        std = X[train].std(axis=0)
        std[std < 1e-6] = 1.0  # constant columns (digits' border pixels) stay put instead of dividing by zero
        X = ((X - mean) / std).astype(np.float32)
    num_classes = cfg.num_classes or int(y.max()) + 1
    return Splits(X[train], y[train], X[val], y[val], X[test], y[test], num_classes, image_shape)


def fingerprint(splits: Splits) -> str:
    """Content hash of the split arrays: same data and split -> same fingerprint (16 hex chars)."""
    h = hashlib.sha256()
    for name in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test"):
        arr = np.ascontiguousarray(getattr(splits, name))
        h.update(f"{name}:{arr.dtype}:{arr.shape};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]


def save_splits(splits: Splits, path: str | Path) -> Path:
    """Write the splits to one .npz, atomically (temp file + rename): never a half-written file."""
    arrays = {
        "X_train": splits.X_train, "y_train": splits.y_train, "X_val": splits.X_val, "y_val": splits.y_val,
        "X_test": splits.X_test, "y_test": splits.y_test, "num_classes": np.int64(splits.num_classes),
        "image_shape": np.asarray(splits.image_shape or (), dtype=np.int64),
    }
    return atomic_write(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")


def load_splits(path: str | Path) -> Splits:
    """Inverse of ``save_splits`` (no pickle: ``allow_pickle=False``)."""
    with np.load(path, allow_pickle=False) as z:
        shape = tuple(int(v) for v in z["image_shape"]) or None
        return Splits(
            z["X_train"], z["y_train"], z["X_val"], z["y_val"], z["X_test"], z["y_test"],
            int(z["num_classes"]), shape,
        )

