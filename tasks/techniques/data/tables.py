"""Numeric tables: scikit-learn's digits, ``.npz`` (arrays X, y), ``.csv`` / ``.parquet`` (features + a label column).

Tables are small enough to hold in memory: they are read whole, validated, split and standardised
with the train split's statistics, then written as arrays like every other source.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from optforge.tasks.techniques.data.split import split_indices


def read_table(source: str, label_column: str, field: str = "data.source") -> tuple[np.ndarray, np.ndarray]:
    """(X, y) of ``source`` validated: float32 (N, F) features, int64 labels >= 0."""
    if source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Pixel values are 0..16; dividing keeps them in [0, 1] before standardisation.
        return validate_arrays(digits.data / 16.0, digits.target, origin=source, field=field)
    return validate_arrays(*_read_file(Path(source), label_column, field), origin=source, field=field)


def _read_file(path: Path, label_column: str, field: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise FileNotFoundError(f"{field}: file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files if name in ("X", "y")}
        except Exception as exc:  # BadZipFile, OSError, or numpy refusing pickled data: not a valid .npz
            raise ValueError(f"{field}: {path} is not a readable .npz file ({type(exc).__name__}: {exc})") from exc
        missing = {"X", "y"} - set(arrays)
        if missing:
            raise ValueError(f"{field}: {path} lacks array(s) {sorted(missing)}; expected arrays 'X' and 'y'")
        return arrays["X"], arrays["y"]
    if suffix in (".csv", ".parquet"):
        import pandas as pd

        try:
            frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
        except Exception as exc:
            raise ValueError(f"{field}: cannot read {path} ({type(exc).__name__}: {exc})") from exc
        if label_column not in frame.columns:
            raise ValueError(
                f"data.label_column: column '{label_column}' not in {path}; columns are {list(frame.columns)}"
            )
        features = frame.drop(columns=[label_column])
        non_numeric = [c for c in features.columns if not np.issubdtype(features[c].dtype, np.number)]
        if non_numeric:
            raise ValueError(f"{field}: {path} has non-numeric feature columns {non_numeric}; for text set "
                             "data.text_column")
        return features.to_numpy(), frame[label_column].to_numpy()
    raise ValueError(f"{field}: unsupported file type '{suffix}' for {path}; expected .npz, .csv or .parquet "
                     "(or an image folder)")


def validate_labels(y: np.ndarray, origin: str, field: str = "data.source") -> np.ndarray:
    """int64 labels >= 0 with at least two classes."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{field}: {origin}: y must be 1-D, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise ValueError(f"{field}: {origin}: labels must be integers 0..C-1, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        raise ValueError(f"{field}: {origin}: labels must be in 0..C-1, found {int(y.min())}")
    if len(np.unique(y)) < 2:
        raise ValueError(f"{field}: {origin}: need at least 2 classes, found {len(np.unique(y))}")
    return y


def validate_arrays(X: np.ndarray, y: np.ndarray, origin: str, field: str = "data.source") -> tuple[np.ndarray, np.ndarray]:
    """Check shapes, finiteness and labels; return (float32 X, int64 y)."""
    X, y = np.asarray(X), np.asarray(y)
    if X.ndim != 2:
        raise ValueError(f"{field}: {origin}: X must be 2-D (samples, features), got shape {X.shape}")
    if len(X) != len(y):
        raise ValueError(f"{field}: {origin}: X has {len(X)} rows but y has {len(y)}")
    if len(X) == 0:
        raise ValueError(f"{field}: {origin}: the dataset is empty")
    if not np.issubdtype(X.dtype, np.number):
        raise ValueError(f"{field}: {origin}: X must be numeric, got dtype {X.dtype}")
    X = X.astype(np.float32)
    bad = ~np.isfinite(X)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise ValueError(f"{field}: {origin}: X has NaN or infinite values in {len(rows)} rows (first: {rows[:5].tolist()})")
    return X, validate_labels(y, origin, field)


def split_table(X: np.ndarray, y: np.ndarray, cfg, new: tuple[np.ndarray, np.ndarray] | None, num_classes: int
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{part: (X, y)}`` for train/val/test (and ``new``): a deterministic shuffle-and-split by ``cfg.seed``,
    standardised with train statistics.

    ``new`` (data.new_source's arrays) is split with the same fractions; its val and test parts join
    the old ones and its train part becomes ``new``. The old train split's statistics scale both, so a
    model trained on the old data sees the new data on the scale it knows.
    """
    train, val, test = split_indices(len(X), cfg, "data.source")
    parts = {"train": (X[train], y[train]), "val": (X[val], y[val]), "test": (X[test], y[test])}
    if new is not None:
        Xn, yn = new
        if yn.max() >= num_classes:
            raise ValueError(f"data.new_source: labels must be in 0..{num_classes - 1} (the classes of data.source), "
                             f"found {int(yn.max())} in {cfg.new_source}")
        n_train, n_val, n_test = split_indices(len(Xn), cfg, "data.new_source")
        parts["val"] = tuple(np.concatenate([a, b[n_val]]) for a, b in zip(parts["val"], (Xn, yn)))
        parts["test"] = tuple(np.concatenate([a, b[n_test]]) for a, b in zip(parts["test"], (Xn, yn)))
        parts["new"] = (Xn[n_train], yn[n_train])
    if cfg.standardize:
        mean = parts["train"][0].mean(axis=0)
        std = parts["train"][0].std(axis=0)
        std[std < 1e-6] = 1.0  # constant columns (digits' border pixels) stay put instead of dividing by zero
        parts = {k: (((Xp - mean) / std).astype(np.float32), yp) for k, (Xp, yp) in parts.items()}
    return parts
