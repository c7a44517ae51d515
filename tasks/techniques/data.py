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
    new_source: str | None = Field(None, description="new data for fine-tuning (same format and features as source); "
                                   "split the same way, its train part mixed in by train.mix")


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
    # The train part of data.new_source (empty without one). Its val/test parts are already appended to
    # X_val/X_test, so evaluation covers old and new data alike.
    X_new: np.ndarray | None = None
    y_new: np.ndarray | None = None

    def __post_init__(self):
        if self.X_new is None:
            object.__setattr__(self, "X_new", np.zeros((0, self.X_train.shape[1]), np.float32))
            object.__setattr__(self, "y_new", np.zeros(0, np.int64))

    @property
    def X_fit(self) -> np.ndarray:
        """What training iterates over: the old train split, then data.new_source's train part. Sample
        indices (MixingSampler's, the teacher logits' rows, augmented copies' rows) refer to this order."""
        return np.concatenate([self.X_train, self.X_new])

    @property
    def y_fit(self) -> np.ndarray:
        """The labels of ``X_fit``, in its order."""
        return np.concatenate([self.y_train, self.y_new])

    @property
    def num_features(self) -> int:
        return int(self.X_train.shape[1])


def load_new_arrays(cfg: DataConfig, num_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate ``data.new_source``: same feature count as ``source``, labels inside its classes."""
    raw = _read_file(Path(cfg.new_source), cfg.label_column, "data.new_source")
    X, y = validate_arrays(*raw, origin=cfg.new_source, field="data.new_source")
    if X.shape[1] != num_features:
        raise ValueError(f"data.new_source: {cfg.new_source} has {X.shape[1]} features per sample, "
                         f"but data.source has {num_features}")
    return X, y


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


def _read_file(path: Path, label_column: str, field: str = "data.source") -> tuple[np.ndarray, np.ndarray]:
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
            raise ValueError(f"{field}: {path} has non-numeric feature columns {non_numeric}")
        return features.to_numpy(), frame[label_column].to_numpy()
    raise ValueError(f"{field}: unsupported file type '{suffix}' for {path}; expected .npz, .csv or .parquet")


def validate_arrays(X: np.ndarray, y: np.ndarray, origin: str, field: str = "data.source") -> tuple[np.ndarray, np.ndarray]:
    """Check shapes, finiteness and labels; return (float32 X, int64 y)."""
    X, y = np.asarray(X), np.asarray(y)
    if X.ndim != 2:
        raise ValueError(f"{field}: {origin}: X must be 2-D (samples, features), got shape {X.shape}")
    if y.ndim != 1:
        raise ValueError(f"{field}: {origin}: y must be 1-D, got shape {y.shape}")
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
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise ValueError(f"{field}: {origin}: labels must be integers 0..C-1, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise ValueError(f"{field}: {origin}: labels must be in 0..C-1, found {int(y.min())}")
    if len(np.unique(y)) < 2:
        raise ValueError(f"{field}: {origin}: need at least 2 classes, found {len(np.unique(y))}")
    return X, y


def _split_indices(n: int, cfg: DataConfig, field: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.random.default_rng(cfg.seed).permutation(n)
    n_test, n_val = max(1, round(n * cfg.test_fraction)), max(1, round(n * cfg.val_fraction))
    if n - n_test - n_val < 1:
        raise ValueError(f"{field}: {n} samples are too few for val_fraction and test_fraction")
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]


def split(X: np.ndarray, y: np.ndarray, image_shape, cfg: DataConfig,
          new: tuple[np.ndarray, np.ndarray] | None = None) -> Splits:
    """Deterministic shuffle-and-split by ``cfg.seed``; standardise with train statistics.

    ``new`` (data.new_source's arrays) is split with the same fractions; its val and test parts join
    the old ones and its train part becomes ``X_new``. The old train split's statistics scale both,
    so a model trained on the old data sees the new data on the scale it knows.
    """
    train, val, test = _split_indices(len(X), cfg, "data.source")
    num_classes = cfg.num_classes or int(y.max()) + 1
    parts = {"train": (X[train], y[train]), "val": (X[val], y[val]), "test": (X[test], y[test])}
    if new is not None:
        Xn, yn = new
        if yn.max() >= num_classes:
            raise ValueError(f"data.new_source: labels must be in 0..{num_classes - 1} (the classes of data.source), "
                             f"found {int(yn.max())} in {cfg.new_source}")
        n_train, n_val, n_test = _split_indices(len(Xn), cfg, "data.new_source")
        parts["val"] = tuple(np.concatenate([a, b[n_val]]) for a, b in zip(parts["val"], (Xn, yn)))
        parts["test"] = tuple(np.concatenate([a, b[n_test]]) for a, b in zip(parts["test"], (Xn, yn)))
        parts["new"] = (Xn[n_train], yn[n_train])
    if cfg.standardize:
        mean = parts["train"][0].mean(axis=0)
        std = parts["train"][0].std(axis=0)
        std[std < 1e-6] = 1.0  # constant columns (digits' border pixels) stay put instead of dividing by zero
        parts = {k: (((Xp - mean) / std).astype(np.float32), yp) for k, (Xp, yp) in parts.items()}
    new_part = parts.get("new", (None, None))
    return Splits(*parts["train"], *parts["val"], *parts["test"], num_classes, image_shape, *new_part)


def fingerprint(splits: Splits) -> str:
    """Content hash of the split arrays: same data and split -> same fingerprint (16 hex chars)."""
    h = hashlib.sha256()
    names = ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test")
    # Without new data the fingerprint stays what it was before data.new_source existed.
    for name in names + (("X_new", "y_new") if len(splits.y_new) else ()):
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
        "X_new": splits.X_new, "y_new": splits.y_new,
    }
    return atomic_write(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")


def load_splits(path: str | Path) -> Splits:
    """Inverse of ``save_splits`` (no pickle: ``allow_pickle=False``)."""
    with np.load(path, allow_pickle=False) as z:
        shape = tuple(int(v) for v in z["image_shape"]) or None
        return Splits(
            z["X_train"], z["y_train"], z["X_val"], z["y_val"], z["X_test"], z["y_test"],
            int(z["num_classes"]), shape,
            z["X_new"] if "X_new" in z.files else None, z["y_new"] if "y_new" in z.files else None,
        )

