"""A user's model folder sets the defaults, end to end through ``optforge run`` with configs that set only the
data and the model folder (issue 25's three folders): a text model with 64 positions, a one-channel image model
with its own image processor, a fine-tuned head whose class order is not the sorted one, and a head whose class
count does not fit, which fails before anything trains."""

from __future__ import annotations

import csv
from pathlib import Path

import mlflow
import pytest
import torch

from optforge.flows.examples import write_bert, write_image_folder, write_resnet, write_text_csv
from tests.flows.test_bring_your_own import _run

pytestmark = pytest.mark.slow
QUICK = {"train": {"epochs": 1, "batch_size": 32, "num_workers": 1, "patience": 0}, "compress": {"chains": []}}


def _parent_params(tmp_path: Path) -> dict:
    (run,) = mlflow.search_runs(experiment_names=["byo"], filter_string="tags.`optforge.pipeline` = 'optimize'",
                                output_format="list")
    return run.data.params | {"tag": run.data.tags.get("optforge.derived", "")}


def test_a_64_position_text_model_needs_no_max_length(tmp_path, mlflow_store):
    csv_path = write_text_csv(tmp_path / "topics.csv", rows=240, long_every=10)  # every 10th text is 60 words
    texts = [line.split(",")[0] for line in csv_path.read_text().splitlines()[1:]]
    bert = write_bert(tmp_path / "bert", texts, positions=64)
    code, _ = _run(tmp_path, {"data": {"source": str(csv_path), "text_column": "text"},
                              "model": {"arch": "huggingface", "path": str(bert)}, **QUICK})
    assert code == 0
    params = _parent_params(tmp_path)
    length = int(params["derived.data.max_length"])
    assert length <= 64 and length % 8 == 0
    assert "data.max_length=" in params["tag"] and "position limit" in params["tag"]
    assert float(params["derived.train.lr"]) < 1e-3  # a folder's weights are fine-tuned gently
    # The fine-tuned model comes back as a folder transformers reloads, with the data's tokenizer.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    (train,) = mlflow.search_runs(experiment_names=["byo"], output_format="list",
                                  filter_string="tags.mlflow.runName = 'train'")
    folder = mlflow.artifacts.download_artifacts(f"{train.info.artifact_uri}/hf_model", dst_path=str(tmp_path / "dl"))
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    encoded = AutoTokenizer.from_pretrained(folder)(["the match goal"], return_tensors="pt")
    assert model(**encoded).logits.shape == (1, 3) and len(model.config.id2label) == 3


def test_a_one_channel_image_model_reads_its_processor(tmp_path, mlflow_store):
    from transformers import ConvNextImageProcessor

    folder = write_image_folder(tmp_path / "images", per_class=12, size=24)
    resnet = write_resnet(tmp_path / "resnet", channels=1)
    ConvNextImageProcessor(size={"shortest_edge": 14}, crop_pct=0.875, image_mean=[0.5], image_std=[0.5]).save_pretrained(resnet)
    code, _ = _run(tmp_path, {"data": {"source": str(folder)}, "model": {"arch": "huggingface", "path": str(resnet)},
                              "train": {"epochs": 0}, "compress": {"chains": []}})  # the data is what is tested
    assert code == 0
    params = _parent_params(tmp_path)
    assert (params["derived.data.image_mode"], params["derived.data.image_size"], params["derived.data.resize"]) == (
        "L", "14", "16")
    assert params["derived.data.mean"] == "(0.5,)"


def _biased_head(tmp_path: Path, id2label: dict[int, str], rows: list[tuple[str, str]]) -> Path:
    """A 'fine-tuned' BERT whose head always says class 1: its accuracy shows which name class 1 got."""
    from transformers import BertForSequenceClassification

    bert = write_bert(tmp_path / "bert", [t for t, _ in rows], num_labels=len(id2label))
    model = BertForSequenceClassification.from_pretrained(bert)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 8.0] + [0.0] * (len(id2label) - 2)))
    model.config.id2label, model.config.label2id = id2label, {v: k for k, v in id2label.items()}
    model.save_pretrained(bert)
    return bert


def _write_rows(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([("text", "label"), *rows])
    return path


def test_epochs_zero_keeps_the_heads_class_order(tmp_path, mlflow_store):
    # 3 in 4 texts are "sports"; the head says class 1 always, and its id2label calls class 1 "sports". Sorted
    # names would call class 1 "weather" and score 25%.
    rows = [(f"text number {i} about things", "sports" if i % 4 else "weather") for i in range(200)]
    bert = _biased_head(tmp_path, {0: "weather", 1: "sports"}, rows)
    code, _ = _run(tmp_path, {"data": {"source": str(_write_rows(tmp_path / "t.csv", rows)), "text_column": "text"},
                              "model": {"arch": "huggingface", "path": str(bert)},
                              "train": {"epochs": 0}, "compress": {"chains": []}})
    assert code == 0
    (bench,) = mlflow.search_runs(experiment_names=["byo"], output_format="list",
                                  filter_string="tags.`optforge.variant` = 'pytorch_fp32'")
    assert bench.data.metrics["accuracy"] > 60


def test_epochs_zero_with_a_head_of_another_class_count_fails_before_training(tmp_path, mlflow_store, capsys):
    rows = [(f"text {i}", ["a", "b", "c"][i % 3]) for i in range(90)]
    bert = _biased_head(tmp_path, {0: "x", 1: "y"}, rows)
    code, _ = _run(tmp_path, {"data": {"source": str(_write_rows(tmp_path / "t.csv", rows)), "text_column": "text"},
                              "model": {"arch": "huggingface", "path": str(bert)},
                              "train": {"epochs": 0}, "compress": {"chains": []}})
    err = capsys.readouterr().err
    assert code != 0
    assert "model.path" in err and "['x', 'y']" in err and "['a', 'b', 'c']" in err
    assert not mlflow.search_runs(experiment_names=["byo"], output_format="list",
                                  filter_string="tags.mlflow.runName = 'train'")
