"""Live progress (tasks/runtime/progress.py) and a quiet terminal: what a user sees while `optforge run` trains."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from optforge.tasks.runtime.progress import ProgressFeed, StageProgress

ROOT = Path(__file__).resolve().parents[2]


def test_a_feed_reports_every_epoch_and_steps_only_in_long_epochs():
    sent = []
    slow, fast = ProgressFeed(sent.append, epochs=2, every_s=0.0), ProgressFeed(sent.append, epochs=2, every_s=3600)
    slow.batch(0, 5, 10)
    slow.batch(0, 10, 10)  # the epoch's last batch: its epoch event follows, no step
    slow.epoch(0, {"train_loss": 0.5, "val_accuracy": 90.0, "lr": 0.1})
    fast.batch(1, 5, 10)  # less than every_s since the last event: nothing
    assert sent == [{"kind": "step", "epoch": 0, "epochs": 2, "done": 5, "total": 10},
                    {"kind": "epoch", "epoch": 0, "epochs": 2, "metrics": {"train_loss": 0.5, "val_accuracy": 90.0}}]


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_the_driver_shows_each_event_as_a_line():
    logger, handler = logging.getLogger("optforge.test_progress"), _Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    with StageProgress("train", 2, logger) as progress:
        feed = ProgressFeed(progress.show, 2, every_s=0.0)
        feed.batch(0, 3, 12)
        feed.epoch(0, {"train_loss": 0.41234, "val_accuracy": 91.3})
        feed.epoch(1, {"train_loss": 0.2, "val_accuracy": 95.0})
    assert re.fullmatch(r"train: epoch 1/2  step 3/12  \[\d+ s\]", progress.lines[0])  # no rate yet
    assert re.fullmatch(r"train: epoch 1/2  train_loss 0\.4123  val_accuracy 91\.30  \[\d+ s, ~\d+ s left\]",
                        progress.lines[1])
    assert progress.lines[2].startswith("train: epoch 2/2") and "left" not in progress.lines[2]
    assert handler.lines == progress.lines


@pytest.mark.slow
def test_a_real_run_shows_every_epoch_before_the_stage_ends_and_no_library_noise(tiny_config, tmp_path):
    cfg = yaml.safe_load(tiny_config.read_text())
    cfg["train"]["epochs"] = 3
    tiny_config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "optforge.flows.cli", "run", "--config", str(tiny_config)], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    lines = text.splitlines()
    done = next(i for i, line in enumerate(lines) if re.search(r"stage train +done in", line))
    epochs = [i for i, line in enumerate(lines) if re.search(r"train: epoch \d/3  train_loss", line)]
    assert len(epochs) == 3 and max(epochs) < done, text[-3000:]  # fed from the Ray workers while training ran
    assert "Serializing optimized model" not in text  # ONNX Runtime's warning about our own optimized-graph record
    assert "torchvision is not installed" not in text and "UserWarning" not in text
