"""Apache TVM technique on a one-layer model: it compiles, matches ONNX Runtime, tunes, refuses with a reason.

Compiling needs the ``tvm`` extra (part of ``test``); without it these tests skip and say so. Kept to one
Linear layer and one batch size where it can: importing tvm costs ~4 s and each tuning round starts
TVM's builder and runner processes (~10 s for the tuned test on 2 busy cores).
"""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from pydantic import ValidationError

from optforge.tasks.techniques.contract import table_contract
from optforge.tasks.techniques.engines.tensorrt import parity
from optforge.tasks.techniques.engines.tvm import (
    MANIFEST,
    FrontendError,
    TvmConfig,
    TvmRunner,
    compile_onnx,
    library_mb,
    unavailable_reason,
)
from optforge.tasks.techniques.onnx.export import ExportConfig, export_onnx
from tests.techniques.helpers import table_part

NO_TVM = pytest.mark.skipif(unavailable_reason() is not None, reason=f"{unavailable_reason()}")
CONTRACT = table_contract(8, 3)


@pytest.fixture(scope="module")
def linear_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3).eval()
    return export_onnx(model, CONTRACT, tmp_path_factory.mktemp("tvm") / "linear.onnx", ExportConfig())


def _rows(n: int):
    return table_part(np.random.default_rng(0).standard_normal((n, 8)))


@NO_TVM
def test_untuned_build_matches_onnx_runtime_at_any_batch(linear_onnx, tmp_path):
    build = compile_onnx(linear_onnx, tmp_path, CONTRACT, TvmConfig(trials=0, batch_sizes=(4, 1)))
    assert build.libraries == {1: "model_b1.so", 4: "model_b4.so"} and build.tune_s == 0 and build.compile_s > 0
    assert all((tmp_path / name).is_file() for name in build.libraries.values())
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["inputs"] == ["input"] and manifest["target"]["kind"] == "llvm" and manifest["target"]["mcpu"]
    assert library_mb(tmp_path) > 0
    # 11 rows: two batches of 4, then three of 1; 2 rows on a (4,)-only build would be padded
    check = parity(TvmRunner(tmp_path), linear_onnx, _rows(11))
    assert check["max_abs_diff"] < 1e-4 and check["top1_agreement"] == 1.0


@NO_TVM
def test_tuned_build_records_trials_and_still_matches(linear_onnx, tmp_path):
    cfg = TvmConfig(trials=2, search="replay-trace", batch_sizes=(3,))
    build = compile_onnx(linear_onnx, tmp_path, CONTRACT, cfg)
    assert build.tune_s > 0
    records = (tmp_path / "tuning_b3" / "database_tuning_record.json").read_text().splitlines()
    assert len(records) >= 1  # measured schedules, which the build applied
    check = parity(TvmRunner(tmp_path), linear_onnx, _rows(5))  # 3 + 2 padded to 3
    assert check["max_abs_diff"] < 1e-4


@NO_TVM
def test_a_graph_the_frontend_cannot_take_raises_a_reason(tmp_path):
    # Celu is a standard ONNX op that TVM 0.27's Relax frontend does not implement.
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 8])
    graph = helper.make_graph([helper.make_node("Celu", ["input"], ["logits"])], "celu", [x], [y])
    path = tmp_path / "celu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    with pytest.raises(FrontendError, match="Relax ONNX frontend cannot take celu.onnx at batch 1.*Celu"):
        compile_onnx(path, tmp_path / "out", table_contract(8, 8), TvmConfig(trials=0, batch_sizes=(1,)))


def test_config_round_trips_and_bad_values_name_the_field():
    cfg = TvmConfig(target={"kind": "llvm", "mcpu": "znver3"}, batch_sizes=(64, 1, 64))
    assert cfg.batch_sizes == (1, 64) and TvmConfig.from_dict(cfg.to_dict()) == cfg
    assert TvmConfig(target='{"kind": "llvm"}').target == '{"kind": "llvm"}'
    for bad, field in [({"trials": -1}, "trials"), ({"batch_sizes": []}, "batch_sizes"),
                       ({"batch_sizes": [0]}, "batch_sizes"), ({"target": "llvm -mcpu=znver3"}, "target"),
                       ({"target": {"kind": "cuda"}}, "target"), ({"threads": 0}, "threads"),
                       ({"search": "grid"}, "search"), ({"parity_atol": 0}, "parity_atol"), ({"trails": 8}, "trails")]:
        with pytest.raises(ValidationError, match=field):
            TvmConfig.from_dict(bad)


def test_without_tvm_the_reason_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tvm" else real(name, *a))
    assert unavailable_reason() == "the apache-tvm package is not installed (pip install 'optforge[tvm]')"
