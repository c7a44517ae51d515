"""The model a run starts from: built from the zoo or a factory, or loaded from a Hugging Face folder or a
weights file, and checked against the data's input contract before any training starts.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from optforge.tasks.techniques.contract import InputContract, call_style, forward_logits
from optforge.tasks.techniques.models.models import HUGGINGFACE, ModelConfig, ModelSpec, base_model, load_weights_file


def starting_model(model_cfg: ModelConfig, contract: InputContract,
                   fine_tune: bool = False) -> tuple[nn.Module, ModelSpec, bool]:
    """(model in eval mode, its spec, whether it carries trained weights) for ``model_cfg`` on this data.

    A Hugging Face folder brings its weights (safetensors only) and its config, which goes into the
    spec (``fine_tune``: a head of another class count is replaced by a new one); ``model.weights`` loads into a
    zoo or factory model strictly (a mismatch names the keys).
    The model is then run once on the contract's example batch, so a forward that does not take the
    data's inputs fails here, in seconds, with both lists of names.
    """
    spec = ModelSpec(model_cfg.to_dict(), contract.to_dict())
    trained = False
    if model_cfg.arch == HUGGINGFACE:
        from optforge.tasks.techniques.models.hf import load_pretrained

        model, hf_config = load_pretrained(model_cfg.path, contract, new_head=fine_tune)
        spec, trained = replace(spec, hf_config=hf_config), True
    else:
        model = base_model(spec)  # a fresh spec: nothing applied yet
        if model_cfg.weights:
            state = load_weights_file(model_cfg.weights)
            try:
                model.load_state_dict(state)
            except RuntimeError as exc:
                raise ValueError(f"model.weights: {model_cfg.weights} does not fit model.arch={model_cfg.arch} "
                                 f"({str(exc).splitlines()[0]} ...): {_first_lines(exc)}") from exc
            trained = True
    check_runs(model.eval(), contract)
    return model, spec, trained


def check_runs(model: nn.Module, contract: InputContract) -> None:
    """Run ``model`` on two example rows: its forward must take the inputs and return (N, num_classes) logits."""
    call_style(model, contract.names)  # names both lists when they do not match
    with torch.inference_mode():
        try:
            logits = forward_logits(model, contract.example(batch=2))
        except Exception as exc:
            raise ValueError(f"model.arch: {type(model).__name__} fails on the data's inputs "
                             f"{[(t.name, t.dtype, list(t.shape)) for t in contract.inputs]}: "
                             f"{type(exc).__name__}: {exc}") from exc
    if tuple(logits.shape) != (2, contract.num_classes):
        raise ValueError(f"model.arch: {type(model).__name__} returns shape {tuple(logits.shape)} for 2 samples; "
                         f"expected (2, {contract.num_classes}) logits for the data's {contract.num_classes} classes")


def _first_lines(exc: Exception, n: int = 3) -> str:
    return " ".join(str(exc).splitlines()[1 : 1 + n]).strip()[:400]
