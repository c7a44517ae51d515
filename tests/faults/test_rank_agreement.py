"""Two Ray Train ranks, one decision, on a real local Ray (issue 23).

- A BatchNorm CNN whose ranks train on different shards with patience 1: without shared decisions its
  ranks' running statistics, and so their validation scores, differ and one rank stops while the other
  trains on into a collective that never completes (the hang of issue 23; measured by hand with the fix
  disabled: rank 0 finished after epoch 6, rank 1 waited in epoch 7). With them both ranks stop together.
- A rank that skips a collective (the decision's broadcast) makes the stage fail, not hang: through the
  watchdog, which names the stage, the epoch and the silent ranks (distillation: the same loop with a soft
  target), or through the collective timeout on the waiting rank. The next run resumes from the checkpoint.

The faults are injected by wrapping the real worker loop: the wrapper runs inside the Ray worker process
and swaps one function of ``tasks.workers.train_worker`` on rank 1 only.
"""

import json
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import ray.train

from optforge.tasks.techniques.compression.distill import DistillConfig
from optforge.tasks.techniques.data.data import DataConfig, load_splits
from optforge.tasks.techniques.data.sources import prepare
from optforge.tasks.techniques.models.models import ModelConfig, ModelSpec, save_model
from optforge.tasks.techniques.models.rebuild import build_model
from optforge.tasks.techniques.training.training import TrainConfig
from optforge.tasks.workers.distill_worker import run_distillation
from optforge.tasks.workers.training_driver import run_training
from optforge.tasks.workers.watchdog import TrainingStalled
from optforge.tasks.workers.worker_common import WorkerConfig

pytestmark = pytest.mark.slow
BN_CNN = ModelConfig(arch="cnn", channels=(8,))  # Conv2d + BatchNorm2d: buffers every rank updates alone


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[str, ModelSpec]:
    path = prepare(DataConfig(), tmp_path_factory.mktemp("digits"))
    return str(path), ModelSpec(BN_CNN.to_dict(), load_splits(path).contract.to_dict())


def recording_finishes(config: dict) -> None:
    """The real loop; each rank also writes the epoch it finished at into ``config['spy_dir']``."""
    import optforge.tasks.workers.train_worker as tw
    from optforge.tasks.workers.watchdog import Heartbeat

    rank, folder = ray.train.get_context().get_world_rank(), Path(config["spy_dir"])
    original = Heartbeat.finished

    def finished(self, epoch: int) -> None:
        (folder / f"rank{rank}.json").write_text(json.dumps(epoch))
        original(self, epoch)

    Heartbeat.finished = finished
    tw.train_loop_per_worker(config)


def rank1_skips_the_decision(config: dict) -> None:
    """The real loop, except that rank 1 takes its own validation numbers instead of joining rank 0's broadcast."""
    import optforge.tasks.workers.train_worker as tw

    if ray.train.get_context().get_world_rank() == 1:
        tw.from_rank_zero = lambda values: dict(values)
    tw.train_loop_per_worker(config)


def test_batchnorm_ranks_on_different_shards_stop_at_the_same_epoch(digits, tmp_path):
    data_path, spec = digits
    spy = tmp_path / "spy"
    spy.mkdir()
    cfg = TrainConfig(epochs=12, batch_size=16, lr=0.01, patience=1, max_failures=0, stall_timeout_s=60)
    worker = WorkerConfig(cfg.to_dict(), asdict(spec), data_path)

    def loop(config):
        recording_finishes({**config, "spy_dir": str(spy)})

    summary = run_training(worker, tmp_path / "ray", "bn", tmp_path / "model", loop=loop)
    finished = {r: json.loads((spy / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert finished[0] == finished[1] == summary["epochs_run"] - 1  # one stop, taken by both ranks
    assert summary["epochs_run"] < 12  # early stopping did stop it
    assert summary["best_epoch"] <= summary["epochs_run"] - 2  # patience 1: the epoch after the best was worse


def test_a_skipped_collective_fails_training_at_the_collective_timeout(digits, tmp_path):
    data_path, spec = digits
    # The watchdog far away: the waiting rank's collective timeout (torch's, and Ray Train's report barrier) ends it.
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.01, max_failures=0, collective_timeout_s=10, stall_timeout_s=600)
    worker = WorkerConfig(cfg.to_dict(), asdict(spec), data_path)
    started = time.monotonic()
    with pytest.raises(TrainingStalled) as failure:
        run_training(worker, tmp_path / "ray", "skip", tmp_path / "model", loop=rank1_skips_the_decision)
    assert time.monotonic() - started < 150  # start-up (~25 s) + one epoch + the 10 s timeout, not a hang
    assert str(failure.value).startswith("train: a rank waited longer than train.collective_timeout_s (10 s)")
    assert "Timed out waiting 10000ms" in str(failure.value.__cause__)  # gloo's own words, on the waiting rank


def test_distillation_with_a_skipped_collective_fails_by_the_watchdog_then_resumes(digits, tmp_path):
    data_path, spec = digits
    teacher = save_model(build_model(spec), spec, tmp_path / "teacher")  # a live teacher: no logits file
    student = ModelSpec(ModelConfig(arch="cnn", channels=(4,)).to_dict(), spec.contract)
    train = TrainConfig(epochs=2, batch_size=32, lr=0.01, max_failures=0, stall_timeout_s=10)
    cfg = DistillConfig(student=ModelConfig(arch="cnn", channels=(4,)), train=train, cache_teacher_logits=False)
    args = (cfg, student, data_path, None, str(teacher), tmp_path / "ray", "kd", tmp_path / "student")
    started = time.monotonic()
    with pytest.raises(TrainingStalled) as stalled:
        _distill_with(args, rank1_skips_the_decision)
    assert time.monotonic() - started < 150
    message = str(stalled.value)
    assert message.startswith("distill: rank(s) 0, 1 stopped reporting")  # both wait: 0 in the broadcast, 1 at report
    assert "epoch 1, evaluating" in message and "train.stall_timeout_s" in message
    assert "next run resumes" in message
    assert list((tmp_path / "ray" / "kd").glob("checkpoint_*")) == []  # it stalled before the first checkpoint

    summary = run_distillation(*args)  # the same stage again, without the fault: it runs to the end
    assert summary["epochs_run"] == 2
    assert (tmp_path / "student" / "model.pt").exists()


def _distill_with(args, loop):
    """``run_distillation`` with ``loop`` as the per-worker function (it builds the same WorkerConfig)."""
    import optforge.tasks.workers.distill_worker as dw

    original = dw.run_training
    dw.run_training = lambda *a, **k: original(*a, **k, loop=loop)
    try:
        return run_distillation(*args)
    finally:
        dw.run_training = original
