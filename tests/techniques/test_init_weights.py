"""Starting weights for fine-tuning: accepted when they fit, refused with the field named when not."""

import pytest
import torch

from optforge.tasks.techniques.contract import image_contract
from optforge.tasks.techniques.models.init_weights import apply_init, load_init_state
from optforge.tasks.techniques.models.models import ModelSpec, save_model
from optforge.tasks.techniques.models.rebuild import build_model
from tests.techniques.helpers import table_spec

MLP = {"arch": "mlp", "hidden": [16], "channels": [8], "dropout": 0.0, "kwargs": {}}


def test_fitting_weights_load(tmp_path):
    spec = table_spec(MLP, 8, 3)
    torch.manual_seed(1)
    trained = build_model(spec)
    save_model(trained, spec, tmp_path / "m")
    torch.manual_seed(2)
    fresh = apply_init(build_model(spec), load_init_state(tmp_path / "m", spec))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.state_dict().values()))


@pytest.mark.parametrize("other, message", [
    (table_spec(MLP, 9, 3), "takes 9 features and 3 classes, but this run's data has 8 features and 3 classes"),
    (table_spec(MLP, 8, 4), "takes 8 features and 4 classes"),
    (table_spec({**MLP, "hidden": [32]}, 8, 3), "do not fit the configured model"),
    (ModelSpec(MLP, image_contract(2, 2, 3, {}).to_dict()),  # 8 values per sample too, but another kind of input
     "takes image inputs pixel_values [2, 2, 2] and 3 classes, but this run's data has 8 features and 3 classes"),
])
def test_incompatible_shapes_name_the_field(tmp_path, other, message):
    save_model(build_model(other), other, tmp_path / "m")
    with pytest.raises(ValueError, match="train.init_from") as err:
        load_init_state(tmp_path / "m", table_spec(MLP, 8, 3), "runs:/abc/model")
    assert message in str(err.value) and "runs:/abc/model" in str(err.value)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ValueError, match="train.init_from: .* lacks model.json"):
        load_init_state(tmp_path, table_spec(MLP, 8, 3))
