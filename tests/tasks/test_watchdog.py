"""The watchdog's judgement, on a fake clock: which ranks are silent, and what the message names."""

from optforge.tasks.workers.watchdog import Heartbeat, RankWatch


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _watch(world: int = 2, stall: float = 30.0):
    clock = Clock()
    return RankWatch("train", world, stall, clock), clock


def test_nothing_is_judged_before_the_first_event():
    watch, clock = _watch()
    clock.now += 10_000  # Ray may take long to place the workers: that is not a stall
    assert watch.stalled() is None


def test_a_rank_that_stopped_while_its_peer_finished_is_named():
    watch, clock = _watch()
    for rank in (0, 1):
        watch.observe({"kind": "hello", "rank": rank, "epoch": -1, "phase": "starting", "controller": None})
    watch.observe({"kind": "finished", "rank": 0, "epoch": 20, "phase": "finished"})
    watch.observe({"kind": "beat", "rank": 1, "epoch": 21, "phase": "training"})
    clock.now += 29
    assert watch.stalled() is None
    clock.now += 2
    message = watch.stalled()
    assert message.startswith("train: rank(s) 1 stopped reporting")
    assert "epoch 22, training" in message and "rank 0 finished after epoch 21" in message
    assert "train.stall_timeout_s" in message and "next run resumes" in message


def test_a_rank_that_never_said_hello_counts_from_the_first_event():
    watch, clock = _watch()
    watch.observe({"kind": "hello", "rank": 0, "epoch": -1, "phase": "starting", "controller": None})
    clock.now += 20
    watch.observe({"kind": "beat", "rank": 0, "epoch": 0, "phase": "training"})
    clock.now += 11
    message = watch.stalled()
    assert message and "rank(s) 1 stopped" in message and "before its first epoch" in message


def test_a_new_hello_after_a_restart_clears_finished_and_all_finished_is_no_stall():
    watch, clock = _watch()
    watch.observe({"kind": "finished", "rank": 0, "epoch": 3, "phase": "finished"})
    watch.observe({"kind": "hello", "rank": 0, "epoch": -1, "phase": "starting", "controller": "c"})
    assert watch.controller == "c" and not watch.ranks[0].finished
    watch.observe({"kind": "finished", "rank": 0, "epoch": 5, "phase": "finished"})
    watch.observe({"kind": "finished", "rank": 1, "epoch": 5, "phase": "finished"})
    clock.now += 1_000
    assert watch.stalled() is None


def test_heartbeat_sends_on_a_new_phase_and_otherwise_at_most_every_every_s():
    sent = []
    beat = Heartbeat(sent.append, rank=1, every_s=3600)
    beat.hello()
    for _ in range(5):
        beat.beat(0, "training")
    beat.beat(0, "evaluating")
    beat.finished(0)
    assert [(e["kind"], e["phase"]) for e in sent] == [("hello", "starting"), ("beat", "training"),
                                                       ("beat", "evaluating"), ("finished", "finished")]
    assert all(e["rank"] == 1 for e in sent)
