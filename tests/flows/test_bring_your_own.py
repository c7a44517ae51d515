"""Bring your own model and data, end to end through ``optforge run``: an image folder with a Hugging Face
ResNet, a text set with a Hugging Face BERT and a tokenizer trained here, a factory model taking
``pixel_values``, an ONNX file as the starting point, ``train.epochs: 0``; each ends with a champion
that a separate process loads and predicts with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from optforge.flows.cli import main
from optforge.flows.examples import write_bert, write_image_folder, write_resnet, write_text_csv

pytestmark = pytest.mark.slow

FAST = {"benchmark": {"warmup": 2, "iters_b1": 10, "iters_batch": 2},
        "onnx": {"static": {"calibration_samples": 64}},
        "register": {"max_accuracy_drop": 100.0}}
PREDICT = """
import json, sys, mlflow, numpy as np
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
raw = json.loads(sys.argv[3])
x = raw if isinstance(raw, list) and raw and isinstance(raw[0], str) else np.asarray(raw, np.float32)
print(json.dumps(np.asarray(model.predict(x)).shape))
"""


def _run(tmp_path: Path, config: dict, *extra: str) -> tuple[int, dict]:
    cfg = {**FAST, **config, "tracking": {"experiment": "byo", "workdir": str(tmp_path / "work")}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["run", "--config", str(path), *extra])
    return code, cfg


def _champion(uri: str, name: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(uri).get_model_version_by_alias(name, "champion").version


def _predict_elsewhere(uri: str, name: str, raw) -> list[int]:
    """Load the champion in a fresh process that never saw the config, and predict."""
    out = subprocess.run([sys.executable, "-c", PREDICT, uri, f"models:/{name}@champion", json.dumps(raw)],
                         capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    return write_image_folder(root / "digits", per_class=30, size=16), write_resnet(root / "resnet")


def test_factory_model_taking_pixel_values_then_onnx_start(images, tmp_path, mlflow_store, monkeypatch):
    folder, _ = images
    # The factory's module must import on the Ray workers too: a fresh local Ray inherits PYTHONPATH.
    from tests.conftest import _stop_ray

    _stop_ray()
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    code, _ = _run(tmp_path, {"data": {"source": str(folder), "image_size": 16},
                              "model": {"arch": "tests.flows.byo_models:pixel_net", "kwargs": {"width": 16}},
                              "train": {"epochs": 2, "batch_size": 32, "num_workers": 1, "patience": 0},
                              "compress": {"chains": [["prune", "quantize"]]}})
    assert code == 0
    # The exported ONNX file of that run is now a user's ONNX model: quantized, benchmarked, registered.
    onnx_file = next((tmp_path / "work" / "export").rglob("model.onnx"))
    start = tmp_path / "start"
    start.mkdir()
    code, _ = _run(start, {"data": {"source": str(folder), "image_size": 16},
                           "model": {"arch": "onnx", "path": str(onnx_file)}})
    assert code == 0
    name = "optforge-digits-model"
    assert _predict_elsewhere(mlflow_store, name, [[[[0.0] * 16] * 16] * 3]) == [1, 10]


def test_image_folder_with_hugging_face_resnet(images, tmp_path, mlflow_store):
    folder, resnet = images
    code, _ = _run(tmp_path, {"data": {"source": str(folder), "image_size": 16},
                              "model": {"arch": "huggingface", "path": str(resnet)},
                              "train": {"epochs": 1, "batch_size": 32, "num_workers": 2, "patience": 0},
                              "compress": {"chains": [["factorize"], ["prune"]],
                                           "factorize": {"finetune": {"epochs": 1}}}})
    assert code == 0
    name = "optforge-digits-resnet"  # derived from the data folder and the model folder
    assert _champion(mlflow_store, name)
    assert _predict_elsewhere(mlflow_store, name, [[[[0.0] * 16] * 16] * 3] * 2) == [2, 10]
    import mlflow

    run = mlflow.search_runs(experiment_names=["byo"], filter_string="tags.`optforge.pipeline` = 'optimize'",
                             output_format="list")[0]
    assert "optforge.skipped.prune" not in run.data.tags
    # The Hugging Face ResNet is pruned through its dependency graph: residual stages lose channels together.
    prune_run = mlflow.search_runs(experiment_names=["byo"], filter_string="tags.`optforge.stage` = 'prune'",
                                   output_format="list")[0]
    assert prune_run.data.metrics["pruned_layers"] > 0 and prune_run.data.metrics["params_ratio"] < 0.6


def test_text_with_hugging_face_bert_and_raw_strings(tmp_path, mlflow_store):
    csv_path = write_text_csv(tmp_path / "topics.csv", rows=240, long_every=20)
    texts = [line.split(",")[0] for line in csv_path.read_text().splitlines()[1:]]
    bert = write_bert(tmp_path / "bert", texts)
    code, _ = _run(tmp_path, {"data": {"source": str(csv_path), "text_column": "text", "max_length": 16},
                              "model": {"arch": "huggingface", "path": str(bert)},
                              "train": {"epochs": 1, "batch_size": 32, "num_workers": 2, "patience": 0},
                              "compress": {"chains": [["distill"]],
                                           "distill": {"derive": "layers", "hidden_weight": 1.0,
                                                       "cache_teacher_logits": False,
                                                       "train": {"epochs": 1, "num_workers": 1}}}})
    assert code == 0
    name = "optforge-topics-bert"
    assert _predict_elsewhere(mlflow_store, name, ["the match goal", "rain and storm today"]) == [2, 3]
    import mlflow

    data_run = mlflow.search_runs(experiment_names=["byo"], filter_string="tags.mlflow.runName = 'prepare_data'",
                                  output_format="list")[0]
    # 240 rows, every 20th is 60 words long: 12 texts exceed 16 tokens and are truncated, not refused.
    assert data_run.data.metrics["texts_truncated"] >= 12
    # The DistilBERT recipe: the 2-layer BERT's student keeps one layer, starting from the teacher's weights,
    # and learns the teacher's logits and its paired layer's output (the live teacher runs on every batch).
    distill_run = mlflow.search_runs(experiment_names=["byo"], filter_string="tags.`optforge.stage` = 'distill'",
                                     output_format="list")[0]
    assert distill_run.data.tags["optforge.student"] == "teacher's layers, one in 2 kept (1 layers)"
    assert distill_run.data.metrics["params_ratio"] < 1
    # ONNX Runtime's transformer optimizer fused the BERT's two attention blocks into Attention nodes.
    fuse_run = mlflow.search_runs(experiment_names=["byo"], filter_string="tags.`optforge.stage` = 'fuse'",
                                  output_format="list")[0]
    assert fuse_run.data.metrics["fused_Attention"] == 2 and fuse_run.data.metrics["parity_max_abs_diff"] < 1e-3


def test_epochs_zero_takes_a_saved_model_as_the_baseline(images, tmp_path, mlflow_store):
    folder, resnet = images
    code, _ = _run(tmp_path, {"data": {"source": str(folder), "image_size": 16},
                              "model": {"arch": "huggingface", "path": str(resnet)},
                              "train": {"epochs": 0}, "compress": {"chains": []}})
    assert code == 0
    import mlflow

    train_run = mlflow.search_runs(experiment_names=["byo"], filter_string="tags.mlflow.runName = 'train'",
                                   output_format="list")[0]
    assert train_run.data.metrics["epochs_run"] == 0
    assert _champion(mlflow_store, "optforge-digits-resnet")
