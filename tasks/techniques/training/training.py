"""Training primitives: optimizers, LR schedule, mixed precision, gradient accumulation, early stopping.

Plain PyTorch, no Ray: the Ray Train worker loop (``tasks/workers/train_worker.py``) wires these together
per worker, and tests drive them directly on a toy model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.contract import as_tensors, forward_logits, to_device
from optforge.tasks.techniques.data.loader import LoaderConfig
from optforge.tasks.techniques.training.agreement import all_ranks_agree


class TrainConfig(TechniqueConfig):
    """Ray Train data-parallel training of the teacher model."""

    epochs: int = Field(30, ge=0, description="maximum epochs (early stopping may end sooner); 0: take the given model "
                        "(model.path, model.weights or train.init_from) as the FP32 baseline without training")
    batch_size: int = Field(64, ge=1, description="micro-batch per worker; global batch = this x workers x accumulation")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (after warm-up)")
    weight_decay: float = Field(1e-4, ge=0, description="decoupled weight decay (AdamW, LAMB) or L2 (SGD, LARS)")
    optimizer: Literal["sgd", "adamw", "lamb", "lars"] = Field("adamw", description="lamb/lars: large-batch optimizers")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum of SGD and LARS")
    scheduler: Literal["cosine", "constant"] = Field("cosine", description="LR schedule after linear warm-up")
    warmup_epochs: float = Field(1.0, ge=0, description="epochs of linear LR warm-up")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    amp: bool = Field(False, description="mixed precision: bf16 autocast on CPU, fp16 + GradScaler on CUDA")
    patience: int = Field(5, ge=0, description="epochs without val-accuracy gain before stopping; 0 disables")
    min_delta: float = Field(0.0, ge=0, description="val-accuracy gain (points) that counts as improvement")
    num_workers: int = Field(2, ge=1, description="Ray Train data-parallel workers")
    use_gpu: bool = Field(False, description="one GPU per worker (needs CUDA on the Ray nodes)")
    threads_per_worker: int = Field(1, ge=1, description="torch intra-op threads in each worker")
    max_failures: int = Field(2, ge=0, description="worker failures Ray Train recovers from (from the last checkpoint)")
    # A rank that stopped reporting is waiting in a collective its peers never join (they took another path),
    # or stuck. Between two reports a rank runs one micro-batch or one evaluation batch, or rank 0 writes a
    # checkpoint: seconds for the project's models; ~90 s estimated for a BERT-base micro-batch of 64 at
    # sequence 128 on one thread (from its 0.25 s batch-1 forward on 2 threads). 300 s leaves 3x over that.
    stall_timeout_s: float = Field(300.0, gt=0, description="the driver fails the stage when a training rank has "
                                   "reported no step, evaluation batch or epoch for this long, naming the ranks")
    # The backstop under the watchdog: torch's process-group timeout (gloo/NCCL collectives) and Ray Train's
    # own barrier in ray.train.report. Longer than stall_timeout_s, so the watchdog's message, which names the
    # ranks, comes first; torch's default (30 min) would hold two cores that long.
    collective_timeout_s: float = Field(600.0, gt=0, description="a collective (all-reduce, broadcast, Ray Train's "
                                        "report barrier) that waits this long for a peer raises on the waiting rank")
    seed: int = Field(0, description="seed of weight init and data order")
    storage_path: str | None = Field(None, description="Ray Train storage (shared on a cluster); default <workdir>/ray")
    # How workers combine their work (see README "Training strategies").
    strategy: Literal["ssgd", "model_averaging", "asgd", "fsdp"] = Field(
        "ssgd", description="ssgd: synchronous DDP; model_averaging: local SGD, average every local_steps; "
        "asgd: asynchronous SGD through a Ray-actor parameter server; fsdp: fully sharded data parallel, each "
        "worker holds 1/num_workers of the weights, gradients and optimizer state (for models too big per worker)")
    local_steps: int = Field(8, ge=1, description="model_averaging: optimizer steps each worker takes between averages")
    staleness_bound: int = Field(4, ge=0, description="asgd: drop a gradient computed on weights more than this many "
                                 "server updates old")
    fsdp_unit_params: int = Field(1_000_000, ge=1, description="fsdp: a submodule with at least this many parameters "
                                  "(not in a smaller unit) is gathered whole only while it runs; the rest go with "
                                  "the root. Smaller: lower peak memory, more messages per step")
    fsdp_reshard_after_forward: bool = Field(True, description="fsdp: free each unit's gathered weights after its "
                                             "forward and gather them again for backward (least memory); false keeps "
                                             "them until backward: one gather fewer per step, whole weights held meanwhile")
    init_from: str | None = Field(None, description="fine-tune from runs:/RUN/model, models:/NAME@ALIAS (or /VERSION), "
                                  "or a local model folder (model.pt + model.json)")
    kl_weight: float = Field(0.0, ge=0, le=1, description="with init_from: weight of KL(original model || adapted model) "
                             "on every batch (1 - kl_weight weighs the labels): keeps the adapted model close to the "
                             "original's outputs on the old data while it learns the new; 0 = plain fine-tuning")
    mix: Literal["uniform", "tail"] = Field("uniform", description="where data.new_source's samples go in each epoch: "
                                            "spread through it, or only in its last tail_fraction")
    tail_fraction: float = Field(0.25, gt=0, le=1, description="mix=tail: share of each epoch (at its end) that the new "
                                 "samples are mixed into")
    loader: LoaderConfig = Field(default_factory=LoaderConfig, description="DataLoader settings and the data cache")

    @model_validator(mode="after")
    def _fsdp_combinations(self):
        if self.strategy == "fsdp" and self.num_workers < 2:
            raise ValueError("train.num_workers: strategy=fsdp shards the model across workers and needs at least 2; "
                             "with one worker use strategy=ssgd")
        if self.strategy == "fsdp" and self.optimizer in ("lamb", "lars"):
            # Their layer-wise trust ratio needs each whole weight's norm; on a DTensor shard pytorch-optimizer's
            # step fails (aten.clamp_ on a partial norm, torch 2.13).
            raise ValueError(f"train.optimizer: {self.optimizer} scales each layer's step by its whole weight's norm, "
                             "which a worker holding a shard does not have; with strategy=fsdp use sgd or adamw")
        return self


# Explicit dispatch: optimizer name -> builder(params, cfg). LAMB and LARS come from the maintained
# pytorch-optimizer library rather than being written here. SGD and AdamW use torch's fused kernels
# (one pass over all parameters; on CPU too): on the 6.4 M-parameter teacher an AdamW step took 41 ms
# per-tensor, 19 ms with foreach and 6 ms fused, 1 thread; the per-tensor step was ~40% of a step.
def _sgd(params, cfg: TrainConfig):
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)


def _adamw(params, cfg: TrainConfig):
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def _lamb(params, cfg: TrainConfig):
    from pytorch_optimizer import Lamb

    return Lamb(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lars(params, cfg: TrainConfig):
    from pytorch_optimizer import LARS

    return LARS(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


OPTIMIZERS: dict[str, Callable] = {"sgd": _sgd, "adamw": _adamw, "lamb": _lamb, "lars": _lars}


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.optimizer](model.parameters(), cfg)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-optimizer-step schedule: linear warm-up, then cosine decay to 0 or constant."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    total = max(1, cfg.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@dataclass
class Precision:
    """How forward passes run: autocast dtype (None = fp32) and a GradScaler for fp16."""

    device_type: str
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def precision_for(device: torch.device, amp: bool) -> Precision:
    """bf16 autocast on CPU (no scaler needed: bf16 has fp32's range); fp16 + GradScaler on CUDA."""
    if not amp:
        return Precision(device.type, None, None)
    if device.type == "cuda":
        return Precision("cuda", torch.float16, torch.amp.GradScaler("cuda"))
    return Precision(device.type, torch.bfloat16, None)


def train_epoch(
    model: nn.Module,
    batches,
    opt: torch.optim.Optimizer,
    sched,
    precision: Precision,
    accum_steps: int,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    device: torch.device | str = "cpu",
    loss_fn: Callable[..., torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """One pass over ``batches`` with gradient accumulation; returns loss, accuracy (%), samples.

    Batches are ``(inputs, y, *extra)`` with ``inputs`` a ``{name: tensor}`` mapping (the data's input
    contract); the loss is ``loss_fn(logits, y, *extra)``, cross-entropy by default (distillation passes the teacher's logits as the extra column and its own loss).

    ``no_sync`` (DDP's ``model.no_sync``) skips the gradient all-reduce on micro-batches that do not
    end an accumulation window: with 4 accumulation steps only every 4th backward talks to peers.
    The loss is divided by ``accum_steps`` so the accumulated gradient equals the mean gradient.

    Non-finite values are checked on the *synchronised* gradients at the end of each window: a NaN
    on any worker spreads to every worker through the all-reduce, so all workers raise at the same
    step instead of one raising while its peers wait forever in the next collective.

    ``after_step`` runs after every optimizer step (model averaging hooks in there). With it, gradients
    are local to the worker, so the finiteness check is left to the hook's synchronised weights.
    ``on_batch(done, total)`` runs after every micro-batch (live progress; it must be cheap).
    """
    model.train()
    loss_fn = loss_fn or nn.functional.cross_entropy
    total_loss, correct, seen = 0.0, 0, 0
    if not hasattr(batches, "__len__"):
        batches = list(batches)
    total = len(batches)  # a DataLoader knows its length without loading anything
    opt.zero_grad(set_to_none=True)
    for i, (xb, yb, *extra) in enumerate(batches):
        xb, yb, extra = to_device(xb, device), yb.to(device), [_to(e, device) for e in extra]
        last_in_window = (i + 1) % accum_steps == 0 or i + 1 == total
        sync = contextlib.nullcontext() if (last_in_window or no_sync is None) else no_sync()
        with sync:
            with precision.autocast():
                logits = forward_logits(model, xb)
            loss = loss_fn(logits.float(), yb, *extra)
            scaled = loss / accum_steps
            (precision.scaler.scale(scaled) if precision.scaler else scaled).backward()
        if last_in_window:
            # fp16's GradScaler expects occasional inf gradients and skips those steps itself.
            if precision.scaler is None and after_step is None and not _grads_finite(model):
                raise FloatingPointError(
                    f"loss became non-finite (last micro-batch loss {loss.item():.4g}) at step {i}; "
                    "hint: lower train.lr, raise train.warmup_epochs, or check the data for extreme values"
                )
            if precision.scaler:
                precision.scaler.step(opt)
                precision.scaler.update()
            else:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
        total_loss += loss.item() * len(yb)
        correct += (logits.argmax(1) == yb).sum().item()
        seen += len(yb)
        if on_batch is not None:
            on_batch(i + 1, total)
    return {"loss": total_loss / max(1, seen), "accuracy": 100.0 * correct / max(1, seen), "samples": float(seen)}


def all_finite(tensors) -> bool:
    """Whether every value of every tensor is finite, from one sum per tensor: a NaN or inf anywhere
    makes its sum non-finite. 1 ms on the teacher's 6.4 M gradients, against 15 ms for an elementwise
    isfinite, which allocates a mask as large as the tensors."""
    sums = [t.sum(dtype=torch.float32) for t in tensors]
    return bool(torch.isfinite(torch.stack(sums)).all()) if sums else True


def _grads_finite(model: nn.Module) -> bool:
    """Whether every rank's gradients are finite: one verdict for all ranks (``all_ranks_agree``).

    DDP's all-reduced gradients are equal on every rank, but fsdp's ranks hold slices, and a stop on NaN
    taken by one rank alone would leave the others waiting in the next collective: the flag costs one
    scalar all-reduce per optimizer step (well under 1 ms over gloo on this machine).
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return all_ranks_agree(all_finite(g.to_local() if hasattr(g, "to_local") else g for g in grads))


def _to(value, device):
    """An extra batch column to ``device``: a tensor, or a mapping of them (a live teacher's inputs)."""
    return to_device(value, device) if isinstance(value, dict) else value.to(device)


def evaluate(model: nn.Module, part, batch_size: int = 256, device="cpu",
             on_batch: Callable[[], None] | None = None) -> dict[str, float]:
    """Mean cross-entropy and accuracy (%) over the whole of ``part`` (a data split), read a batch at a time.

    ``on_batch()`` runs after every batch (a training worker's heartbeat; it must be cheap).

    Under ``inference_mode``, except for an fsdp-sharded model: FSDP2 would allocate its all-gather buffers
    as inference tensors and fail when training reuses them ("Inplace update to inference tensor").
    """
    sharded = any(hasattr(p, "to_local") for p in model.parameters())
    with torch.no_grad() if sharded else torch.inference_mode():
        return _evaluate(model, part, batch_size, device, on_batch)


def _evaluate(model: nn.Module, part, batch_size: int, device, on_batch=None) -> dict[str, float]:
    from optforge.tasks.techniques.measurement.metrics import top1_accuracy

    model.eval()
    loss_sum, logits_all = 0.0, []
    for inputs, labels in part.batches(batch_size):
        logits = forward_logits(model, to_device(as_tensors(inputs), device)).float()
        yb = torch.as_tensor(labels, device=device)
        loss_sum += nn.functional.cross_entropy(logits, yb, reduction="sum").item()
        logits_all.append(logits.cpu().numpy())
        if on_batch is not None:
            on_batch()
    return {"loss": loss_sum / len(part), "accuracy": top1_accuracy(np.concatenate(logits_all), part.labels)}


@dataclass
class EarlyStopping:
    """Stop after ``patience`` epochs without a val-accuracy gain of more than ``min_delta`` points."""

    patience: int
    min_delta: float = 0.0
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record an epoch's score; return True when it is a new best."""
        if value > self.best + self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]
