"""TensorRT engines on a real GPU: FP16 and INT8 (QDQ) builds, dynamic batch, timing cache, parity with ORT."""

import importlib.util

import numpy as np
import pytest
import torch

from optforge.tasks.techniques.engines.tensorrt import EngineRunner, TensorRTConfig, build_engine, parity
from optforge.tasks.techniques.models.models import MLP
from optforge.tasks.techniques.onnx.export import ExportConfig, export_onnx
from optforge.tasks.techniques.onnx.fp16 import Fp16Config, convert_fp16
from optforge.tasks.techniques.onnx.static import StaticQuantConfig, quantize_static_int8

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is False)"),
    pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                       reason="needs the tensorrt package (pip install 'optforge[tensorrt]')"),
]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    torch.manual_seed(0)
    return export_onnx(MLP(16, 3, (64, 64), dropout=0.0), 16, tmp_path_factory.mktemp("toy") / "model.onnx", ExportConfig())


def test_fp16_engine_runs_any_batch_in_the_profile_and_matches_ort(toy, tmp_path):
    cfg = TensorRTConfig(max_batch=32, opt_batch=8)
    src = convert_fp16(toy, tmp_path / "fp16.onnx", Fp16Config())
    settings = build_engine(src, tmp_path / "fp16.engine", cfg, tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").stat().st_size > 0 and settings["profile_min_opt_max"] == [1, 8, 32]
    runner = EngineRunner(tmp_path / "fp16.engine")
    x = np.random.default_rng(0).normal(size=(70, 16)).astype(np.float32)  # > max_batch: runs in slices
    assert runner(x).shape == (70, 3) and runner(x[:1]).shape == (1, 3)
    assert parity(runner, src, x)["top1_agreement"] >= 0.97
    build_engine(src, tmp_path / "again.engine", cfg, tmp_path / "timing.cache")  # reuses the cache


def test_int8_engine_from_symmetric_qdq_model(toy, tmp_path):
    x = np.random.default_rng(1).normal(size=(256, 16)).astype(np.float32)
    qcfg = StaticQuantConfig(activation_type="qint8", symmetric_activations=True, per_channel=True)
    src = quantize_static_int8(toy, tmp_path / "qdq.onnx", x, qcfg).path
    build_engine(src, tmp_path / "int8.engine", TensorRTConfig())
    assert parity(EngineRunner(tmp_path / "int8.engine"), src, x)["top1_agreement"] >= 0.95
