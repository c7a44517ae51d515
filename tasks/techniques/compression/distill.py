"""Knowledge distillation (Hinton et al., 2015): the student, the teacher's logits; the loss is ``finetune.kd_loss``.

The student learns from the teacher's softened outputs as well as from the labels:

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

A temperature T > 1 spreads the teacher's probability mass over the wrong classes too, and those
"dark knowledge" ratios (a 3 that looks like an 8) are what a small student cannot learn from
one-hot labels. The T^2 factor keeps the soft term's gradients the same size whatever T is.

The teacher's logits are inputs here (an array, or a column of each batch), not a teacher model:
the pipeline computes them once per dataset instead of running the teacher every epoch.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.contract import as_tensors, forward_logits
from optforge.tasks.techniques.models.models import ModelConfig, count_params
from optforge.tasks.techniques.training.training import TrainConfig


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
