"""In-process fine-tuning: the loop that prune, factorize, QAT, clustering, binarization, circulant layers and
early exits share after changing a model, distilling from the teacher's soft targets when given (Hinton's loss,
``kd_loss``, which distillation's Ray Train workers use too). It keeps the epoch with the best validation
accuracy, so fine-tuning never leaves a model worse on validation than it found it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.contract import as_tensors
from optforge.tasks.techniques.training.training import (
    TrainConfig,
    evaluate,
    make_optimizer,
    make_scheduler,
    precision_for,
    train_epoch,
)


class FinetuneConfig(TechniqueConfig):
    """In-process fine-tuning after pruning or factorization, optionally distilling from the teacher."""

    epochs: int = Field(6, ge=0, description="epochs of fine-tuning (per round when pruning iteratively); 0 skips")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (after the warm-up, then cosine decay); a "
                      "pretrained teacher's chains default to a pretrained model's rate (flows/defaults.py)")
    warmup_epochs: float = Field(0.0, ge=0, description="epochs of linear warm-up to lr")
    batch_size: int = Field(64, ge=1, description="mini-batch size")
    weight_decay: float = Field(1e-4, ge=0, description="decoupled weight decay")
    optimizer: Literal["sgd", "adamw", "lamb", "lars"] = Field("adamw", description="optimizer, as in train.optimizer")
    kd_alpha: float = Field(0.7, ge=0, le=1, description="weight of the teacher's soft targets; 0 = labels only")
    temperature: float = Field(4.0, gt=0, le=100, description="softmax temperature of the soft targets")
    seed: int = Field(0, description="seed of the batch order")
    # One thread by default: fine-tuning shares the flow's process and the machine with Ray and other
    # work, and an oversubscribed 2-thread matmul measured 2-4x slower than 1 thread here.
    threads: int = Field(1, ge=1, description="torch intra-op threads while fine-tuning")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float, alpha: float) -> torch.Tensor:
    """Hinton's loss (module docstring), batch mean. ``alpha=0`` is plain cross-entropy."""
    hard = F.cross_entropy(student_logits, labels)
    if alpha == 0:
        return hard
    t = temperature
    # kl_div(input=log q_student, target=log p_teacher) = sum p_teacher * (log p_teacher - log q_student).
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True)
    return alpha * t * t * soft + (1 - alpha) * hard


def finetune(model: nn.Module, train, val, cfg: FinetuneConfig, soft_targets: np.ndarray | None = None,
             on_epoch: Callable[[int, dict], None] | None = None,
             on_batch: Callable[[int, int, int], None] | None = None) -> dict[str, float]:
    """Fine-tune ``model`` in place on the ``train`` part; keep the epoch with the best accuracy on ``val``.

    ``soft_targets`` are the teacher's logits on ``train``'s rows; without them (or with ``kd_alpha=0``)
    the loss is plain cross-entropy. Batches are read from the (memory-mapped) parts one at a time.
    ``on_epoch(epoch, metrics)`` and ``on_batch(epoch, done, total)`` report progress as it happens.
    Returns the validation accuracy before and after.
    """
    before = evaluate(model, val)["accuracy"]
    if cfg.epochs == 0:
        return {"val_accuracy_before": before, "val_accuracy": before, "epochs": 0}
    use_kd = soft_targets is not None and cfg.kd_alpha > 0
    soft = torch.as_tensor(soft_targets) if use_kd else None
    generator = torch.Generator().manual_seed(cfg.seed)
    n = len(train)
    steps = -(-n // cfg.batch_size)
    train_cfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, optimizer=cfg.optimizer,
                            batch_size=cfg.batch_size, warmup_epochs=cfg.warmup_epochs, scheduler="cosine")
    opt = make_optimizer(model, train_cfg)
    sched = make_scheduler(opt, train_cfg, steps)
    precision = precision_for(torch.device("cpu"), False)

    def loss_fn(logits, labels, *soft):
        return kd_loss(logits, soft[0], labels, cfg.temperature, cfg.kd_alpha) if soft else F.cross_entropy(logits, labels)

    best, best_state = before, copy.deepcopy(model.state_dict())
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    # Dropout draws from the global generator: seed it here (and give the caller's state back after), so
    # the same model, data and config fine-tune to the same weights whatever ran before in the process.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            for epoch in range(cfg.epochs):
                order = torch.randperm(n, generator=generator).numpy()
                stats = train_epoch(model, ShuffledBatches(train, order, cfg.batch_size, soft), opt, sched, precision, 1,
                                    loss_fn=loss_fn,
                                    on_batch=(lambda done, total: on_batch(epoch, done, total)) if on_batch else None)
                acc = evaluate(model, val)["accuracy"]
                if on_epoch is not None:
                    on_epoch(epoch, {"train_loss": stats["loss"], "val_accuracy": acc})
                if acc > best:
                    best, best_state = acc, copy.deepcopy(model.state_dict())
        finally:
            torch.set_num_threads(threads)
    model.load_state_dict(best_state)
    model.eval()
    return {"val_accuracy_before": before, "val_accuracy": best, "epochs": cfg.epochs}


class ShuffledBatches:
    """Shuffled batches ``(inputs, labels[, soft targets])`` of a part, each read from disk when iterated."""

    def __init__(self, part, order: np.ndarray, size: int, soft: torch.Tensor | None):
        self.part, self.order, self.size, self.soft = part, order, size, soft

    def __len__(self) -> int:
        return (len(self.order) + self.size - 1) // self.size

    def __iter__(self):
        for start in range(0, len(self.order), self.size):
            idx = self.order[start : start + self.size]
            inputs = as_tensors(self.part.take(idx))
            labels = torch.as_tensor(np.asarray(self.part.labels[idx]))
            yield (inputs, labels) + ((self.soft[idx],) if self.soft is not None else ())
