"""Students derived from the teacher itself, starting from the teacher's weights instead of from scratch.

- ``layers``: the DistilBERT recipe (Sanh et al., 2019). A transformer keeps ``ceil(n / stride)`` of its
  ``n`` layers, evenly spaced from the first to the last (12 -> layers 0, 2, 4, 7, 9, 11, the ones
  DistilBERT kept), each initialised from the teacher's layer; embeddings and head are copied too.
  The result is the same Hugging Face architecture with a smaller ``num_hidden_layers``, so its spec is
  the teacher's with that config changed.
- ``width``: every layer keeps ``width_keep`` of its channels, neurons and heads, chosen by torch-pruning's
  magnitude importance from the teacher's own weights (a CNN with narrower stages, a transformer with
  fewer heads and a narrower feed-forward). Its spec is the teacher's plus the pruning history.

Both start close to the teacher, so distillation recovers in a few epochs what a fresh student of the
same size needs many more for. ``hidden_state_loss`` adds the layer outputs to the logits as a signal
(TinyBERT's hidden-state term): student layer i learns the output of the teacher layer it is paired with.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from optforge.tasks.techniques.compression.distill import DistillConfig
from optforge.tasks.techniques.compression.graph_prune import prune_channels
from optforge.tasks.techniques.contract import InputContract
from optforge.tasks.techniques.models.model_source import check_runs, starting_model
from optforge.tasks.techniques.models.models import (
    HUGGINGFACE,
    ModelConfig,
    ModelSpec,
    Subject,
    base_model,
    count_params,
    num_layers,
    read_hf_config,
)

Derive = Literal["none", "layers", "width"]


def layer_stack(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList] | None:
    """(parent, attribute, list) of a Hugging Face transformer's layers: the first ``ModuleList`` holding
    ``config.num_hidden_layers`` blocks of one class; None when the model has no such stack."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        return None
    for parent in model.modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n and len({type(m) for m in child}) == 1:
                return parent, attr, child
    return None


