"""The deterministic train/val/test split every data source uses."""

from __future__ import annotations

import numpy as np


def split_indices(n: int, cfg, field: str = "data.source") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) sample indices: a shuffle by ``cfg.seed``, then ``cfg.test_fraction`` and
    ``cfg.val_fraction`` of the samples (at least one each) held out."""
    order = np.random.default_rng(cfg.seed).permutation(n)
    n_test, n_val = max(1, round(n * cfg.test_fraction)), max(1, round(n * cfg.val_fraction))
    if n - n_test - n_val < 1:
        raise ValueError(f"{field}: {n} samples are too few for val_fraction and test_fraction")
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]
