"""The search's config and its draw of trials: pure, no Ray."""

import pytest

from optforge.flows.params import ConfigError, load_config
from optforge.flows.tune_config import TUNE_CHAINS, default_space, draw_trials, relevant, trial_overrides


def test_a_draw_is_distinct_seeded_and_keeps_only_the_keys_a_chain_reads():
    space = {"compress.prune.sparsity": [0.3, 0.5], "compress.factorize.energy": [0.6, 0.8],
             "onnx.static.per_channel": [False, True]}
    chains = [("prune", "quantize"), ("factorize", "static")]
    drawn = draw_trials(chains, space, 100, seed=1)
    assert len(drawn) == 2 + 4  # every distinct trial once: prune x 2, factorize x 2 x per_channel x 2
    assert len({repr(t) for t in drawn}) == len(drawn)
    for t in drawn:
        assert set(t["values"]) == {k for k in space if relevant(k, t["chain"])}
    assert draw_trials(chains, space, 3, seed=1) == draw_trials(chains, space, 3, seed=1)
    assert draw_trials(chains, space, 3, seed=1) != draw_trials(chains, space, 3, seed=2)


def test_a_chain_with_many_settings_does_not_crowd_out_the_others():
    space = {"compress.prune.sparsity": [i / 100 for i in range(1, 60)]}
    drawn = draw_trials([("prune", "quantize"), ("distill", "quantize")], space, 4, seed=0)
    assert ["distill", "quantize"] in [t["chain"] for t in drawn]


def test_relevance_follows_the_steps_a_chain_runs():
    assert relevant("onnx.export.opset", ("prune", "quantize"))  # quantize implies an export
    assert not relevant("onnx.export.opset", ("fuse", "quantize"))  # fuse exports its own graph
    assert relevant("onnx.static.method", ("prune", "static"))
    assert not relevant("onnx.static.method", ("prune", "quantize"))
    assert not relevant("compress.distill.student.hidden", ("prune", "quantize"))


def test_overrides_round_trip_through_the_config_loader():
    values = {"compress.distill.student.hidden": [64, 32], "onnx.static.method": "percentile",
              "compress.prune.sparsity": 0.7, "onnx.static.per_channel": True}
    cfg = load_config(None, trial_overrides(values))
    assert cfg.compress.distill.student.hidden == (64, 32)
    assert cfg.onnx.static.method == "percentile" and cfg.onnx.static.per_channel is True
    assert cfg.compress.prune.sparsity == 0.7


def test_the_default_space_scales_the_student_to_the_teacher():
    wide = default_space(load_config(None, ["model.hidden=[1024, 512]"]))
    assert wide["compress.distill.student.hidden"] == [[32, 16], [64, 32], [128, 64]]
    every_chain = {k for chain in TUNE_CHAINS for k in wide if relevant(k, chain)}
    assert every_chain == set(wide)  # no setting that no chain reads


@pytest.mark.parametrize("override, field", [
    ("tune.space={train.lr: [0.1]}", "train.lr"),
    ("tune.space={compress.prune.sparsity: []}", "compress.prune.sparsity"),
    ("tune.chains=[[quantize]]", "needs at least one of"),
    ("tune.chains=[]", "tune.chains"),
    ("tune.trials=0", "tune.trials"),
])
def test_bad_search_configs_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[")):
        load_config(None, [override])


def test_trials_that_cannot_apply_are_not_drawn():
    space = {"compress.distill.student.hidden": [[8], [512]], "compress.prune.sparsity": [0.3]}
    too_big = lambda chain, values: values.get("compress.distill.student.hidden") != [512]
    drawn = draw_trials([("distill", "quantize"), ("prune", "quantize")], space, 10, seed=0, allowed=too_big)
    assert sorted(str(t["values"]) for t in drawn) == sorted(
        [str({"compress.distill.student.hidden": [8]}), str({"compress.prune.sparsity": 0.3})])
