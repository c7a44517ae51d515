"""Starting weights for fine-tuning (``train.init_from``), checked against the model and the data.

The task shell (``tasks/stages/init_from.py``) turns ``runs:/``, ``models:/`` and local paths into one
model folder (``model.pt`` + ``model.json``); this module only reads such a folder, so training code
never talks to MLflow. Every mismatch is a ``ValueError`` that names ``train.init_from`` and says
which shape differs, before any worker starts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from optforge.tasks.techniques.models.models import ModelSpec, missing_model_file, read_spec
from optforge.tasks.techniques.models.rebuild import build_model

FIELD = "train.init_from"


def load_init_state(folder: str | Path, spec: ModelSpec, source: str | None = None) -> dict[str, torch.Tensor]:
    """The ``state_dict`` in ``folder``, after checking it fits ``spec`` (the model this run trains).

    Args:
        folder: a model folder as written by ``save_model``.
        spec: the architecture and data shapes of this run.
        source: what the user wrote in ``train.init_from`` (for messages); defaults to ``folder``.
    """
    folder, source = Path(folder), source or str(folder)
    if missing := missing_model_file(folder):
        raise ValueError(f"{FIELD}: {source} is not a model folder: {folder} lacks {missing}")
    their_spec = read_spec(folder)
    theirs, ours = their_spec.inputs, spec.inputs
    if theirs.key() != ours.key():
        raise ValueError(f"{FIELD}: {source} takes {_describe(theirs)}, but this run's data has {_describe(ours)}")
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    expected = build_model(spec).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        detail = "; ".join(
            part for part in (
                f"missing {missing[:4]}" if missing else "",
                f"unexpected {unexpected[:4]}" if unexpected else "",
                ", ".join(f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:4]),
            ) if part
        )
        raise ValueError(
            f"{FIELD}: the weights in {source} do not fit the configured model ({detail}); its model.json says "
            f"{their_spec.config}: set model.* to match it"
        )
    return state


def apply_init(model: nn.Module, state: dict[str, torch.Tensor] | None) -> nn.Module:
    """Load ``state`` (from ``load_init_state``) into ``model`` when there is one; return ``model``."""
    if state is not None:
        model.load_state_dict(state)
    return model


def _describe(contract) -> str:
    """'64 features and 10 classes' for tables, else the inputs with their sample shapes."""
    if contract.kind == "table":
        return f"{contract.num_features} features and {contract.num_classes} classes"
    shapes = ", ".join(f"{t.name} {list(t.sample_shape())}" for t in contract.inputs)
    return f"{contract.kind} inputs {shapes} and {contract.num_classes} classes"
