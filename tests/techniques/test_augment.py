"""Augmentation: the cached copies are exactly what on-the-fly augmentation produces, epoch by epoch."""

import numpy as np
import pytest
import torch

from optforge.tasks.techniques.data.augment import AugmentedDataset, CachedCopies, build_cache, cache_path
from optforge.tasks.techniques.data.loader import LoaderConfig


def test_cache_equals_on_the_fly_and_copies_differ(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 16)).astype(np.float32)
    y = torch.arange(20)
    cfg = LoaderConfig(augment_copies=3, noise_std=0.1, max_shift=1)
    path = build_cache(X, cfg, (1, 4, 4), seed=5, path=cache_path(tmp_path / "splits", cfg, 5))
    live, cached = AugmentedDataset(X, "input", [y], cfg, (1, 4, 4), 5), CachedCopies(path, "input", [y])
    firsts = []
    for epoch in range(4):
        live.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in (0, 7, 19):
            (xa, ya), (xb, yb) = live[i], cached[i]
            assert set(xa) == set(xb) == {"input"}  # named like the data's input
            assert torch.equal(xa["input"], xb["input"]) and ya == yb == i
        firsts.append(live[0][0]["input"])
    assert not torch.equal(firsts[0], firsts[1])  # another copy each epoch
    assert torch.equal(firsts[0], firsts[3])  # epoch 3 reuses copy 0
    assert not np.allclose(live[0][0]["input"].numpy(), X[0])  # it did augment


def test_cache_file_is_keyed_by_settings(tmp_path):
    a = cache_path(tmp_path / "split", LoaderConfig(augment_copies=2), 0)
    b = cache_path(tmp_path / "split", LoaderConfig(augment_copies=2, noise_std=0.2), 0)
    assert a != b and a.parent == b.parent == tmp_path / "split" / "cache"  # inside the split folder


@pytest.mark.parametrize("kwargs, field", [
    ({"persistent_workers": True}, "train.loader.persistent_workers needs train.loader.workers > 0"),
    ({"prefetch_factor": 4}, "train.loader.prefetch_factor needs train.loader.workers > 0"),
    ({"workers": 1, "persistent_workers": True, "augment_copies": 2}, "cannot be combined"),
])
def test_loader_settings_that_cannot_work_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LoaderConfig(**kwargs)
