"""The stored form of a model whose weights take few values: bit-packed per-weight codes plus small tables.

Weight clustering stores each weight's cluster index and the layer's codebook; binary weights store each
weight's sign and one scale per output channel. Everything else (biases, norms, layers left in float) is
stored as float32. One ``.npz`` next to ``model.pt`` (``PACKED_FILE``) holds it all; its size is what the
benchmark reports for the variant, since the model itself still runs in float.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from optforge.tasks.techniques.files import atomic_write

PACKED_FILE = "packed.npz"


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """``bits``-bit unsigned codes packed into bytes (little-endian bit order within each code)."""
    as_bits = ((codes.astype(np.uint16).ravel()[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(as_bits.ravel(), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    as_bits = np.unpackbits(packed, bitorder="little")[: count * bits].reshape(count, bits)
    return (as_bits.astype(np.int64) << np.arange(bits)).sum(1)


def codebook_entry(indices: np.ndarray, codebook: np.ndarray, bits: int) -> dict[str, np.ndarray]:
    """A clustered weight: ``bits``-bit indices into ``codebook``."""
    return {"kind": np.asarray("codebook"), "shape": np.asarray(indices.shape, np.int64), "bits": np.asarray(bits),
            "codes": pack_bits(indices, bits), "codebook": codebook.astype(np.float32)}


def signs_entry(weight: np.ndarray, scale: np.ndarray) -> dict[str, np.ndarray]:
    """A binary weight ``sign(w) * scale[channel]``: one bit per weight, one float32 per output channel."""
    return {"kind": np.asarray("signs"), "shape": np.asarray(weight.shape, np.int64), "bits": np.asarray(1),
            "codes": pack_bits(weight > 0, 1), "scale": scale.astype(np.float32)}


def _codebook(entry: dict[str, np.ndarray]) -> np.ndarray:
    shape = tuple(entry["shape"])
    return entry["codebook"][unpack_bits(entry["codes"], int(entry["bits"]), int(np.prod(shape)))].reshape(shape)


def _signs(entry: dict[str, np.ndarray]) -> np.ndarray:
    shape = tuple(entry["shape"])
    signs = unpack_bits(entry["codes"], 1, int(np.prod(shape))).reshape(shape[0], -1) * 2.0 - 1.0
    return (signs * entry["scale"][:, None]).astype(np.float32).reshape(shape)


def bake_weights(model: nn.Module, kind: type[nn.Module]) -> dict[str, nn.Module]:
    """Replace every weight parametrized by a ``kind`` module (a codebook, a sign-and-scale) by the plain weight it
    computes, which export and ``save_model`` expect; returns layer name -> the parametrization it had."""
    found = {name: m.parametrizations.weight[0] for name, m in model.named_modules()
             if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], kind)}
    for name in found:
        parametrize.remove_parametrizations(model.get_submodule(name), "weight", leave_parametrized=True)
    return found


REBUILD = {"codebook": _codebook, "signs": _signs}  # explicit dispatch on the entry's kind


def save_packed(state: dict[str, torch.Tensor], entries: dict[str, dict[str, np.ndarray]], path: str | Path) -> int:
    """Write ``entries`` (state_dict key -> packed arrays) and the rest of ``state`` in float; returns the bytes."""
    arrays = {f"{key}|{field}": value for key, entry in entries.items() for field, value in entry.items()}
    arrays |= {key: t.detach().cpu().numpy() for key, t in state.items() if key not in entries}
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")  # never a half-written file
    return Path(path).stat().st_size


def load_packed(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict back from ``save_packed``'s file."""
    with np.load(path) as z:
        entries: dict[str, dict[str, np.ndarray]] = {}
        state = {}
        for name in z.files:
            key, sep, field = name.partition("|")
            if sep:
                entries.setdefault(key, {})[field] = z[name]
            else:
                state[key] = torch.as_tensor(z[name])
    for key, entry in entries.items():
        state[key] = torch.as_tensor(REBUILD[str(entry["kind"])](entry))
    return dict(sorted(state.items()))
