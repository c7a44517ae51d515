"""The architecture matrix, decided before training: for each architecture users bring most (tiny random
folders from transformers' own config classes, with their own tokenizer or image processor), the folder's
defaults apply, the model takes the data, the family picks its chains, and every default chain the plan
drops carries a reason. bench/arch_matrix.py runs the whole pipeline on each and prints architecture x chain;
tests/flows/test_arch_matrix_runs.py runs it on a few here."""

from __future__ import annotations

import pytest

from optforge.flows.architectures import IMAGE_ARCHITECTURES, TEXT_ARCHITECTURES, write_image_model, write_text_model
from optforge.flows.defaults import apply_folder_defaults, settle, text_limits
from optforge.flows.examples import write_image_folder, write_text_csv
from optforge.flows.params import load_config
from optforge.flows.plan import plan
from optforge.tasks.techniques.data.data import load_splits
from optforge.tasks.techniques.data.sources import prepare
from optforge.tasks.techniques.models.model_source import starting_model

# Families whose layers need more than (hidden states, mask), or that have none: early exits say "not yet".
NO_EXITS = {"albert", "deberta-v2", "mpnet", "modernbert"}
NO_STUDENT = {"albert"}  # one shared layer run n times: no layers to keep some of (the plan says so)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    texts_csv = write_text_csv(root / "t.csv", rows=90, long_every=10)
    texts = [line.split(",")[0] for line in texts_csv.read_text().splitlines()[1:]]
    return root, texts_csv, texts, write_image_folder(root / "images", per_class=3, size=40)


@pytest.mark.parametrize("name", [*TEXT_ARCHITECTURES, *IMAGE_ARCHITECTURES])
def test_each_architecture_takes_its_data_and_gets_its_familys_chains(name, inputs, tmp_path):
    root, texts_csv, texts, images = inputs
    text = name in TEXT_ARCHITECTURES
    folder = write_text_model(name, tmp_path / name, texts, 3) if text else write_image_model(name, tmp_path / name, 10)
    data = [f"data.source={texts_csv}", "data.text_column=text"] if text else [f"data.source={images}"]
    cfg, _ = apply_folder_defaults(load_config(None, [*data, "model.arch=huggingface", f"model.path={folder}",
                                                      "train.epochs=0"]))
    limits = text_limits(cfg) if text else {}
    split = prepare(cfg.data, tmp_path / "data", str(folder) if text else None, **limits)
    contract = load_splits(split).contract
    cfg, family, _ = settle(cfg, contract)
    starting_model(cfg.model, contract)  # loads, and runs on the data's example batch
    assert family == ("text encoder" if text else "vision transformer" if name in
                      {"vit", "deit", "swin", "mobilevit"} else "CNN")
    planned = plan(cfg, contract, "matrix")
    kept = {tuple(c) for c in planned.cfg.compress.chains}
    assert {"prune", "factorize"} <= {c[0] for c in kept}, planned.skipped
    assert any(c[0] == "distill" for c in kept) == (name not in NO_STUDENT), planned.skipped
    for chain in cfg.compress.chains:
        assert tuple(chain) in kept or any(k.startswith(chain[0]) for k in planned.skipped), chain
    exits = any("early_exit" in c for c in kept)
    assert exits == (text and name not in NO_EXITS), planned.skipped
