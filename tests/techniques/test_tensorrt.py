"""TensorRT technique without a GPU: the skip reason, the config's checks, and what the stage builds from.

Building and running engines needs CUDA and the tensorrt package: see tests/gpu/test_tensorrt_gpu.py.
"""

import importlib.util

import pytest
import torch
from pydantic import ValidationError

from optforge.tasks.techniques.contract import table_contract, text_contract
from optforge.tasks.techniques.engines.tensorrt import (
    EngineRunner,
    TensorRTConfig,
    environment,
    parity,
    profile_shapes,
    unavailable_reason,
)

HAS_TRT = torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAS_TRT, reason="CUDA and tensorrt are both present: the skip path does not apply here")
def test_unavailable_reason_names_what_is_missing():
    reason = unavailable_reason()
    assert reason
    if not torch.cuda.is_available():
        assert "CUDA is not available" in reason
    if importlib.util.find_spec("tensorrt") is None:
        assert "pip install 'optforge[tensorrt]'" in reason
    assert environment() == f"unavailable: {reason}"  # a cached skip is keyed to this, never reused on a GPU box


def test_config_defaults_round_trip_and_bad_values_name_the_field():
    cfg = TensorRTConfig()
    assert cfg.precisions == ("fp16", "int8") and TensorRTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValidationError, match="min_batch <= opt_batch <= max_batch"):
        TensorRTConfig(min_batch=8, opt_batch=4)
    with pytest.raises(ValidationError, match="precisions"):
        TensorRTConfig(precisions=("fp8",))
    with pytest.raises(ValidationError, match="optimization_level"):
        TensorRTConfig(optimization_level=9)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="the tensorrt package is not installed")
def test_missing_engine_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.engine"):
        EngineRunner(tmp_path / "nope.engine")


def test_profile_spans_the_batch_range_and_a_text_input_up_to_its_length():
    cfg = TensorRTConfig(min_batch=1, opt_batch=8, max_batch=32)
    assert profile_shapes(table_contract(64, 10), cfg) == {"input": ((1, 64), (8, 64), (32, 64))}
    text = profile_shapes(text_contract(24, 2, {}), cfg)
    assert text == {name: ((1, 2), (8, 24), (32, 24)) for name in ("input_ids", "attention_mask")}


def test_parity_compares_a_runner_with_onnx_runtime_over_a_part(tmp_path):
    """``parity`` takes any runner of named batches; ONNX Runtime itself stands in for the engine here."""
    import numpy as np
    from torch import nn

    from optforge.tasks.techniques.onnx.export import ExportConfig, export_onnx
    from optforge.tasks.techniques.onnx.ort_session import onnx_predictor
    from tests.techniques.helpers import table_part

    torch.manual_seed(0)
    path = export_onnx(nn.Linear(6, 3), table_contract(6, 3), tmp_path / "m.onnx", ExportConfig())
    part = table_part(np.random.default_rng(0).normal(size=(300, 6)))  # more rows than one batch of 256
    assert parity(onnx_predictor(path), path, part) == {"max_abs_diff": 0.0, "top1_agreement": 1.0}
    off = parity(lambda batch: onnx_predictor(path)(batch) + 1.0, path, part)
    assert off["max_abs_diff"] == pytest.approx(1.0, abs=1e-5) and off["top1_agreement"] == 1.0