def share_layers(model: nn.Module, group: int) -> int:
    """ALBERT's cross-layer sharing, in place: layer ``i`` of the transformer stack becomes layer
    ``(i // group) * group``, so each run of ``group`` layers runs one set of weights. Returns the number of
    distinct layers left. The module objects are shared, so parameters, gradients (summed over the uses), the
    saved file and the ONNX export all hold each shared layer once."""
    found = layer_stack(model)
    if found is None:
        raise ValueError("compress.distill.share_layers: cross-layer sharing needs a Hugging Face transformer (a "
                         f"config with num_hidden_layers); this student is {type(model).__name__}")
    parent, attr, layers = found
    setattr(parent, attr, nn.ModuleList([layers[(i // group) * group] for i in range(len(layers))]))
    return -(-len(layers) // group)


def kept_layer_indices(n: int, stride: int) -> list[int]:
    """``ceil(n / stride)`` layer indices evenly spaced over ``0 .. n-1``, first and last included."""
    k = max(1, math.ceil(n / stride))
    return sorted({int(i) for i in np.linspace(0, n - 1, k).round()})


def drop_layers(teacher: nn.Module, spec: ModelSpec, stride: int) -> tuple[nn.Module, ModelSpec]:
    """A copy of ``teacher`` with every ``stride``-th layer kept (module docstring); the teacher is untouched."""
    if spec.pruned or spec.factorized:
        raise ValueError("compress.distill.derive: layers are dropped from an unpruned, unfactorized teacher")
    found = layer_stack(teacher)
    if found is None or len(found[2]) < 2 or spec.hf_config is None:
        raise ValueError("compress.distill.derive: 'layers' needs a Hugging Face transformer (a config with "
                         f"num_hidden_layers >= 2); this model is {type(teacher).__name__}. Use derive=width instead")
    student = copy.deepcopy(teacher)
    parent, attr, layers = layer_stack(student)
    keep = kept_layer_indices(len(layers), stride)
    setattr(parent, attr, nn.ModuleList([layers[i] for i in keep]))
    config = student.config
    config.num_hidden_layers = len(keep)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer settings of newer configs
        config.layer_types = [config.layer_types[i] for i in keep]
    return student.eval(), replace(spec, hf_config=config.to_dict())


def narrow(teacher: nn.Module, spec: ModelSpec, keep: float) -> tuple[nn.Module, ModelSpec]:
    """A copy of ``teacher`` keeping ``keep`` of every layer's channels (module docstring)."""
    if spec.factorized:
        raise ValueError("compress.distill.derive: a factorized teacher cannot be narrowed; derive before factorizing")
    student, history = prune_channels(copy.deepcopy(teacher), spec.inputs, 1.0 - keep)
    return student.eval(), spec.then("distill", {"history": history})


def derive_student(teacher: nn.Module, spec: ModelSpec, how: Derive, layer_stride: int = 2,
                   width_keep: float = 0.5) -> tuple[nn.Module, ModelSpec]:
    """The student ``how`` derives from ``teacher`` (whose spec is ``spec``), with the teacher's weights."""
    if how == "layers":
        return drop_layers(teacher, spec, layer_stride)
    if how == "width":
        return narrow(teacher, spec, width_keep)
    raise ValueError(f"compress.distill.derive: expected 'layers' or 'width', got '{how}'")


def _hf_student(folder: str, contract: InputContract) -> tuple[nn.Module, dict, bool]:
    """(model, config, has weights) of a Hugging Face student: its weights when the folder has them, else a
    fresh model of its config.json with a head for the data's classes."""
    from optforge.tasks.techniques.models.hf import from_config, load_pretrained

    path = Path(folder)
    if any(path.glob("*.safetensors")) or any(path.glob("*.bin")):
        return (*load_pretrained(path, contract), True)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"compress.distill.student.path: {path} has no config.json; expected a save_pretrained "
                         "folder or a folder holding a Hugging Face config.json")
    raw = {k: v for k, v in json.loads(config_file.read_text()).items() if k not in ("id2label", "label2id")}
    model = from_config(raw | {"num_labels": contract.num_classes}, contract)
    return model.eval(), model.config.to_dict(), False


def student_model(student_cfg: ModelConfig, derive: Derive, teacher: nn.Module, teacher_spec: ModelSpec, layer_stride: int = 2,
                  width_keep: float = 0.5) -> tuple[nn.Module, ModelSpec, bool]:
    """(student, its spec, whether it starts from weights) for a distill stage: derived from the teacher, a
    Hugging Face folder, or a zoo / factory ``student_cfg`` (with ``weights`` when given)."""
    contract = teacher_spec.inputs
    if derive != "none":
        student, spec = derive_student(teacher, teacher_spec, derive, layer_stride, width_keep)
        trained = True
    elif student_cfg.arch == "huggingface":
        student, hf_config, trained = _hf_student(student_cfg.path, contract)
        spec = ModelSpec(student_cfg.to_dict(), contract.to_dict(), hf_config=hf_config)
    else:
        student, spec, trained = starting_model(student_cfg, contract)
    check_runs(student, contract)
    return student, spec, trained


def layer_pairs(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Which teacher layer each student layer learns from: evenly spaced, first to last, so a student
    derived with ``drop_layers`` pairs every layer with the teacher layer it was copied from."""
    return list(enumerate(int(j) for j in np.linspace(0, n_teacher - 1, n_student).round()))


class LayerOutputs:
    """Forward hooks that keep the latest output of every layer of a transformer's layer stack."""

    def __init__(self, model: nn.Module):
        found = layer_stack(model)
        if found is None:
            raise ValueError(f"compress.distill.hidden_weight: {type(model).__name__} has no transformer layer stack "
                             "(a Hugging Face config with num_hidden_layers); hidden-state distillation needs one")
        self.outputs: list = [None] * len(found[2])
        for i, layer in enumerate(found[2]):
            layer.register_forward_hook(self._keep(i))

    def _keep(self, i: int):
        def hook(module, args, out):
            self.outputs[i] = out[0] if isinstance(out, tuple) else out
        return hook


def hidden_state_loss(student: LayerOutputs, teacher: LayerOutputs) -> torch.Tensor:
    """Mean squared error between paired layer outputs of equal width (``layer_pairs``), averaged over pairs;
    pairs of different widths are left out (zero when none is left)."""
    pairs = [(student.outputs[i], teacher.outputs[j])
             for i, j in layer_pairs(len(student.outputs), len(teacher.outputs))]
    losses = [F.mse_loss(s.float(), t.detach().float()) for s, t in pairs if s is not None and t is not None
              and s.shape == t.shape]
    if not losses:
        return torch.zeros(())
    return torch.stack(losses).mean()


def _params_on_meta(build) -> int | None:
    """Parameters of the model ``build()`` makes on the meta device (no memory, no weights read), or None when
    it cannot be built so (a factory that loads files itself, say): then nothing is decided here."""
    try:
        with torch.device("meta"):
            return count_params(build())
    except Exception:
        return None


def student_problem(teacher: Subject, cfg: DistillConfig) -> str | None:
    """Why ``cfg``'s student cannot be distilled from ``teacher``: it cannot take the data, it would not be
    smaller, or a setting needs transformers it does not have. None: it applies."""
    contract = teacher.contract
    own = cfg.derive == "none"
    student_hf = (read_hf_config(cfg.student.path) if cfg.student.arch == HUGGINGFACE else None) if own else teacher.hf_config
    if cfg.hidden_weight and not all(num_layers(c) for c in (teacher.hf_config, student_hf)):
        return ("distill: compress.distill.hidden_weight pairs the layers of two transformers (Hugging Face "
                "configs with num_hidden_layers); this teacher or student has none: set it to 0")
    if cfg.share_layers > 1 and not num_layers(student_hf):
        return ("distill: compress.distill.share_layers shares the layers of a transformer student (a Hugging Face "
                "config with num_hidden_layers); this student has none: set it to 1")
    if cfg.derive == "width":
        return None  # the teacher, narrowed: always smaller, always takes the data
    if cfg.derive == "layers":
        layers = num_layers(teacher.hf_config) if teacher.family == HUGGINGFACE else None
        if layers is None or layers < 2:
            return ("distill: compress.distill.derive=layers keeps every other layer of a transformer; model.arch="
                    f"{teacher.family} has no num_hidden_layers >= 2 in a Hugging Face config; use derive=width")
        try:
            with torch.device("meta"):
                stack = layer_stack(teacher.build())
        except Exception:  # cannot be built here: the stage itself will say
            return None
        if stack is None:
            return (f"distill: compress.distill.derive=layers keeps some of a transformer's {layers} layers, but this "
                    f"{teacher.hf_config.get('model_type', 'model')} has no list of {layers} layers to keep them from "
                    "(ALBERT runs one shared layer {layers} times)".replace("{layers}", str(layers)))
        return None
    what = f"the student (compress.distill.student.arch={cfg.student.arch})"
    if cfg.student.arch == HUGGINGFACE:  # weights load in the stage; here only its config counts
        from optforge.tasks.techniques.models.hf import from_config

        if student_hf is None:
            return f"distill: {what} has no config.json in compress.distill.student.path={cfg.student.path}"
        raw = {k: v for k, v in student_hf.items() if k not in ("id2label", "label2id")}
        raw["num_labels"] = contract.num_classes

        def build():
            return from_config(raw, contract)
    else:
        spec = ModelSpec(cfg.student.to_dict(), contract.to_dict())
        try:
            check_runs(base_model(spec).eval(), contract)
        except (ValueError, TypeError) as exc:
            return f"distill: {what} cannot take this data: {str(exc)[:200]}"

        def build():
            return base_model(spec)
    n_student, n_teacher = _params_on_meta(build), _params_on_meta(teacher.build)
    if n_student is not None and n_teacher is not None and n_student >= n_teacher:
        return (f"distill: {what} has {n_student:,} parameters, not fewer than the model's {n_teacher:,}; "
                "set compress.distill.student to a smaller model to distill")
    return None
