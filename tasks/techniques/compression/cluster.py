"""Weight clustering (parameter sharing, Han et al.'s "deep compression"): each large layer's weights take
one of ``2**bits`` shared values.

Per layer, 1-D k-means (scikit-learn, initialised evenly between the smallest and largest weight, which
keeps the rare large weights their own centroids) maps every weight to a cluster. The layer then computes
its weight as ``codebook[indices]`` (a ``torch.nn.utils.parametrize`` parametrization), so fine-tuning
moves the shared values (each centroid's gradient is the sum of its weights' gradients) while every
weight stays in its cluster. ``bake`` turns the parametrization back into plain weights for export.

Stored as bit-packed indices plus a float32 codebook per clustered layer, and the rest (biases, norms,
small layers) in float32 (``packing``). This buys size, not speed: the model runs as float
(ONNX Runtime and PyTorch have no shared-value kernels), so its latency is the FP32 model's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from optforge.tasks.techniques.compression.packing import bake_weights, codebook_entry, save_packed
from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.training.finetune import FinetuneConfig

CLUSTERED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


class ClusterConfig(TechniqueConfig):
    """Weight clustering: ``2**bits`` shared values per layer, centroids fine-tuned."""

    bits: int = Field(4, ge=1, le=8, description="bits per weight index: each layer keeps at most 2**bits distinct "
                      "weights (1-8)")
    min_weights: int = Field(1024, ge=1, description="layers with fewer weights keep theirs (float32)")
    kmeans_sample: int = Field(100_000, ge=1000, description="weights per layer k-means is fitted on (all are "
                               "assigned); bounds the time on large layers")
    finetune: FinetuneConfig = Field(default_factory=lambda: FinetuneConfig(epochs=3),
                                     description="fine-tuning of the shared values")


class Codebook(nn.Module):
    """``weight = centroids[indices]``: the parametrization of a clustered layer's weight."""

    def __init__(self, indices: torch.Tensor, centroids: torch.Tensor):
        super().__init__()
        self.register_buffer("indices", indices)
        self.centroids = nn.Parameter(centroids)

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return self.centroids[self.indices]


def kmeans_1d(values: np.ndarray, k: int, sample: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (int64, one per value) and ``<= k`` centroids of a 1-D k-means with linear initialisation."""
    from sklearn.cluster import KMeans

    values = values.astype(np.float64).ravel()
    distinct = np.unique(values)
    if len(distinct) <= k:  # already few values: each is its own centroid
        return np.searchsorted(distinct, values), distinct
    rng = np.random.default_rng(seed)
    fit = values if len(values) <= sample else rng.choice(values, sample, replace=False)
    init = np.linspace(values.min(), values.max(), k).reshape(-1, 1)
    km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=100, random_state=seed).fit(fit.reshape(-1, 1))
    centroids = np.sort(km.cluster_centers_.ravel())
    # Nearest centroid for every value (sorted centroids: the midpoints split the line).
    return np.searchsorted((centroids[1:] + centroids[:-1]) / 2, values), centroids


def cluster(model: nn.Module, cfg: ClusterConfig) -> dict[str, int]:
    """Parametrize every large layer's weight by a ``2**bits`` codebook (in place); returns layer -> values kept."""
    kept = {}
    for name, module in model.named_modules():
        if not isinstance(module, CLUSTERED) or module.weight.numel() < cfg.min_weights:
            continue
        weight = module.weight.detach()
        indices, centroids = kmeans_1d(weight.cpu().numpy(), 2**cfg.bits, cfg.kmeans_sample)
        book = Codebook(torch.as_tensor(indices, dtype=torch.int64).reshape(weight.shape),
                        torch.as_tensor(centroids, dtype=weight.dtype))
        parametrize.register_parametrization(module, "weight", book, unsafe=True)
        kept[name] = len(centroids)
    return kept


def bake(model: nn.Module) -> dict[str, Codebook]:
    """Replace each codebook parametrization by its plain weight; returns layer -> its codebook."""
    return bake_weights(model, Codebook)


def pack(model: nn.Module, books: dict[str, Codebook], bits: int, path: str | Path) -> int:
    """Write the stored form (``packing``): indices and codebook per clustered layer, the rest in float32.
    Call after ``bake``; returns the file's size in bytes."""
    entries = {f"{name}.weight": codebook_entry(book.indices.numpy(), book.centroids.detach().float().numpy(), bits)
               for name, book in books.items()}
    return save_packed(model.state_dict(), entries, path)
