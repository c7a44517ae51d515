"""What every training worker shares, whatever the strategy: its typed config, its dataset, its MLflow logger.

The Ray Train loop (``tasks.workers.train_worker``), the asynchronous-SGD actors (``tasks.workers.asgd_worker``) and the
driver that launches either (``tasks.workers.training_driver``) all import this module and none imports another
worker module, so there is no import circle. A worker gets one ``WorkerConfig``: its fields say what
it can rely on, instead of dictionary keys documented in a docstring.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from optforge.tasks.techniques.compression.distill import DistillConfig
from optforge.tasks.techniques.data.augment import AugmentedDataset, CachedCopies
from optforge.tasks.techniques.data.data import Part, Splits
from optforge.tasks.techniques.data.loader import LoaderConfig
from optforge.tasks.techniques.models.models import ModelSpec
from optforge.tasks.techniques.models.rebuild import load_model
from optforge.tasks.techniques.training.finetune import kd_loss
from optforge.tasks.techniques.training.training import TrainConfig

CKPT_FILE = "train_state.pt"
ERROR_FILE = "error.json"


@dataclass(frozen=True)
class KdConfig:
    """Distillation inputs of a worker: the distill settings and where the teacher's signal comes from."""

    distill: dict  # DistillConfig.to_dict()
    logits_path: str | None = None  # the teacher's logits on the fit rows (computed once), or
    teacher_path: str | None = None  # the teacher's model folder, run on every batch


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a training worker reads; plain data, so Ray ships it to any node."""

    train: dict  # TrainConfig.to_dict()
    spec: dict  # asdict(ModelSpec)
    data_path: str  # the split folder, read by path from shared storage
    mlflow_tracking_uri: str | None = None
    mlflow_run_id: str | None = None  # rank 0 logs per-epoch metrics here (None: no logging)
    init_path: str | None = None  # a model folder to start from (fine-tuning, imported weights)
    augment_path: str | None = None  # cached augmented copies (built by the driver)
    kd: KdConfig | None = None

    @property
    def train_cfg(self) -> TrainConfig:
        return TrainConfig.from_dict(self.train)

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec(**self.spec)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> WorkerConfig:
        kd = raw.get("kd")
        return cls(**{**raw, "kd": KdConfig(**kd) if kd else None})


def row_inputs(part: Part, i: int) -> dict[str, torch.Tensor]:
    """Row ``i`` of a part's inputs as tensors (a copy: memory-mapped arrays are read-only)."""
    return {k: torch.from_numpy(np.array(v[i])) for k, v in part.inputs.items()}


class PartDataset(Dataset):
    """Row ``i`` of a data ``Part`` as ``({input: tensor}, label, *extra)``, read from the (memory-mapped)
    arrays only when asked: a worker never loads the split whole."""

    def __init__(self, part: Part, extra: list = ()):
        self.part, self.extra = part, list(extra)

    def __len__(self) -> int:
        return len(self.part)

    def __getitem__(self, i):
        return (row_inputs(self.part, i), torch.as_tensor(int(self.part.labels[i])), *(e[i] for e in self.extra))


def train_dataset(worker: WorkerConfig, cfg: TrainConfig, splits: Splits, device,
                  model: nn.Module | None = None) -> tuple[Dataset, object]:
    """``(dataset, loss_fn)`` over the fit rows (old train split, then data.new_source's train part).

    Distillation adds the teacher's logits as a column and its own loss; augmentation swaps the one
    float input for augmented copies (cached or computed per sample), keeping the other columns.
    """
    fit = splits.fit
    extra, loss_fn = [], None  # cross-entropy on labels
    if worker.kd:
        extra, loss_fn = _kd_columns_and_loss(worker.kd, fit, device, model)
    if cfg.loader.augment_copies:
        (name,) = splits.contract.names  # config checks allow augmentation of one float input only
        labels = [torch.as_tensor(np.asarray(fit.labels)), *extra]
        if worker.augment_path:
            return CachedCopies(worker.augment_path, name, labels), loss_fn
        return AugmentedDataset(fit.inputs[name], name, labels, cfg.loader, splits.contract.image_shape, cfg.seed), loss_fn
    return PartDataset(fit, extra), loss_fn


class _Inputs:
    """A column of a fit part's inputs as ``{name: tensor}`` per row (a live teacher's own inputs)."""

    def __init__(self, part: Part):
        self.part = part

    def __getitem__(self, i):
        return row_inputs(self.part, i)


