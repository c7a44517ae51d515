"""The input contract: how a batch of named inputs reaches a model's forward, the JSON form, and text export."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from optforge.tasks.techniques.contract import (
    InputContract,
    LogitsModule,
    call_style,
    forward_logits,
    image_contract,
    table_contract,
    text_contract,
)
from optforge.tasks.techniques.onnx.export import ExportConfig, export_onnx

# Classes at module level: forward_logits caches the call style per model class.


class Flat(nn.Module):
    """The zoo's style: one input under its own argument name."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


class Pixels(nn.Module):
    """A user factory's image model naming the contract's input (with an optional extra argument first)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, scale=None, pixel_values=None):
        return self.fc(pixel_values.flatten(1))


class HFStyle(nn.Module):
    """A Hugging Face-like model: keyword inputs in any order, an output object holding ``logits``."""

    class Output:
        def __init__(self, logits):
            self.logits = logits

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(50, 8), nn.Linear(8, 3)

    def forward(self, attention_mask=None, input_ids=None):
        return HFStyle.Output(_mean_pool(self.emb, self.fc, input_ids, attention_mask))


def _mean_pool(emb, fc, input_ids, attention_mask):
    """Token embedding, mask-weighted mean over the sequence, a linear head."""
    e = emb(input_ids)
    m = attention_mask.unsqueeze(-1).to(e.dtype)
    return fc((e * m).sum(1) / m.sum(1).clamp(min=1.0))


class TinyText(nn.Module):
    """Token embedding, mask-weighted mean over the sequence, a linear head: two int64 inputs."""

    def __init__(self, vocab=50, width=8, classes=3):
        super().__init__()
        self.emb, self.fc = nn.Embedding(vocab, width), nn.Linear(width, classes)

    def forward(self, input_ids, attention_mask):
        return _mean_pool(self.emb, self.fc, input_ids, attention_mask)


def _record_calls(model: nn.Module) -> list[tuple[int, tuple[str, ...]]]:
    """(positional count, keyword names) of every call of ``model``."""
    calls = []
    model.register_forward_pre_hook(lambda m, args, kwargs: calls.append((len(args), tuple(kwargs))), with_kwargs=True)
    return calls


def test_forward_x_model_gets_its_one_input_by_position():
    model = Flat()
    calls = _record_calls(model)
    x = torch.randn(5, 4)
    out = forward_logits(model, {"input": x})
    assert calls == [(1, ())]
    torch.testing.assert_close(out, model.fc(x))
    assert call_style(model, ("input",)) == "positional"


def test_forward_pixel_values_model_gets_it_by_keyword():
    model = Pixels()
    calls = _record_calls(model)
    x = torch.randn(2, 2, 2, 2)
    out = forward_logits(model, {"pixel_values": x})
    assert calls == [(0, ("pixel_values",))]  # by position it would have landed in ``scale``
    torch.testing.assert_close(out, model.fc(x.flatten(1)))
    assert call_style(model, ("pixel_values",)) == "keyword"


def test_keyword_inputs_keep_their_names_and_outputs_reduce_to_logits():
    model = HFStyle()
    ids, mask = torch.randint(0, 50, (2, 6)), torch.ones(2, 6, dtype=torch.int64)
    mask[0, 3:] = 0
    out = forward_logits(model, {"input_ids": ids, "attention_mask": mask})  # forward lists them the other way round
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, _mean_pool(model.emb, model.fc, ids, mask))
    # What export traces: positional tensors in contract order, a plain tensor out.
    wrapped = LogitsModule(model, ("input_ids", "attention_mask"))
    torch.testing.assert_close(wrapped(ids, mask), out)


@pytest.mark.parametrize("model, names, takes", [
    (Flat(), ("input_ids", "attention_mask"), "['x']"),
    (Pixels(), ("input_ids", "attention_mask"), "['scale', 'pixel_values']"),
    (TinyText(), ("input",), "['input_ids', 'attention_mask']"),
])
def test_call_style_names_both_sides_when_they_do_not_match(model, names, takes):
    with pytest.raises(ValueError, match="model.arch") as err:
        call_style(model, names)
    message = str(err.value)
    assert f"{type(model).__name__}.forward takes {takes}" in message
    assert f"the data's inputs are {list(names)}" in message


@pytest.mark.parametrize("contract", [
    table_contract(64, 10, (1, 8, 8)),
    table_contract(5, 2),
    image_contract(3, 32, 4, {"resize": 36, "crop": 32, "mode": "RGB", "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}),
    text_contract(16, 2, {"max_length": 16, "padding": "max_length", "truncation": True}),
])
def test_contract_round_trips_through_its_dict_and_json(contract):
    raw = contract.to_dict()
    assert InputContract.from_dict(raw) == contract
    back = InputContract.from_dict(json.loads(json.dumps(raw)))
    assert back == contract and back.key() == contract.key() and back.dynamic_axes() == contract.dynamic_axes()


def test_contract_shapes_and_names():
    text = text_contract(16, 2, {})
    assert text.names == ("input_ids", "attention_mask") and text.sequence_length == 16
    assert text.dynamic_axes() == {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    example = text.example(batch=3)
    assert {k: (tuple(v.shape), v.dtype) for k, v in example.items()} == {
        "input_ids": ((3, 16), torch.int64), "attention_mask": ((3, 16), torch.int64)}
    with pytest.raises(ValueError, match="has no flat feature width"):
        _ = text.num_features
    assert table_contract(64, 10).num_features == 64 and image_contract(3, 8, 2, {}).num_features == 192
    assert table_contract(64, 10).key() != table_contract(64, 11).key()


def test_text_model_exports_with_dynamic_batch_and_sequence(tmp_path):
    torch.manual_seed(0)
    model = TinyText().eval()
    contract = text_contract(12, 3, {})
    path = export_onnx(model, contract, tmp_path / "text.onnx", ExportConfig())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    assert [(i.name, i.type) for i in inputs] == [("input_ids", "tensor(int64)"), ("attention_mask", "tensor(int64)")]
    for i in inputs:
        assert len(i.shape) == 2 and all(isinstance(d, str) for d in i.shape)  # symbolic batch and sequence
    rng = np.random.default_rng(0)
    for batch, sequence in ((3, 5), (1, 20)):  # neither the traced batch (2) nor the traced length (12)
        ids = rng.integers(0, 50, (batch, sequence)).astype(np.int64)
        mask = np.ones((batch, sequence), np.int64)
        mask[:, sequence - 2 :] = 0  # padding at the end
        (logits,) = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})
        assert logits.shape == (batch, 3)
        with torch.inference_mode():
            ref = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        np.testing.assert_allclose(logits, ref, atol=1e-5)
