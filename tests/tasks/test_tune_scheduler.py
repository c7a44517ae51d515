"""The floor scheduler's rule, and the timing lock between trials: pure Python, no Ray cluster."""

import fcntl
import os
import threading
import time

from ray.tune.schedulers import TrialScheduler

from optforge.tasks.runtime.idle import building, timing
from optforge.tasks.workers.tune_scheduler import FloorScheduler, advance, hopeless


def _phase(*accuracies, label="prune fine-tune"):
    phase = None
    for epoch, acc in enumerate(accuracies):
        phase = advance(phase, label, epoch, acc)
    return phase


def test_a_phase_that_cannot_climb_to_the_floor_is_hopeless():
    # 60 -> 70 -> 75, best gain 10, 2 epochs left: at most 95 by the end -> not hopeless at a floor of 95
    assert hopeless(_phase(60, 70, 75), epochs=5, floor=95, margin=1) is None
    # 60 -> 61 -> 62, 2 left: at most 64 -> hopeless
    assert "below the floor 95.00%" in hopeless(_phase(60, 61, 62), epochs=5, floor=95, margin=1)
    # a dip at the second epoch decides nothing yet (grace), a flat third one does
    assert hopeless(_phase(80, 79), epochs=6, floor=95, margin=1) is None
    assert hopeless(_phase(80, 79, 79), epochs=6, floor=95, margin=1) is not None
    # last epoch: its accuracy is what the phase ends with
    assert hopeless(_phase(93.5), epochs=1, floor=95, margin=1) is not None
    assert hopeless(_phase(94.5), epochs=1, floor=95, margin=1) is None
    # first epochs of several: no decision
    assert hopeless(_phase(10), epochs=5, floor=95, margin=1) is None
    assert hopeless(_phase(10, 10), epochs=5, floor=95, margin=1) is None


def test_a_phase_resumed_from_a_checkpoint_gets_its_grace_again():
    resumed = advance(None, "distill", 4, 80)  # Ray Train restarted at epoch 5 of 40 after a worker failure
    assert hopeless(resumed, epochs=40, floor=95, margin=1) is None
    assert hopeless(advance(resumed, "distill", 5, 80.5), epochs=40, floor=95, margin=1) is None


def test_a_new_round_starts_a_new_phase():
    phase = _phase(80, 90)
    restarted = advance(phase, "prune fine-tune", 0, 70)  # the next pruning round's first epoch
    assert restarted.best_gain is None and restarted.accuracy == 70
    assert advance(phase, "qat fine-tune", 2, 91).label == "qat fine-tune"


def test_the_scheduler_stops_and_records_only_hopeless_trials():
    stops = []
    scheduler = FloorScheduler(floor=95, margin=1, on_stop=lambda result, why: stops.append((result["trial"], why)))

    class Trial:
        def __init__(self, trial_id):
            self.trial_id = trial_id

    good, bad = Trial("a"), Trial("b")
    decide = lambda trial, epoch, acc: scheduler.on_trial_result(None, trial, {
        "val_accuracy": acc, "phase": "prune fine-tune", "epoch": epoch, "epochs": 2, "trial": trial.trial_id})
    assert decide(good, 0, 90) == decide(bad, 0, 60) == TrialScheduler.CONTINUE
    assert decide(good, 1, 96) == TrialScheduler.CONTINUE
    assert decide(bad, 1, 70) == TrialScheduler.STOP
    assert scheduler.on_trial_result(None, good, {"accuracy": 96}) == TrialScheduler.CONTINUE  # a final report
    assert [t for t, _ in stops] == ["b"]


def _held(path) -> bool:
    """Whether another holder has ``path`` locked (a non-blocking try from a fresh file description)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _wait(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_timing_waits_for_builds_and_holds_new_ones_back(tmp_path):
    events = []
    release_a = threading.Event()

    def build(name, until):
        with building(tmp_path):
            events.append(f"{name} start")
            until()
            events.append(f"{name} end")

    def time_it():
        with timing(tmp_path):
            events.append("timing start")
            time.sleep(0.2)
            events.append("timing end")

    first = threading.Thread(target=build, args=("a", lambda: release_a.wait(30)))
    first.start()
    _wait(lambda: events == ["a start"])
    timer = threading.Thread(target=time_it)
    timer.start()
    _wait(lambda: _held(tmp_path / "turnstile.lock"))  # the timer waits for "a", holding the turnstile
    late = threading.Thread(target=build, args=("b", lambda: None))  # arrives while the timer waits
    late.start()
    time.sleep(0.2)
    assert events == ["a start"]  # neither the timer nor the late build got in while "a" builds
    release_a.set()
    for t in (first, timer, late):
        t.join(30)
    assert events == ["a start", "a end", "timing start", "timing end", "b start", "b end"]
