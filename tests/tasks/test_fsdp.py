"""train.strategy=fsdp on a real local Ray with 2 Ray Train workers: each worker holds half of the model,
and the final model is a whole, normal one.

One run (~25 s, mostly Ray Train's fixed start-up) checks what each worker holds (the worker's own memory
report, gathered from both ranks), the accuracy, and the final model; bf16 autocast and 2-step gradient
accumulation ride along, since both combine with fsdp.
"""

from dataclasses import asdict

import pytest

from optforge.tasks.techniques.data.data import DataConfig, load_splits
from optforge.tasks.techniques.data.sources import prepare
from optforge.tasks.techniques.models.models import MLP, ModelConfig, ModelSpec, count_params
from optforge.tasks.techniques.models.rebuild import build_model, load_model
from optforge.tasks.techniques.training.training import TrainConfig, evaluate
from optforge.tasks.workers.training_driver import run_training
from optforge.tasks.workers.worker_common import WorkerConfig
from tests.techniques.helpers import is_sharded

pytestmark = pytest.mark.slow


def test_each_worker_holds_half_and_the_final_model_is_whole(tmp_path):
    path = prepare(DataConfig(), tmp_path / "data")
    splits = load_splits(path)
    spec = ModelSpec(ModelConfig(hidden=(64,), dropout=0.0).to_dict(), splits.contract.to_dict())
    # 64x64+64 = 4,160 parameters in the first layer (a unit of its own at 1,000), 650 in the head (with the root).
    cfg = TrainConfig(strategy="fsdp", epochs=4, batch_size=32, lr=0.01, patience=0, num_workers=2,
                      fsdp_unit_params=1_000, amp=True, grad_accum_steps=2)
    summary = run_training(WorkerConfig(cfg.to_dict(), asdict(spec), str(path)), tmp_path / "ray", "fsdp",
                           tmp_path / "out")

    metrics, whole = summary["metrics"], count_params(build_model(spec))
    assert metrics["model_params"] == whole == 4_810
    # Both ranks' local shards: 32 of the 64 rows and 5 of the 10 head rows each, i.e. exactly half.
    assert metrics["worker_params_min"] == metrics["worker_params_max"] == whole / 2
    # Weights, gradients and AdamW's two moments, 4 bytes each, on half the parameters.
    assert metrics["worker_state_mb_max"] * 2**20 == pytest.approx(4 * 4 * whole / 2)
    assert summary["epochs_run"] == 4 and summary["best_val_accuracy"] >= 85.0

    model, _ = load_model(tmp_path / "out")  # what export, prune and quantize read
    assert isinstance(model, MLP) and not is_sharded(model) and count_params(model) == whole
    assert evaluate(model, splits.val)["accuracy"] == pytest.approx(summary["best_val_accuracy"])
