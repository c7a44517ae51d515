import json
from pathlib import Path

import pytest
import yaml

from optforge.flows.params import ConfigError, PipelineConfig, apply_overrides, load_config, validate

ROOT = Path(__file__).resolve().parents[2]


def test_default_yaml_matches_the_defaults():
    assert load_config(ROOT / "configs" / "default.yaml") == PipelineConfig()


def test_config_round_trips_through_json_and_yaml():
    cfg = load_config(None, ["train.optimizer=lamb", "model.hidden=[64, 32]", "data.image_shape=[1, 8, 8]"])
    assert PipelineConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert PipelineConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


def test_overrides_are_typed():
    cfg = load_config(None, ["train.epochs=3", "train.lr=0.05", "register.model_name=m"])
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.05 and cfg.register.model_name == "m"
    assert apply_overrides({"train": {"epochs": 1}}, ["train.epochs=2"]) == {"train": {"epochs": 2}}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.epochz=3"], "train.epochz: unknown key"),
        (["trian.epochs=3"], "trian: unknown key"),
        (["train.lr=-0.1"], "train.lr: Input should be greater than 0 (got -0.1)"),
        (["train.optimizer=adam9"], "train.optimizer"),
        (["train.epochs"], "expected KEY=VALUE"),
        (["train.epochs.x=1"], "'epochs' is a value, not a section"),
        (["register.model_name=../../etc"], "register.model_name: String should match pattern"),
        (["train.strategy=hogwild"], "train.strategy: Input should be 'ssgd', 'model_averaging', 'asgd' or 'fsdp'"),
        (["train.local_steps=0"], "train.local_steps: Input should be greater than or equal to 1"),
        (["train.staleness_bound=-1"], "train.staleness_bound"),
        (["train.strategy=fsdp", "train.optimizer=lars"], "train.optimizer: lars scales each layer's step by its whole"),
        (["train.strategy=fsdp", "train.num_workers=1"], "train.num_workers: strategy=fsdp shards the model across"),
        (["train.mix=tail"], "train.mix: 'tail' mixes data.new_source into the end of each epoch"),
        (["train.tail_fraction=0"], "train.tail_fraction"),
        (["train.loader.persistent_workers=true"], "train.loader.persistent_workers needs train.loader.workers > 0"),
        (["compress.distill.train.init_from=runs:/x/model"], "compress.distill.train.init_from"),
    ],
)
def test_bad_config_names_the_field(overrides, message):
    raw = {"train": {"epochs": 2}}
    with pytest.raises(ConfigError) as err:
        validate(apply_overrides(raw, overrides))
    assert message in str(err.value)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_kl_weight_needs_the_model_it_keeps_close_to():
    with pytest.raises(ConfigError, match="train.kl_weight: .* set train.init_from"):
        load_config(None, ["train.kl_weight=0.5"])


def test_a_typed_config_is_the_flows_parameter_and_a_bad_value_is_rejected_before_any_stage(mlflow_store):
    """What the Prefect UI's form and a deployment send: the config as typed fields, validated by Prefect
    before the flow body (and so any stage or MLflow run) starts."""
    from mlflow import MlflowClient
    from prefect.exceptions import ParameterTypeError
    from prefect.utilities.callables import parameter_schema

    from optforge.flows.optimize import optimize

    schema = parameter_schema(optimize.fn).model_dump()
    assert list(schema["properties"]) == ["config", "config_path", "overrides", "force"]
    lr = schema["definitions"]["TrainConfig"]["properties"]["lr"]
    assert lr == {"default": 0.001, "description": "peak learning rate (after warm-up)", "exclusiveMinimum": 0,
                  "title": "Lr", "type": "number"}
    with pytest.raises(ParameterTypeError, match="lr"):
        optimize(config={"train": {"lr": -1}})
    assert MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()]) == []
    assert load_config(None, ["train.epochs=2"], PipelineConfig.from_dict({"train": {"lr": 0.5}})).train.lr == 0.5
    with pytest.raises(ConfigError, match="config and config_path .*not both"):
        load_config("x.yaml", [], PipelineConfig())
