"""The architecture matrix, run: issue 25's DistilBERT (whose default prune chain once crashed inside its
attention reshape and took the whole run down) through ``optforge run`` with a config that sets only the data,
the folder and ``train.epochs: 0``. Its family's default chains all end as variants: a layer-dropped student
fused and INT8, heads pruned, SVD, early exits. bench/arch_matrix.py runs every architecture."""

from __future__ import annotations

import mlflow
import pytest

from optforge.flows.architectures import write_text_model
from optforge.flows.examples import write_text_csv
from tests.flows.test_bring_your_own import _run

pytestmark = pytest.mark.slow
ONE_EPOCH = {"prune": {"finetune": {"epochs": 1}}, "factorize": {"finetune": {"epochs": 1}},
             "early_exit": {"finetune": {"epochs": 1}},
             "distill": {"train": {"epochs": 1, "num_workers": 1, "batch_size": 32}}}


def test_distilbert_runs_every_default_chain(tmp_path, mlflow_store):
    csv_path = write_text_csv(tmp_path / "topics.csv", rows=150, long_every=10)
    texts = [line.split(",")[0] for line in csv_path.read_text().splitlines()[1:]]
    folder = write_text_model("distilbert", tmp_path / "distilbert", texts, num_labels=3)
    code, _ = _run(tmp_path, {"data": {"source": str(csv_path), "text_column": "text"},
                              "model": {"arch": "huggingface", "path": str(folder)},
                              "train": {"epochs": 0}, "compress": ONE_EPOCH})
    assert code == 0
    (parent,) = mlflow.search_runs(experiment_names=["byo"], output_format="list",
                                   filter_string="tags.`optforge.pipeline` = 'optimize'")
    assert parent.data.tags["optforge.model_family"] == "text encoder"
    assert not [k for k in parent.data.tags if k.startswith("optforge.failed.")]
    bench = mlflow.search_runs(experiment_names=["byo"], output_format="list",
                               filter_string="tags.`optforge.stage` = 'benchmark'")
    built = {r.data.tags["optforge.variant"] for r in bench if r.info.status == "FINISHED"}
    assert {"distill_fused_int8", "prune_int8", "factorize_int8", "early_exit_int8"} <= built
