"""The search's early stop: a Ray Tune scheduler that ends trials whose fine-tuning cannot reach the floor.

Trials report each fine-tuning epoch's validation accuracy (``flows/tune_trial.py``). Within one
fine-tuning phase (a prune round's, the student's distillation, QAT's) a learning curve gains less per
epoch as it goes, so the best gain seen so far in the phase, times the epochs left, bounds what the
phase can still add. A trial whose bound stays more than ``margin`` points under the floor is stopped:
the steps after a phase (more pruning, quantization) do not win accuracy back. A phase decides nothing
before it has reported ``GRACE_EPOCHS`` epochs unless the one reported is its last: one epoch-to-epoch
change is noise (the second epoch of a fine-tune often dips under the first's learning rate), and a phase
resumed from a checkpoint (Ray Train after a worker failure) starts counting again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

GRACE_EPOCHS = 3


@dataclass
class Phase:
    """Where a trial's current fine-tuning phase stands."""

    label: str
    epoch: int
    accuracy: float
    best_gain: float | None = None  # None until the phase has two epochs
    seen: int = 1  # epochs reported in this phase


def advance(phase: Phase | None, label: str, epoch: int, accuracy: float) -> Phase:
    """The phase after one more epoch report; a new label or an epoch count that restarts begins a new phase."""
    if phase is None or phase.label != label or epoch <= phase.epoch:
        return Phase(label, epoch, accuracy)
    gain = (accuracy - phase.accuracy) / (epoch - phase.epoch)
    best = gain if phase.best_gain is None else max(phase.best_gain, gain)
    return Phase(label, epoch, accuracy, best, phase.seen + 1)


def hopeless(phase: Phase, epochs: int, floor: float, margin: float) -> str | None:
    """Why the phase cannot reach ``floor - margin`` by its last epoch (``epochs`` in all), or None."""
    left = epochs - 1 - phase.epoch
    if left > 0 and phase.seen < GRACE_EPOCHS:
        return None
    bound = phase.accuracy + left * max(0.0, phase.best_gain or 0.0)
    if bound >= floor - margin:
        return None
    return (f"{phase.label} epoch {phase.epoch + 1}/{epochs}: validation accuracy {phase.accuracy:.2f}%, at most "
            f"{bound:.2f}% by the phase's end, below the floor {floor:.2f}% less the margin {margin:g}")


class FloorScheduler(FIFOScheduler):
    """FIFO order, plus ``hopeless`` on every reported epoch; ``on_stop(result, reason)`` records each stop."""

    def __init__(self, floor: float, margin: float, on_stop: Callable[[dict, str], None] | None = None):
        super().__init__()
        self.floor, self.margin, self.on_stop = floor, margin, on_stop
        self._phases: dict[str, Phase] = {}

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if "val_accuracy" not in result:
            return TrialScheduler.CONTINUE
        phase = advance(self._phases.get(trial.trial_id), result["phase"], int(result["epoch"]),
                        float(result["val_accuracy"]))
        self._phases[trial.trial_id] = phase
        reason = hopeless(phase, int(result["epochs"]), self.floor, self.margin)
        if reason is None:
            return TrialScheduler.CONTINUE
        if self.on_stop is not None:
            self.on_stop(result, reason)
        return TrialScheduler.STOP
