"""PyTorch GPU variants: names, and predictors in FP16/BF16 and compiled. The CUDA tests skip without a GPU."""

import copy

import numpy as np
import pytest
import torch

from optforge.tasks.techniques.engines.torch_gpu import (
    TorchGpuConfig,
    cuda_unavailable_reason,
    device_predictor,
    gpu_variants,
)
from optforge.tasks.techniques.models.models import MLP

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is False)")


def test_variant_names_are_stable():
    assert [v.name for v in gpu_variants(TorchGpuConfig())] == [
        "pytorch_fp16_cuda", "pytorch_bf16_cuda", "pytorch_fp16_compile_cuda"]
    assert [v.name for v in gpu_variants(TorchGpuConfig(dtypes=(), compile=True))] == ["pytorch_fp32_compile_cuda"]


def test_reason_without_cuda():
    assert (cuda_unavailable_reason() is None) == torch.cuda.is_available()


def test_predictor_dtype_logic_on_cpu():
    """The same code path on the CPU (bf16 runs there): float32 in, float32 logits out, close to FP32."""
    torch.manual_seed(0)
    model = MLP(16, 3, (32,), dropout=0.0)
    x = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
    ref = model(torch.from_numpy(x)).detach().numpy()
    out = device_predictor(copy.deepcopy(model), "cpu", "bf16")({"features": x})
    assert out.dtype == np.float32 and np.allclose(out, ref, atol=0.1)
    with pytest.raises(ValueError, match="dtype"):
        device_predictor(model, "cpu", "int4")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype, compiled", [("fp16", False), ("bf16", False), ("fp16", True)])
def test_cuda_predictors_match_fp32(dtype, compiled):
    torch.manual_seed(0)
    model = MLP(16, 3, (64,), dropout=0.0)
    x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    ref = model(torch.from_numpy(x)).detach().numpy()
    predict = device_predictor(model, "cuda", dtype, compiled)
    for batch in (x[:1], x):
        assert predict({"features": batch}).shape == (len(batch), 3)
    assert (predict({"features": x}).argmax(1) == ref.argmax(1)).mean() >= 0.95
