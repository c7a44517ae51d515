"""TensorRT technique without a GPU: the skip reason, the config's checks, and what the stage builds from.

Building and running engines needs CUDA and the tensorrt package: see tests/gpu/test_tensorrt_gpu.py.
"""

import importlib.util

import pytest
import torch
from pydantic import ValidationError

from tasks.techniques.tensorrt_engine import EngineRunner, TensorRTConfig, environment, unavailable_reason

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
