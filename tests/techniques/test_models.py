import datetime
import json
import pickle
import sys

import pytest
import torch
from pydantic import ValidationError

from optforge.tasks.techniques.contract import table_contract
from optforge.tasks.techniques.models.models import ModelConfig, count_params, read_spec, save_model
from optforge.tasks.techniques.models.rebuild import build_model, load_model
from tests.techniques.helpers import table_spec


def spec(**cfg):
    return table_spec(ModelConfig(**cfg).to_dict(), 64, 10, (1, 8, 8))


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_zoo_shapes_and_round_trip(tmp_path, arch):
    model = build_model(spec(arch=arch))
    x = torch.randn(5, 64)
    assert model(x).shape == (5, 10)
    save_model(model, spec(arch=arch), tmp_path)
    loaded, loaded_spec = load_model(tmp_path)
    model.eval()
    torch.testing.assert_close(loaded(x), model(x))
    assert loaded_spec.inputs.image_shape == (1, 8, 8) and loaded_spec.num_classes == 10


def test_mlp_widths():
    model = build_model(spec(hidden=(32, 16)))
    assert count_params(model) == (64 * 32 + 32) + (32 * 16 + 16) + (16 * 10 + 10)


def test_user_factory(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def tiny(num_features, num_classes, width=8):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(num_features, width), torch.nn.Linear(width, num_classes))\n"
        "def not_a_model(num_features, num_classes):\n"
        "    return 42\n"
        "def fixed(width):\n"  # names none of the data's shapes: gets model.kwargs only
        "    return torch.nn.Linear(width, 2)\n"
        "def from_contract(contract):\n"
        "    return torch.nn.Linear(contract.num_features, contract.num_classes)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model(table_spec(ModelConfig(arch="mymodels:tiny", kwargs={"width": 4}).to_dict(), 64, 10))
    assert count_params(model) == 64 * 4 + 4 + 4 * 10 + 10
    assert count_params(build_model(table_spec(ModelConfig(arch="mymodels:fixed", kwargs={"width": 3}).to_dict(),
                                               64, 10))) == 3 * 2 + 2
    assert count_params(build_model(table_spec(ModelConfig(arch="mymodels:from_contract").to_dict(), 64, 10))) == 650
    with pytest.raises(ValueError, match="model.arch: factory 'mymodels:not_a_model' returned int"):
        build_model(table_spec(ModelConfig(arch="mymodels:not_a_model").to_dict(), 64, 10))
    with pytest.raises(ValueError, match="model.arch: module 'mymodels' has no callable 'nope'"):
        build_model(table_spec(ModelConfig(arch="mymodels:nope").to_dict(), 64, 10))
    sys.modules.pop("mymodels", None)


def test_bad_model_config():
    with pytest.raises(ValueError, match="model.arch: cannot import module 'no_such_pkg.models'"):
        build_model(table_spec(ModelConfig(arch="no_such_pkg.models:make").to_dict(), 64, 10))
    with pytest.raises(ValidationError, match="arch"):
        ModelConfig(arch="resnet")
    with pytest.raises(ValidationError, match="hidden"):
        ModelConfig(hidden=(0,))
    with pytest.raises(ValueError, match="needs image data"):
        build_model(table_spec(ModelConfig(arch="cnn").to_dict(), 64, 10, None))


def test_specs_written_before_the_contract_read_as_tables(tmp_path):
    """model.json files from before the input contract held num_features/num_classes/image_shape."""
    (tmp_path / "model.json").write_text(json.dumps({"config": ModelConfig(arch="cnn").to_dict(), "num_features": 64,
                                                     "num_classes": 10, "image_shape": [1, 8, 8], "factorized": None}))
    old = read_spec(tmp_path)
    assert old.inputs == table_contract(64, 10, (1, 8, 8)) and old.factorized is None and old.hf_config is None
    assert build_model(old)(torch.randn(2, 64)).shape == (2, 10)


def test_load_refuses_pickled_code(tmp_path):
    model = build_model(spec())
    save_model(model, spec(), tmp_path)
    # Any non-tensor global (here a datetime) stands for a payload that would run code when unpickled.
    torch.save({"net.0.weight": datetime.datetime.now()}, tmp_path / "model.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_model(tmp_path)


def test_transforms_replay_in_the_order_applied_and_old_specs_still_load(tmp_path):
    """A spec lists what was applied, in order; a model.json from before (one optional field per technique)
    reads as the same transforms and rebuilds the same model."""
    from optforge.tasks.techniques.compression.factorize import FactorizeConfig, factorize
    from optforge.tasks.techniques.compression.graph_prune import prune_channels

    spec = table_spec(ModelConfig(hidden=(32, 16)).to_dict(), 8, 3)
    torch.manual_seed(0)
    model = build_model(spec)
    model, history = prune_channels(model, spec.inputs, 0.5)
    spec = spec.then("prune", {"history": history})
    model, spec, _ = factorize(model, spec, FactorizeConfig(mode="ratio", rank_ratio=0.25))
    assert [name for name, _ in spec.transforms] == ["prune", "factorize"]
    folder = save_model(model, spec, tmp_path / "new")
    x = torch.randn(4, 8)
    rebuilt, read = load_model(folder)
    assert read == spec and torch.equal(rebuilt(x), model(x))

    raw = json.loads((folder / "model.json").read_text())
    legacy = {"config": raw["config"], "contract": raw["contract"], "hf_config": None,
              "pruned": history, "factorized": spec.factorized}
    (folder / "model.json").write_text(json.dumps(legacy))
    old, _ = load_model(folder)
    assert torch.equal(old(x), model(x))
