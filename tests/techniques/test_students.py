"""Students derived from the teacher (tasks/techniques/compression/students.py): a layer-dropped transformer and a narrowed
CNN start from the teacher's own weights, and rebuild from their spec alone."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from optforge.tasks.techniques.compression.students import derive_student, kept_layer_indices, student_model
from optforge.tasks.techniques.contract import forward_logits, image_contract, text_contract
from optforge.tasks.techniques.models.hf import to_dict
from optforge.tasks.techniques.models.models import ModelConfig, count_params, save_model
from optforge.tasks.techniques.models.rebuild import load_model
from tests.techniques.helpers import hf_spec, tiny_bert, tiny_resnet


def test_distilbert_keeps_the_layers_distilbert_kept():
    assert kept_layer_indices(12, 2) == [0, 2, 4, 7, 9, 11]
    assert kept_layer_indices(4, 2) == [0, 3]
    assert kept_layer_indices(6, 3) == [0, 5]


def test_a_layer_dropped_student_starts_from_the_teachers_layers(tmp_path):
    teacher, contract = tiny_bert(4), text_contract(12, 3, {})
    student, spec = derive_student(teacher, hf_spec(teacher, contract), "layers", layer_stride=2)
    assert len(student.bert.encoder.layer) == 2 and spec.hf_config["num_hidden_layers"] == 2
    assert len(teacher.bert.encoder.layer) == 4  # the teacher is untouched
    # Student layer 1 is the teacher's last layer (index 3), copied; embeddings and head are copied too.
    torch.testing.assert_close(student.bert.encoder.layer[1].attention.self.query.weight,
                               teacher.bert.encoder.layer[3].attention.self.query.weight)
    torch.testing.assert_close(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    torch.testing.assert_close(student.classifier.weight, teacher.classifier.weight)
    assert count_params(student) < count_params(teacher)
    save_model(student, spec, tmp_path)
    loaded, _ = load_model(tmp_path)  # rebuilt from the spec's config alone
    x = contract.example(batch=2)
    with torch.inference_mode():
        torch.testing.assert_close(forward_logits(loaded, x), forward_logits(student, x))


def test_a_narrowed_cnn_keeps_a_subset_of_the_teachers_filters(tmp_path):
    teacher, contract = tiny_resnet(), image_contract(3, 32, 10, {})
    student, spec = derive_student(teacher, hf_spec(teacher, contract), "width", width_keep=0.5)
    assert count_params(student) < 0.4 * count_params(teacher)
    t_conv, s_conv = (next(m for m in net.modules() if isinstance(m, nn.Conv2d)) for net in (teacher, student))
    assert s_conv.out_channels == t_conv.out_channels // 2
    teacher_filters = {tuple(f.flatten().tolist()) for f in t_conv.weight}
    assert all(tuple(f.flatten().tolist()) in teacher_filters for f in s_conv.weight)  # copied, not fresh
    save_model(student, spec, tmp_path)
    loaded, _ = load_model(tmp_path)
    x = contract.example(batch=2)
    with torch.inference_mode():
        torch.testing.assert_close(forward_logits(loaded, x), forward_logits(student, x))


def test_dropping_layers_of_a_model_without_a_layer_stack_says_what_to_use():
    teacher, contract = tiny_resnet(), image_contract(3, 32, 10, {})
    with pytest.raises(ValueError, match="derive=width"):
        derive_student(teacher, hf_spec(teacher, contract), "layers")


def test_a_hugging_face_config_alone_gives_a_fresh_student_with_the_datas_classes(tmp_path):
    teacher, contract = tiny_bert(4), text_contract(12, 3, {})
    config = to_dict(tiny_bert(1)) | {"num_labels": 7, "id2label": {str(i): str(i) for i in range(7)}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    student_cfg = ModelConfig(arch="huggingface", path=str(tmp_path))
    student, spec, has_weights = student_model(student_cfg, "none", teacher, hf_spec(teacher, contract))
    assert not has_weights and student.config.num_labels == 3 and len(student.bert.encoder.layer) == 1
    assert spec.hf_config["num_hidden_layers"] == 1


def test_hidden_state_loss_pairs_layers_evenly_and_is_zero_for_the_teacher_itself():
    from optforge.tasks.techniques.compression.students import LayerOutputs, hidden_state_loss, layer_pairs

    assert [j for _, j in layer_pairs(6, 12)] == kept_layer_indices(12, 2)  # the layers a derived student came from
    teacher, contract = tiny_bert(4), text_contract(12, 3, {})
    twin = copy.deepcopy(teacher)
    student, _ = derive_student(teacher, hf_spec(teacher, contract), "layers")
    x = contract.example(batch=2)
    outputs = {name: LayerOutputs(m) for name, m in (("teacher", teacher), ("twin", twin), ("student", student))}
    for m in (teacher, twin, student):
        forward_logits(m, x)
    assert hidden_state_loss(outputs["twin"], outputs["teacher"]).item() == 0
    assert hidden_state_loss(outputs["student"], outputs["teacher"]).item() > 0  # layer 1 sees other inputs
    assert len(outputs["student"].outputs) == 2 and all(o is not None for o in outputs["student"].outputs)


def test_hidden_state_distillation_needs_the_live_teacher():
    from pydantic import ValidationError

    from optforge.tasks.techniques.compression.distill import DistillConfig

    with pytest.raises(ValidationError, match="cache_teacher_logits=false"):
        DistillConfig(hidden_weight=1.0)
    assert DistillConfig(hidden_weight=1.0, cache_teacher_logits=False).hidden_weight == 1.0


def test_cross_layer_sharing_runs_one_set_of_weights_per_group_and_rebuilds_from_the_spec(tmp_path):
    import numpy as np

    from optforge.tasks.techniques.compression.students import layer_stack, share_layers
    from optforge.tasks.techniques.onnx.export import ExportConfig, export_onnx, max_abs_diff

    contract = text_contract(16, 3, {})
    plain, shared = tiny_bert(layers=4), tiny_bert(layers=4)
    assert share_layers(shared, 2) == 2
    layers = layer_stack(shared)[2]
    assert layers[0] is layers[1] and layers[2] is layers[3] and layers[1] is not layers[2]
    per_layer = count_params(plain.bert.encoder.layer[0])
    assert count_params(plain) - count_params(shared) == 2 * per_layer  # two layers' weights are gone
    torch.testing.assert_close(shared.bert.encoder.layer[1].attention.self.query.weight,
                               plain.bert.encoder.layer[0].attention.self.query.weight)  # layer 1 runs layer 0's

    spec = hf_spec(shared, contract).then("distill", {"share_layers": 2})
    folder = save_model(shared, spec, tmp_path / "student")
    rebuilt, rebuilt_spec = load_model(folder)  # what a Ray worker and every later stage build
    assert rebuilt_spec.applied("distill") == [{"share_layers": 2}] and layer_stack(rebuilt)[2][2] is layer_stack(rebuilt)[2][3]
    ids = torch.randint(0, 60, (2, 16))
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    torch.testing.assert_close(forward_logits(rebuilt, feeds), forward_logits(shared, feeds))

    sizes = {}
    for name, model in (("plain", plain), ("shared", shared)):
        path = export_onnx(model, contract, tmp_path / f"{name}.onnx", ExportConfig())
        sizes[name] = path.stat().st_size
        assert max_abs_diff(model, path, {k: np.asarray(v) for k, v in feeds.items()}) < 1e-4
    assert sizes["shared"] < sizes["plain"] - per_layer * 4 * 1.5  # each shared layer is stored once in ONNX too


def test_sharing_needs_a_transformer_and_excludes_hidden_state_pairs():
    from pydantic import ValidationError

    from optforge.tasks.techniques.compression.distill import DistillConfig
    from optforge.tasks.techniques.compression.students import share_layers

    with pytest.raises(ValueError, match="share_layers: cross-layer sharing needs a Hugging Face transformer"):
        share_layers(nn.Sequential(nn.Linear(4, 4)), 2)
    with pytest.raises(ValidationError, match="share_layers: a shared layer runs several times"):
        DistillConfig(share_layers=2, hidden_weight=1.0, cache_teacher_logits=False)
