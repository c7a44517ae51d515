"""The run's plan decides, before anything trains, which chains apply to this model and data (flows/plan.py)."""

from __future__ import annotations

from optforge.flows.examples import write_resnet
from optforge.flows.params import load_config
from optforge.flows.plan import plan
from optforge.tasks.techniques.contract import image_contract, table_contract

DISTILL_CHAINS = {"distill", "distill_int8", "distill_qat_int8", "distill_prune_int8"}


def test_default_digits_plan_keeps_every_chain():
    cfg = load_config(None, [])
    result = plan(cfg, table_contract(64, 10, (1, 8, 8)), "digits")
    assert list(result.skipped) == ["fuse"]  # the zoo MLP is no transformer for ONNX Runtime's optimizer
    assert "not one" in result.skipped["fuse"] and not result.cfg.onnx.fuse.enabled
    assert result.cfg.compress.chains == cfg.compress.chains
    assert result.cfg.register.model_name == "optforge-digits"


def test_a_student_larger_than_the_model_is_skipped_with_both_sizes(tmp_path):
    """The default MLP student on 3x32x32 images is bigger than a tiny ResNet: distilling into it would not
    give a smaller model, so its chains are skipped (and why); pruning and factorizing the ResNet stay."""
    folder = write_resnet(tmp_path / "resnet", num_labels=10)
    cfg = load_config(None, ["model.arch=huggingface", f"model.path={folder}"])
    result = plan(cfg, image_contract(3, 32, 10, {}), "imgs")
    assert DISTILL_CHAINS <= set(result.skipped)
    reason = result.skipped["distill"]
    assert "not fewer than the model's" in reason and "compress.distill.student" in reason
    assert set(result.skipped) == DISTILL_CHAINS | {"fuse"}
    assert "model_type 'resnet' has no ONNX Runtime optimizer family" in result.skipped["fuse"]
    assert [list(c) for c in result.cfg.compress.chains] == [["prune"], ["prune", "quantize"], ["factorize"],
                                                             ["factorize", "quantize"]]
    assert result.cfg.register.model_name == "optforge-imgs-resnet"


def test_a_smaller_student_is_kept_for_a_user_model(tmp_path):
    folder = write_resnet(tmp_path / "resnet", num_labels=10)
    cfg = load_config(None, ["model.arch=huggingface", f"model.path={folder}", "compress.distill.student.hidden=[4]"])
    result = plan(cfg, image_contract(3, 32, 10, {}), "imgs")
    assert list(result.skipped) == ["fuse"]


def test_a_bert_keeps_fusion_and_a_fused_chain_of_its_derived_student(tmp_path):
    from optforge.flows.examples import write_bert
    from optforge.tasks.techniques.contract import text_contract

    folder = write_bert(tmp_path / "bert", ["a b c", "d e f"] * 10)
    base = ["model.arch=huggingface", f"model.path={folder}", "compress.chains=[[distill, fuse, quantize], [prune]]"]
    derived = plan(load_config(None, [*base, "compress.distill.derive=layers"]), text_contract(16, 3, {}), "t")
    assert not derived.skipped and derived.cfg.onnx.fuse.enabled
    assert [list(c) for c in derived.cfg.compress.chains] == [["distill", "fuse", "quantize"], ["prune"]]
    zoo_student = plan(load_config(None, base), text_contract(16, 3, {}), "t")  # the default MLP student
    # the first step that cannot apply gives the reason: the MLP student cannot take text (nor could it fuse)
    assert "cannot take this data" in zoo_student.skipped["distill_fused_int8"] and "fuse" not in zoo_student.skipped



def test_hidden_state_distillation_of_a_non_transformer_is_skipped_before_training():
    cfg = load_config(None, ["compress.distill.hidden_weight=1", "compress.distill.cache_teacher_logits=false"])
    result = plan(cfg, table_contract(64, 10, (1, 8, 8)), "digits")
    assert DISTILL_CHAINS <= set(result.skipped) and "hidden_weight pairs the layers" in result.skipped["distill"]


def test_cross_layer_sharing_between_non_transformers_is_skipped_with_the_reason():
    result = plan(load_config(None, ["compress.distill.share_layers=2"]), table_contract(64, 10), "digits")
    assert DISTILL_CHAINS <= set(result.skipped) and "share_layers shares the layers" in result.skipped["distill"]


def test_tvm_enabled_without_the_package_is_skipped_before_training(monkeypatch):
    import optforge.flows.plan as planning

    monkeypatch.setattr(planning, "tvm_unavailable", lambda: "the apache-tvm package is not installed")
    cfg = load_config(None, ["engines.tvm.enabled=true"])
    result = plan(cfg, table_contract(64, 10, (1, 8, 8)), "digits")
    assert result.skipped["tvm"] == "the apache-tvm package is not installed" and not result.cfg.engines.tvm.enabled
    assert "tvm" not in plan(load_config(None, []), table_contract(64, 10, (1, 8, 8)), "digits").skipped  # off by default