def _kd_columns_and_loss(kd: KdConfig, fit: Part, device, student: nn.Module | None = None):
    """The extra batch column and loss of distillation: cached teacher logits, or the teacher run live (and
    then, with ``hidden_weight``, the paired layer outputs of ``student`` and teacher as well)."""
    from optforge.tasks.techniques.compression.students import LayerOutputs, hidden_state_loss
    from optforge.tasks.techniques.contract import forward_logits

    cfg = DistillConfig.from_dict(kd.distill)
    if kd.logits_path:
        with np.load(kd.logits_path, allow_pickle=False) as z:
            soft = torch.as_tensor(z["train"])
        return [soft], lambda logits, yb, s: kd_loss(logits, s, yb, cfg.temperature, cfg.alpha)
    teacher = load_model(kd.teacher_path)[0].to(device)
    hidden = (LayerOutputs(student), LayerOutputs(teacher)) if cfg.hidden_weight and student is not None else None

    def live(logits, yb, inputs):
        with torch.no_grad():
            soft = forward_logits(teacher, inputs).float()  # after the student's forward: both hooks are fresh
        loss = kd_loss(logits, soft, yb, cfg.temperature, cfg.alpha)
        return loss + cfg.hidden_weight * hidden_state_loss(*hidden) if hidden else loss

    return [_Inputs(fit)], live


def make_loader(dataset: Dataset, sampler, batch_size: int, loader: LoaderConfig) -> DataLoader:
    """A DataLoader with ``train.loader``'s settings (prefetch_factor only where torch accepts it)."""
    extra = {"prefetch_factor": loader.prefetch_factor} if loader.prefetch_factor else {}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=loader.workers,
                      pin_memory=loader.pin_memory, persistent_workers=loader.persistent_workers, **extra)


def mlflow_logger(worker: WorkerConfig):
    """Rank 0's per-epoch logger into the stage's MLflow run (None when not tracking).

    A tracking-server outage must not kill training: metrics that cannot be sent stay queued and go
    out with the next epoch's (MLflow's own HTTP retries come first). ``log.flush()`` tries once more
    at the end.
    """
    if not worker.mlflow_run_id:
        return None
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=worker.mlflow_tracking_uri)
    pending: list = []

    def flush() -> None:
        try:
            while pending:
                client.log_batch(worker.mlflow_run_id, metrics=pending[:1000])  # MLflow's batch limit
                del pending[:1000]
        except Exception as exc:
            print(f"[optforge] could not send {len(pending)} metric(s) to MLflow, retrying next epoch: {exc}")

    def log(metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        flush()

    log.flush = flush
    return log


def ensure_ray() -> None:
    """Join ``RAY_ADDRESS``'s cluster when set, else start a local Ray (once per process).

    A local Ray advertises 127.0.0.1, so its processes talk over loopback rather than the machine's
    network address (Ray's gRPC servers still listen on every interface; Ray offers no switch for that).
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    local = {} if address and address != "local" else {"_node_ip_address": "127.0.0.1"}
    # The workers' own output (library warnings, Ray Train's notes) reaches the terminal only with --verbose;
    # their progress comes through tasks/runtime/progress.py either way.
    verbose = os.environ.get("OPTFORGE_VERBOSE") == "1"
    ray.init(address=address, include_dashboard=False, log_to_driver=verbose, configure_logging=False, **local)


def latest_checkpoint(storage: Path, name: str) -> ray.train.Checkpoint | None:
    """The newest checkpoint a previous (crashed) run of the same name left in ``storage``.

    Ray Train v2 restores such a run by itself (from ``checkpoint_manager_snapshot.json`` under the
    same name and storage path); we look only to record whether this run resumes.
    """
    folder = storage / name
    found = sorted(folder.glob("checkpoint_*/" + CKPT_FILE), key=lambda p: p.stat().st_mtime)
    return ray.train.Checkpoint.from_directory(str(found[-1].parent)) if found else None


def training_summary(state: dict, resumed: bool, metrics: dict) -> dict:
    """What every strategy's run returns, from its final training state (``early_stopping``, ``epoch``)."""
    return {
        "best_val_accuracy": state["early_stopping"]["best"], "best_epoch": state["early_stopping"]["best_epoch"],
        "epochs_run": state["epoch"] + 1, "resumed": resumed, "metrics": json.loads(json.dumps(metrics, default=float)),
    }
