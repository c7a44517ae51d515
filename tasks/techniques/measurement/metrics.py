"""The one accuracy function, and running any predictor over a split in bounded batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

# {input name: array} -> logits (N, C), as numpy arrays: what every runtime is wrapped as.
Predictor = Callable[[Mapping[str, np.ndarray]], np.ndarray]

# Rows per call when predicting a whole split: bounds memory on large test sets, not a timed quantity.
BATCH_ROWS = 256


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose largest logit is the label, in percent (0-100)."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) == 0:
        raise ValueError("accuracy: no labelled rows to score")
    return 100.0 * float((np.asarray(logits).argmax(1) == labels).mean())


def predict_part(predict: Predictor, part, batch_rows: int = BATCH_ROWS) -> np.ndarray:
    """Logits of ``predict`` over every row of ``part`` (a ``tasks.techniques.data.data.Part``), in batches."""
    return np.concatenate([np.asarray(predict(inputs)) for inputs, _ in part.batches(batch_rows)])


def part_accuracy(predict: Predictor, part, batch_rows: int = BATCH_ROWS) -> float:
    """``top1_accuracy`` of ``predict`` on ``part``."""
    return top1_accuracy(predict_part(predict, part, batch_rows), part.labels)
