"""A model folder sets the defaults the config leaves unset (tasks/techniques/models/folder_defaults.py and its
use by the data adapters): the token length within the model's positions, an image processor's size and
normalisation, one channel from the model config, and a fine-tuned head's class order."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from optforge.flows.examples import write_bert
from optforge.tasks.techniques.data.data import DataConfig, class_order, load_splits
from optforge.tasks.techniques.data.sources import prepare
from optforge.tasks.techniques.models.folder_defaults import (
    covering_length,
    image_defaults,
    model_classes,
    position_limit,
)

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.mark.parametrize("hf, limit", [
    ({"model_type": "bert", "max_position_embeddings": 64}, 64),
    ({"model_type": "roberta", "max_position_embeddings": 66, "pad_token_id": 1}, 64),  # 2 reserved by the offset
    ({"model_type": "deberta-v2", "max_position_embeddings": 512}, None),  # relative positions: no table bounds it
])
def test_the_position_limit_follows_the_family(hf, limit):
    found = position_limit(hf)
    assert (found[0] if found else None) == limit
    assert position_limit(hf, tokenizer_max=48)[0] == 48  # the tokenizer's own limit counts too


def test_the_covering_length_is_a_multiple_of_8_within_the_limit():
    lengths = list(range(1, 101))  # 99% of them fit in 100 tokens -> 104
    assert covering_length(lengths, None) == 104
    assert covering_length(lengths, 64) == 64
    assert covering_length([3, 4], None) == 8


def test_generic_labels_are_no_class_names():
    assert model_classes({"id2label": {"0": "LABEL_0", "1": "LABEL_1"}}) is None
    assert model_classes({"id2label": {"1": "sports", "0": "weather"}}) == ["weather", "sports"]
    assert class_order(["b", "a"], preferred=["b", "a"]) == ["b", "a"]  # the head's order, same names
    assert class_order(["b", "a"], preferred=["c", "a"]) == ["a", "b"]  # other names: sorted
    with pytest.raises(ValueError, match="data.classes"):
        class_order(["b", "a"], wanted=["a", "c"])


def _texts(path, n=120, seed=0):
    rng = np.random.default_rng(seed)
    rows = [{"text": " ".join(rng.choice(WORDS, size=int(rng.integers(3, 30)))), "label": ["weather", "sports"][i % 2]}
            for i in range(n)]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return [r["text"] for r in rows]


def test_text_length_follows_the_data_within_a_64_position_model(tmp_path):
    texts = _texts(tmp_path / "t.csv")
    bert = write_bert(tmp_path / "bert", texts, num_labels=2, positions=64)
    cfg = DataConfig(source=str(tmp_path / "t.csv"), text_column="text")
    folder = prepare(cfg, tmp_path / "data", str(bert), max_positions=64)
    contract = load_splits(folder).contract
    assert contract.sequence_length <= 64 and contract.sequence_length % 8 == 0
    assert "covers 99%" in contract.preprocessing["max_length_from"]
    with pytest.raises(ValueError, match=r"data.max_length: 128 exceeds 64 tokens.*set data.max_length to 64"):
        prepare(cfg.model_copy(update={"max_length": 128}), tmp_path / "data2", str(bert), max_positions=64)


def test_string_labels_keep_a_fine_tuned_heads_order(tmp_path):
    _texts(tmp_path / "t.csv")
    bert = write_bert(tmp_path / "bert", ["alpha beta"], num_labels=2)
    cfg = DataConfig(source=str(tmp_path / "t.csv"), text_column="text", max_length=16)
    plain = load_splits(prepare(cfg, tmp_path / "a", str(bert))).contract
    kept = load_splits(prepare(cfg, tmp_path / "b", str(bert), model_classes=["weather", "sports"])).contract
    assert plain.preprocessing["labels"] == ["sports", "weather"]  # sorted
    assert kept.preprocessing["labels"] == ["weather", "sports"]


def test_a_one_channel_model_with_an_image_processor_sets_the_image_defaults(tmp_path):
    from PIL import Image
    from transformers import ViTConfig, ViTImageProcessor

    folder = tmp_path / "vit"
    ViTConfig(num_channels=1, image_size=16, patch_size=8).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.25], resample=3).save_pretrained(folder)
    from optforge.tasks.techniques.models.models import read_hf_config

    derived = {d.field: d.value for d in image_defaults(folder, read_hf_config(folder))}
    assert derived == {"data.image_mode": "L", "data.image_size": 16, "data.resize": 16, "data.resample": "bicubic",
                       "data.mean": (0.5,), "data.std": (0.25,)}
    images = tmp_path / "images"
    for c in ("a", "b"):
        (images / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((40, 30, 3), 40 * i, np.uint8)).save(images / c / f"{i}.png")
    cfg = DataConfig(source=str(images), **{k.split(".")[1]: v for k, v in derived.items()})
    contract = load_splits(prepare(cfg, tmp_path / "data")).contract
    assert contract.inputs[0].sample_shape() == (1, 16, 16)
    assert contract.preprocessing["mean"] == [0.5] and contract.preprocessing["resample"] == "bicubic"


def test_a_resize_then_crop_processor(tmp_path):
    from transformers import ConvNextImageProcessor, MobileNetV2ImageProcessor

    ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875).save_pretrained(tmp_path / "convnext")
    MobileNetV2ImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}).save_pretrained(
        tmp_path / "mobilenet")
    for name in ("convnext", "mobilenet"):
        derived = {d.field: d.value for d in image_defaults(tmp_path / name, {"num_channels": 3})}
        assert (derived["data.resize"], derived["data.image_size"]) == (256, 224), name
