"""Bad inputs of the new data and model sources: each a clear error naming the field or file."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optforge.flows.examples import write_bert, write_image_folder, write_text_csv
from optforge.tasks.techniques.contract import image_contract, text_contract
from optforge.tasks.techniques.data.data import DataConfig, load_splits
from optforge.tasks.techniques.data.sources import prepare
from optforge.tasks.techniques.models.model_source import starting_model
from optforge.tasks.techniques.models.models import ModelConfig


def _prepare(tmp_path, **data):
    return prepare(DataConfig(**data), tmp_path / "out")


def test_folder_without_class_subfolders(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="data.source: .*flat has no class sub-folders"):
        _prepare(tmp_path, source=str(tmp_path / "flat"))


def test_folder_with_one_class(tmp_path):
    write_image_folder(tmp_path / "imgs", per_class=2, size=8)
    for d in (tmp_path / "imgs").iterdir():
        if d.name != "0":
            for f in d.iterdir():
                f.unlink()
    with pytest.raises(ValueError, match="data.source: .* 1 class"):
        _prepare(tmp_path, source=str(tmp_path / "imgs"))


def test_unreadable_image_names_the_file(tmp_path):
    write_image_folder(tmp_path / "imgs", per_class=2, size=8)
    bad = tmp_path / "imgs" / "3" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        _prepare(tmp_path, source=str(tmp_path / "imgs"), image_size=8)


def test_missing_text_or_label_column(tmp_path):
    csv = write_text_csv(tmp_path / "t.csv", rows=30)
    with pytest.raises(ValueError, match=r"data.text_column: column 'body' not in .*columns are \['text', 'label'\]"):
        _prepare(tmp_path, source=str(csv), text_column="body", tokenizer=str(tmp_path))
    with pytest.raises(ValueError, match="data.label_column: column 'y' not in"):
        _prepare(tmp_path, source=str(csv), text_column="text", label_column="y", tokenizer=str(tmp_path))


def test_tokenizer_folder_that_does_not_exist(tmp_path):
    csv = write_text_csv(tmp_path / "t.csv", rows=30)
    with pytest.raises(FileNotFoundError, match="data.tokenizer: tokenizer folder not found: .*nope"):
        _prepare(tmp_path, source=str(csv), text_column="text", tokenizer=str(tmp_path / "nope"))


def test_long_texts_are_truncated_and_counted(tmp_path):
    csv = write_text_csv(tmp_path / "t.csv", rows=60, long_every=10)
    texts = [line.split(",")[0] for line in csv.read_text().splitlines()[1:]]
    bert = write_bert(tmp_path / "bert", texts)
    splits = load_splits(_prepare(tmp_path, source=str(csv), text_column="text", tokenizer=str(bert), max_length=32))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bert))
    longer = sum(len(ids) > 32 for ids in tok(texts)["input_ids"])
    assert splits.stats["texts_truncated"] == longer >= 6  # rows 0, 10, ..., 50 hold 60 words
    assert splits.train.inputs["input_ids"].shape[1] == 32
    assert len(splits.train) + len(splits.val) + len(splits.test) == 60


def test_hugging_face_folder_with_only_a_pickled_checkpoint(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only pickled weights .*pytorch_model.bin.*safe_serialization=True"):
        starting_model(ModelConfig(arch="huggingface", path=str(folder)), text_contract(8, 2, {}))


class _Named(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.lin = nn.Linear(4, num_classes)

    def forward(self, images, masks):
        return self.lin(images.mean((1, 2, 3), keepdim=True).expand(-1, 4))


def test_forward_arguments_that_do_not_match_the_inputs_list_both(monkeypatch):
    import sys
    import types

    module = types.ModuleType("byo_named")
    module.make = lambda num_classes: _Named(num_classes)
    monkeypatch.setitem(sys.modules, "byo_named", module)
    with pytest.raises(ValueError, match=r"forward takes \['images', 'masks'\] but the data's inputs are \['pixel_values'\]"):
        starting_model(ModelConfig(arch="byo_named:make"), image_contract(3, 8, 2, {}))
