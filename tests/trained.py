"""A small model trained in this process, for tests that need a trained model but are not about Ray."""

from pathlib import Path

import torch

from optforge.tasks.runtime.refs import DataRef, Format, ModelRef, file_sha256
from optforge.tasks.techniques.contract import as_tensors
from optforge.tasks.techniques.data.data import Splits
from optforge.tasks.techniques.models.models import ModelConfig, ModelSpec, save_model
from optforge.tasks.techniques.models.rebuild import build_model
from optforge.tasks.techniques.training.training import (
    TrainConfig,
    make_optimizer,
    make_scheduler,
    precision_for,
    train_epoch,
)


def train_in_process(model_cfg: ModelConfig, data: DataRef, splits: Splits, epochs: int,
                     folder: Path) -> tuple[torch.nn.Module, ModelRef]:
    """Train ``model_cfg`` on ``splits`` for ``epochs`` (seed 0, the default AdamW at lr 3e-3, batches
    of 64) and save it in ``folder``; the model and its ref."""
    spec = ModelSpec(model_cfg.to_dict(), data.contract)
    torch.manual_seed(0)
    model = build_model(spec)
    cfg = TrainConfig(lr=3e-3)
    batches = [(as_tensors(inputs), torch.as_tensor(labels)) for inputs, labels in splits.train.batches(64)]
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, len(batches))
    for _ in range(epochs):
        train_epoch(model, batches, opt, sched, precision_for(torch.device("cpu"), False), 1)
    saved = save_model(model, spec, folder)
    return model, ModelRef("pytorch_fp32", Format.TORCH, str(saved), file_sha256(saved))
