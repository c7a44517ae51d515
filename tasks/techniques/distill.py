"""Knowledge distillation (Hinton et al., 2015) and the fine-tuning loop that pruning and factorization share.

The student learns from the teacher's softened outputs as well as from the labels:

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

A temperature T > 1 spreads the teacher's probability mass over the wrong classes too, and those
"dark knowledge" ratios (a 3 that looks like an 8) are what a small student cannot learn from
one-hot labels. The T^2 factor keeps the soft term's gradients the same size whatever T is.

The teacher's logits are inputs here (an array, or a column of each batch), not a teacher model:
the pipeline computes them once per dataset instead of running the teacher every epoch.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.contract import as_tensors, forward_logits
from optforge.tasks.techniques.models import ModelConfig, count_params
from optforge.tasks.techniques.training import (
    TrainConfig,
    evaluate,
    make_optimizer,
    make_scheduler,
    precision_for,
    train_epoch,
)


def _student_default() -> ModelConfig:
    # 64-256-128-10 MLP: 50 k params, 1/128 of the default teacher's 6.4 M.
    return ModelConfig(arch="mlp", hidden=(256, 128), dropout=0.1)


def _distill_train_default() -> TrainConfig:
    # The student is small and the soft targets are informative: 40 epochs at a higher LR than the
    # teacher's converge in a few seconds of compute; patience stops it earlier when val accuracy stalls.
    return TrainConfig(epochs=40, lr=3e-3, patience=8, batch_size=64)


class DistillConfig(TechniqueConfig):
    """Distillation of the trained teacher into a smaller student, on Ray Train."""

    student: ModelConfig = Field(default_factory=_student_default,
                                 description="student architecture: zoo 'mlp' / 'cnn' / 'dscnn', a factory, or a Hugging "
                                 "Face folder (its weights, or a fresh model when it holds only config.json)")
    derive: Literal["none", "layers", "width"] = Field(
        "none", description="build the student from the teacher instead of 'student', starting from its weights: "
        "'layers' keeps every layer_stride-th transformer layer (DistilBERT), 'width' keeps width_keep of every "
        "layer's channels, neurons and heads")
    layer_stride: int = Field(2, ge=2, le=12, description="derive=layers: keep one layer in this many (12 -> 6 at 2)")
    width_keep: float = Field(0.5, gt=0, lt=1, description="derive=width: share of each layer's channels kept")
    temperature: float = Field(4.0, gt=0, le=100, description="softmax temperature T of the soft targets")
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the soft (KL) term; 1 - alpha weighs the labels")
    train: TrainConfig = Field(default_factory=_distill_train_default,
                               description="Ray Train settings of the student (workers, AMP, accumulation, ...)")
    cache_teacher_logits: bool = Field(True, description="compute the teacher's logits once per dataset, not per batch")
    hidden_weight: float = Field(0.0, ge=0, description="weight of the mean-squared error between paired transformer "
                                 "layer outputs of student and teacher (equal widths only); needs "
                                 "cache_teacher_logits=false, since the teacher then runs on every batch")
    share_layers: int = Field(1, ge=1, description="transformer students: each run of this many consecutive layers "
                              "uses the first one's weights (ALBERT's cross-layer sharing); 1 shares nothing")

    @model_validator(mode="after")
    def _hidden_needs_the_live_teacher(self):
        if self.hidden_weight and self.cache_teacher_logits:
            raise ValueError("compress.distill.hidden_weight: hidden-state distillation reads the teacher's layer "
                             "outputs on every batch; set compress.distill.cache_teacher_logits=false")
        if self.hidden_weight and self.share_layers > 1:
            raise ValueError("compress.distill.share_layers: a shared layer runs several times per forward pass, so "
                             "its output cannot be paired with one teacher layer; use hidden_weight=0 with it")
        return self


class FinetuneConfig(TechniqueConfig):
    """In-process fine-tuning after pruning or factorization, optionally distilling from the teacher."""

    epochs: int = Field(6, ge=0, description="epochs of fine-tuning (per round when pruning iteratively); 0 skips")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (cosine decay, no warm-up)")
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


@torch.inference_mode()
def teacher_logits(teacher: nn.Module, part, batch_size: int = 256) -> np.ndarray:
    """The teacher's float32 logits on every row of ``part`` (eval mode: no dropout), computed once and
    reused every epoch."""
    teacher.eval()
    return np.concatenate([forward_logits(teacher, as_tensors(inputs)).float().numpy()
                           for inputs, _ in part.batches(batch_size)])


def check_student(student: nn.Module, teacher: nn.Module) -> tuple[int, int]:
    """(student params, teacher params); warns, and carries on, when the student is not smaller."""
    s, t = count_params(student), count_params(teacher)
    if s >= t:
        warnings.warn(f"distill.student: the student has {s:,} parameters, not fewer than the teacher's {t:,}; "
                      "distilling anyway, but it will not be a smaller model", UserWarning, stacklevel=2)
    return s, t


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
                            batch_size=cfg.batch_size, warmup_epochs=0, scheduler="cosine")
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
