"""The defaults a model sets (flows/defaults.py): its family's chains when compress.chains is unset, and
fine-tuning settings for trained weights, each only where the config is silent."""

from __future__ import annotations

from optforge.flows.chain_config import DEFAULT_CHAINS
from optforge.flows.defaults import PRETRAINED_TRAIN, is_set, settle
from optforge.flows.examples import write_bert, write_resnet
from optforge.flows.params import load_config
from optforge.tasks.techniques.contract import image_contract, table_contract, text_contract


def test_the_default_run_keeps_its_chains_and_its_rates():
    cfg = load_config(None, [])
    settled, kind, derived = settle(cfg, table_contract(64, 10))
    assert kind == "table MLP" and derived == []
    assert settled.compress.chains == DEFAULT_CHAINS and settled.train.lr == cfg.train.lr


def test_a_text_encoder_gets_a_layer_student_and_fine_tunes_gently(tmp_path):
    bert = write_bert(tmp_path / "bert", ["some words here"], num_labels=3)
    cfg = load_config(None, [f"model.path={bert}", "model.arch=huggingface", "data.text_column=text",
                             "compress.prune.finetune.lr=0.002"])
    settled, kind, derived = settle(cfg, text_contract(32, 3, {"labels": ["a", "b", "c"]}))
    assert kind == "text encoder"
    assert ("distill", "fuse", "quantize") in settled.compress.chains
    assert settled.compress.distill.derive == "layers"
    assert settled.train.lr == PRETRAINED_TRAIN["lr"] and settled.train.warmup_epochs > 0
    assert settled.compress.factorize.finetune.lr == settled.train.lr  # the teacher's rate
    assert settled.compress.distill.train.lr == settled.train.lr  # the student starts from the teacher's layers
    assert settled.compress.prune.finetune.lr == 0.002  # what the config sets wins
    fields = {d.field for d in derived}
    assert "compress.prune.finetune.lr" not in fields and "compress.chains" in fields


def test_a_cnn_gets_static_int8_per_channel_and_explicit_chains_win(tmp_path):
    resnet = write_resnet(tmp_path / "resnet")
    base = [f"model.path={resnet}", "model.arch=huggingface", f"data.source={tmp_path}", "train.epochs=0"]
    settled, kind, _ = settle(load_config(None, base), image_contract(3, 32, 10, {}))
    assert kind == "CNN" and ("prune", "static") in settled.compress.chains
    assert settled.onnx.static.per_channel and settled.compress.distill.derive == "width"
    assert settled.compress.prune.finetune.lr == PRETRAINED_TRAIN["lr"]  # taken as given: the pretrained rate
    mine, _, _ = settle(load_config(None, [*base, "compress.chains=[[factorize]]"]), image_contract(3, 32, 10, {}))
    assert mine.compress.chains == (("factorize",),)


def test_is_set_walks_the_sections_the_user_gave():
    cfg = load_config(None, ["compress.prune.finetune.epochs=2"])
    assert is_set(cfg, "compress.prune.finetune.epochs")
    assert not is_set(cfg, "compress.prune.finetune.lr") and not is_set(cfg, "compress.factorize.finetune.epochs")
