"""The technique registry (tasks/techniques/registry.py): each record agrees with the pipeline config and the
chain runner, and a chain is valid exactly when each step takes the form the step before gives."""

import pytest

from optforge.flows.chains import RUNS
from optforge.flows.params import PipelineConfig
from optforge.tasks.techniques.registry import (
    CHAIN_STEPS,
    MACHINE_BOUND_STAGES,
    TECHNIQUES,
    Form,
    chain_problem,
    expand,
    section,
    variant_name,
)


def test_every_record_names_its_config_section_and_every_chain_step_has_a_run():
    cfg = PipelineConfig()
    for technique in TECHNIQUES.values():
        assert isinstance(section(cfg, technique), technique.config), technique.name
        for key in technique.search:  # tune's default keys exist in the section
            assert key in technique.config.model_fields, f"{technique.name}.search: {key}"
    assert set(RUNS) == set(CHAIN_STEPS)
    assert MACHINE_BOUND_STAGES == {"benchmark", "tensorrt", "tvm"}


def test_each_technique_has_one_name_for_its_step_stage_module_and_config_key():
    """``static`` is the step, the stage (Prefect task and MLflow run), ``onnx/static.py`` and ``onnx.static``."""
    import importlib
    import pkgutil

    from prefect import Task

    import optforge.tasks.stages as stages

    stage_names = set()
    for info in pkgutil.iter_modules(stages.__path__):
        module = importlib.import_module(f"{stages.__name__}.{info.name}")
        stage_names |= {v.name for v in vars(module).values() if isinstance(v, Task)}
    for name, technique in TECHNIQUES.items():
        assert name in stage_names, f"no stage named {name}"
        assert technique.config_key.rsplit(".", 1)[1] == name
        module = importlib.import_module(technique.config.__module__)
        assert module.__name__.rsplit(".", 1)[1] == name, f"{name}'s config lives in {module.__name__}"


@pytest.mark.parametrize("chain, problem", [
    (("distill", "prune", "quantize"), None),
    (("circulant", "early_exit", "quantize"), None),  # the routing survives export and dynamic INT8
    (("prune", "distill"), "distill cannot follow prune"),  # distill takes only the teacher
    (("early_exit", "static"), "static cannot follow early_exit"),  # static QDQ drops the routing
    (("qat", "quantize"), "quantize cannot follow qat"),  # nothing takes INT8
    (("fuse",), "alone repeat the baseline variants"),
])
def test_a_chain_is_valid_when_each_step_takes_what_the_one_before_gives(chain, problem):
    found = chain_problem(chain)
    assert (found is None) if problem is None else (problem in found)


def test_an_int8_step_after_a_pytorch_model_gets_its_export_and_names_follow_the_records():
    assert expand(("prune", "static")) == ("prune", "export", "static")
    assert expand(("distill", "fuse", "quantize")) == ("distill", "fuse", "quantize")  # fuse exports its own graph
    assert variant_name(expand(("distill", "fuse", "quantize")), "_") == "distill_fused_int8"
    assert variant_name(("early_exit", "export")) == "early_exit-onnx"
    starts = [name for name in CHAIN_STEPS if TECHNIQUES[name].takes(Form.TEACHER)]
    assert "distill" in starts and "quantize" not in starts


def test_a_record_says_why_it_cannot_apply_to_a_model():
    from optforge.tasks.techniques.compression.distill import DistillConfig
    from optforge.tasks.techniques.contract import table_contract
    from optforge.tasks.techniques.models.models import MLP
    from optforge.tasks.techniques.registry import Subject

    contract = table_contract(8, 3)
    mlp = Subject("mlp", None, contract, lambda: MLP(8, 3, (16, 16)))
    fuse, exits, distill = (TECHNIQUES[n] for n in ("fuse", "early_exit", "distill"))
    assert "not one" in fuse.applies(mlp, None)  # ORT's transformer fusion needs a transformer
    assert fuse.applies(Subject("huggingface", {"model_type": "bert"}, contract, mlp.build), None) is None
    assert exits.applies(mlp, None) is None  # the MLP's hidden layers are its blocks
    assert "factory model" in exits.applies(Subject("pkg.models:net", None, contract, mlp.build), None)
    # distill asks about the teacher: the default student (64 k weights) is not smaller than this tiny MLP
    assert "not fewer than the model's" in distill.applies(mlp, DistillConfig())
    assert distill.applies(mlp, DistillConfig(derive="width")) is None  # a narrowed teacher always is
    assert "num_hidden_layers" in distill.applies(mlp, DistillConfig(derive="layers"))
    assert all(TECHNIQUES[name].applies is None for name in ("prune", "quantize"))  # they apply to any model


def test_a_qat_step_settles_its_weight_range_before_the_cache_key_is_taken():
    from optforge.flows.chains import Step
    from optforge.tasks.runtime.refs import Format, ModelRef
    from optforge.tasks.techniques.compression.qat import QatConfig
    from optforge.tasks.techniques.measurement.benchmark import int8_dot_saturates

    seen = {}

    def stage(task, **kwargs):  # the flow's StageRunner, recording what the task would be keyed on
        seen.update(kwargs)
        return ModelRef("qat", Format.ONNX, "unused.onnx", "0")

    ref = ModelRef("teacher", Format.TORCH, "unused", "0")
    RUNS["qat"](Step(stage, "qat_int8", QatConfig(), ref, ref, None, "work"))
    assert seen["cfg"].reduce_range is int8_dot_saturates()  # this CPU's answer, in the task's parameters
    RUNS["qat"](Step(stage, "qat_int8", QatConfig(reduce_range=True), ref, ref, None, "work"))
    assert seen["cfg"].reduce_range is True  # a value the config sets wins
