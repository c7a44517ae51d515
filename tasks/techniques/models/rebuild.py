"""Rebuild a model from its spec: the architecture it started from, then each applied technique's replay, in
the order applied, before the weights load.

Its own module because the replays belong to the technique registry, whose techniques import ``models``:
``models`` knows architectures, this module knows how they were changed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from optforge.tasks.techniques.models.models import ModelSpec, base_model, missing_model_file, read_spec
from optforge.tasks.techniques.registry import TECHNIQUES


def build_model(spec: ModelSpec) -> nn.Module:
    """The (untrained) model ``spec`` describes: ``base_model``, then every transform's replay."""
    model = base_model(spec)
    for name, params in spec.transforms:
        replay = TECHNIQUES[name].replay if name in TECHNIQUES else None
        if replay is None:
            raise ValueError(f"model spec: no replay for transform '{name}'; known: "
                             f"{sorted(n for n, t in TECHNIQUES.items() if t.replay)}")
        model = replay(model, params, spec.inputs)
    return model


def load_model(folder: str | Path) -> tuple[nn.Module, ModelSpec]:
    """Rebuild from ``model.json`` and load ``model.pt`` with ``weights_only=True``; eval mode."""
    folder = Path(folder)
    if missing := missing_model_file(folder):
        raise FileNotFoundError(f"model folder {folder} lacks {missing}")
    spec = read_spec(folder)
    model = build_model(spec)
    model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    return model.eval(), spec
