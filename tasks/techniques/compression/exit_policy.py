"""Training the exit heads, and choosing the confidence threshold on the validation split.

The heads learn from the labels and from the model's own final head (self-distillation, Hinton's loss
with ``kd_alpha``); with a frozen backbone the final head's answers do not move, so the full model's
accuracy is the yardstick the threshold is held to.

A threshold's cost is its expected batch-1 latency: the share of samples leaving at each exit times the
measured latency of running to that exit. The curve of (threshold, accuracy, expected latency, shares)
over the config's grid is what the report plots; the chosen threshold is the cheapest whose validation
accuracy is within ``accuracy_budget`` of the full model's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from optforge.tasks.techniques.compression.early_exit import NEVER, EarlyExitConfig, EarlyExitModel, first_confident
from optforge.tasks.techniques.contract import as_tensors
from optforge.tasks.techniques.measurement.benchmark import time_calls
from optforge.tasks.techniques.training.finetune import ShuffledBatches, kd_loss
from optforge.tasks.techniques.training.training import TrainConfig, make_optimizer, make_scheduler


def train_heads(model: EarlyExitModel, train, cfg: EarlyExitConfig,
                on_epoch: Callable[[int, dict], None] | None = None) -> list[float]:
    """Train the exit heads (and, with ``cfg.joint``, the backbone) in place; returns each epoch's mean loss."""
    ft = cfg.finetune
    for p in model.base.parameters():
        p.requires_grad_(cfg.joint)
    train_cfg = TrainConfig(epochs=ft.epochs, lr=ft.lr, weight_decay=ft.weight_decay, optimizer=ft.optimizer,
                            batch_size=ft.batch_size, warmup_epochs=0, scheduler="cosine")
    opt = make_optimizer(model, train_cfg)
    sched = make_scheduler(opt, train_cfg, -(-len(train) // ft.batch_size))
    generator = torch.Generator().manual_seed(ft.seed)
    threads, losses = torch.get_num_threads(), []
    torch.set_num_threads(ft.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ft.seed)
            for epoch in range(ft.epochs):
                model.train()
                if not cfg.joint:
                    model.base.eval()  # no dropout in a frozen backbone: the heads see what serving sees
                order = torch.randperm(len(train), generator=generator).numpy()
                total, count = 0.0, 0
                for inputs, labels in ShuffledBatches(train, order, ft.batch_size, None):
                    outs = model.exit_logits(**inputs)
                    target = outs[-1].detach()
                    loss = sum(kd_loss(o, target, labels, ft.temperature, ft.kd_alpha) for o in outs[:-1]) / (len(outs) - 1)
                    if cfg.joint:
                        loss = loss + torch.nn.functional.cross_entropy(outs[-1], labels)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total, count = total + float(loss.detach()) * len(labels), count + len(labels)
                losses.append(total / max(1, count))
                if on_epoch is not None:
                    on_epoch(epoch, {"train_loss": losses[-1]})
    finally:
        torch.set_num_threads(threads)
        for p in model.base.parameters():
            p.requires_grad_(True)
        model.eval()
    return losses


@torch.inference_mode()
def exit_probs(model: EarlyExitModel, part, batch_size: int = 256) -> list[torch.Tensor]:
    """Softmax outputs of every exit (the model's own head last) on every row of ``part``."""
    model.eval()
    chunks = [[o.softmax(-1) for o in model.exit_logits(**as_tensors(inputs))]
              for inputs, _ in part.batches(batch_size)]
    return [torch.cat(column) for column in zip(*chunks)]


@torch.inference_mode()
def exit_latencies_ms(model: EarlyExitModel, row: dict[str, np.ndarray], repeats: int = 50) -> list[float]:
    """Median batch-1 milliseconds of running to each exit (the model's own head last), PyTorch eager."""
    model.eval()
    x = as_tensors(row)
    out = []
    for position in range(len(model.exits) + 1):
        seconds = time_calls(lambda _, p=position: model.through(p, **x), [None] * repeats, warmup=5)
        out.append(float(np.median(seconds)) * 1e3)
    return out


def curve(probs: list[torch.Tensor], labels: np.ndarray, latencies_ms: list[float],
          thresholds: list[float]) -> list[dict]:
    """Per threshold: accuracy (%), expected batch-1 latency (ms) and the share of samples at each exit."""
    labels_t = torch.as_tensor(np.asarray(labels))
    stacked = torch.stack(probs)  # (exits, rows, classes)
    rows, cost = [], torch.tensor(latencies_ms)
    for t in [*thresholds, NEVER]:
        where = first_confident(probs, t)
        predicted = stacked[where, torch.arange(len(where))].argmax(-1)
        shares = torch.bincount(where, minlength=len(probs)).double() / max(1, len(where))
        rows.append({"threshold": t, "accuracy": float((predicted == labels_t).double().mean()) * 100,
                     "expected_latency_ms": float((shares * cost.double()).sum()), "shares": shares.tolist()})
    return rows


def choose_threshold(rows: list[dict], max_drop: float) -> dict:
    """The cheapest row whose accuracy is within ``max_drop`` points of the full model's (the ``NEVER`` row)."""
    full = next(r for r in rows if r["threshold"] == NEVER)
    meeting = [r for r in rows if r["accuracy"] >= full["accuracy"] - max_drop]
    return min(meeting, key=lambda r: (r["expected_latency_ms"], -r["accuracy"]))
