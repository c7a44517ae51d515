"""Training-set augmentation, on the fly or computed once and cached.

``augment_sample`` is a per-sample transform (Gaussian feature noise; for images a random shift of
up to ``max_shift`` pixels), seeded by (seed, copy, index) so that copy ``c`` of sample ``i`` is the
same array however it is produced. ``AugmentedDataset`` applies it in ``__getitem__`` every epoch,
the usual PyTorch way; ``build_cache`` applies it once per (copy, sample) and stores the result, and
``CachedCopies`` serves it back. Both give identical batches; the cache trades disk for the per-epoch
transform time (``bench/scaling.py`` prints both epoch times).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from optforge.tasks.techniques.data.loader import LoaderConfig
from optforge.tasks.techniques.files import atomic_write


def augment_sample(x: np.ndarray, index: int, copy: int, cfg: LoaderConfig, image_shape, seed: int) -> np.ndarray:
    """Copy ``copy`` of sample ``index``: shifted (images only) and with added Gaussian noise."""
    rng = np.random.default_rng([seed, copy, index])
    out = x
    if image_shape is not None and cfg.max_shift > 0:
        dy, dx = rng.integers(-cfg.max_shift, cfg.max_shift + 1, size=2)
        out = np.roll(out.reshape(image_shape), (int(dy), int(dx)), axis=(1, 2)).reshape(x.shape)
    if cfg.noise_std > 0:
        out = out + rng.normal(0.0, cfg.noise_std, size=out.shape)
    return out.astype(np.float32)


def cache_path(splits_path: str | Path, cfg: LoaderConfig, seed: int) -> Path:
    """Where the cached copies of a split folder live: in its ``cache/``, keyed by the augmentation settings."""
    key = json.dumps({"copies": cfg.augment_copies, "noise": cfg.noise_std, "shift": cfg.max_shift, "seed": seed})
    return Path(splits_path) / "cache" / f"augmented-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npy"


def build_cache(X: np.ndarray, cfg: LoaderConfig, image_shape, seed: int, path: str | Path) -> Path:
    """Write ``(copies, N, *sample shape)`` augmented copies of ``X`` to ``path`` (atomically) unless it exists.

    The copies are written into a memory-mapped file one sample at a time, so building the cache of a
    large image set does not hold it in memory.
    """
    path = Path(path)
    if path.exists():
        return path

    def write(tmp: str) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(cfg.augment_copies, *X.shape))
        for c in range(cfg.augment_copies):
            for i in range(len(X)):
                out[c, i] = augment_sample(np.asarray(X[i]), i, c, cfg, image_shape, seed)
        out.flush()

    return atomic_write(path, write, suffix=".npy")


class AugmentedDataset(Dataset):
    """``({name: x}, y, *extra)`` with ``x`` augmented in ``__getitem__``; ``set_epoch`` picks the copy
    (epoch mod copies). ``name`` is the data's one float input."""

    def __init__(self, X: np.ndarray, name: str, tensors: list[torch.Tensor], cfg: LoaderConfig, image_shape, seed: int):
        self.X, self.name, self.tensors, self.cfg = X, name, tensors, cfg
        self.image_shape, self.seed, self.copy = image_shape, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.copy = epoch % self.cfg.augment_copies

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i):
        x = augment_sample(np.asarray(self.X[i]), i, self.copy, self.cfg, self.image_shape, self.seed)
        return ({self.name: torch.from_numpy(x)}, *(t[i] for t in self.tensors))


class CachedCopies(Dataset):
    """The same samples as ``AugmentedDataset``, read from ``build_cache``'s file (memory-mapped)."""

    def __init__(self, path: str | Path, name: str, tensors: list[torch.Tensor]):
        self.copies = np.load(path, mmap_mode="r")
        self.name, self.tensors, self.copy = name, tensors, 0

    def set_epoch(self, epoch: int) -> None:
        self.copy = epoch % len(self.copies)

    def __len__(self) -> int:
        return self.copies.shape[1]

    def __getitem__(self, i):
        return ({self.name: torch.from_numpy(np.array(self.copies[self.copy, i]))}, *(t[i] for t in self.tensors))
