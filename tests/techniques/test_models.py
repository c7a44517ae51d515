import datetime
import pickle
import sys

import pytest
import torch
from pydantic import ValidationError

from tasks.techniques.models import ModelConfig, ModelSpec, build_model, count_params, load_model, save_model


def spec(**cfg):
    return ModelSpec(ModelConfig(**cfg).to_dict(), 64, 10, (1, 8, 8))


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_zoo_shapes_and_round_trip(tmp_path, arch):
    model = build_model(spec(arch=arch))
    x = torch.randn(5, 64)
    assert model(x).shape == (5, 10)
    save_model(model, spec(arch=arch), tmp_path)
    loaded, loaded_spec = load_model(tmp_path)
    model.eval()
    torch.testing.assert_close(loaded(x), model(x))
    assert loaded_spec.image_shape == (1, 8, 8)


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
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model(ModelSpec(ModelConfig(arch="mymodels:tiny", kwargs={"width": 4}).to_dict(), 64, 10))
    assert count_params(model) == 64 * 4 + 4 + 4 * 10 + 10
    with pytest.raises(ValueError, match="model.arch: factory 'mymodels:not_a_model' returned int"):
        build_model(ModelSpec(ModelConfig(arch="mymodels:not_a_model").to_dict(), 64, 10))
    with pytest.raises(ValueError, match="model.arch: module 'mymodels' has no callable 'nope'"):
        build_model(ModelSpec(ModelConfig(arch="mymodels:nope").to_dict(), 64, 10))
    sys.modules.pop("mymodels", None)


def test_bad_model_config():
    with pytest.raises(ValueError, match="model.arch: cannot import module 'no_such_pkg.models'"):
        build_model(ModelSpec(ModelConfig(arch="no_such_pkg.models:make").to_dict(), 64, 10))
    with pytest.raises(ValidationError, match="arch"):
        ModelConfig(arch="resnet")
    with pytest.raises(ValidationError, match="hidden"):
        ModelConfig(hidden=(0,))
    with pytest.raises(ValueError, match="needs image data"):
        build_model(ModelSpec(ModelConfig(arch="cnn").to_dict(), 64, 10, None))


def test_load_refuses_pickled_code(tmp_path):
    model = build_model(spec())
    save_model(model, spec(), tmp_path)
    # Any non-tensor global (here a datetime) stands for a payload that would run code when unpickled.
    torch.save({"net.0.weight": datetime.datetime.now()}, tmp_path / "model.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_model(tmp_path)
