"""What a Hugging Face model folder says about its inputs: the defaults for what a config leaves unset.

A model was trained on inputs of one shape: a text model has a position limit, an image model an image
processor (size, crop, resampling, scaling, mean and std) and a channel count, a fine-tuned head its classes
in its own order. Feeding it anything else fails deep inside the model or, worse, silently loses accuracy,
so these values come from the folder's own files (``config.json``, ``preprocessor_config.json``, the
tokenizer's ``model_max_length``) unless the config sets them. Pure: reads files, never imports Prefect or MLflow.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Families whose position ids start after the padding index: RoBERTa's 514 positions hold 512 tokens.
PADDING_OFFSET_FAMILIES = frozenset({"roberta", "xlm-roberta", "camembert", "longformer", "mpnet", "data2vec-text",
                                     "xlm-roberta-xl", "roberta-prelayernorm", "ibert"})
# Families with relative positions only: no learned table bounds the length.
RELATIVE_FAMILIES = frozenset({"deberta-v2", "deberta"})
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL's numbering
GENERIC_LABEL = re.compile(r"^LABEL_\d+$")  # what transformers names classes nobody named
TOKENIZER_UNBOUNDED = 10**6  # transformers' stand-in for "no limit" is about 1e30


@dataclass(frozen=True)
class Derived:
    """One default taken from the model folder: the config field, its value, and where it came from."""

    field: str  # e.g. "data.max_length"
    value: Any
    why: str


def position_limit(hf_config: dict | None, tokenizer_max: int | None = None) -> tuple[int, str] | None:
    """(the most tokens the model takes, why), or None when neither the model nor its tokenizer bounds it."""
    limits = []
    if hf_config:
        family = hf_config.get("model_type", "")
        positions = hf_config.get("max_position_embeddings")
        if positions and family not in RELATIVE_FAMILIES:
            if family in PADDING_OFFSET_FAMILIES:
                offset = int(hf_config.get("pad_token_id") or 1) + 1
                limits.append((int(positions) - offset, f"{family}'s {positions} position embeddings, {offset} "
                                                        "reserved by its padding offset"))
            else:
                limits.append((int(positions), f"the model's max_position_embeddings={positions}"))
    if tokenizer_max and tokenizer_max < TOKENIZER_UNBOUNDED:
        limits.append((int(tokenizer_max), f"the tokenizer's model_max_length={tokenizer_max}"))
    return min(limits) if limits else None


def model_classes(hf_config: dict | None) -> list[str] | None:
    """The head's class names in output order, from ``id2label``; None when they are transformers' generic
    ``LABEL_i`` (a head nobody named) or absent."""
    id2label = (hf_config or {}).get("id2label") or {}
    names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    return None if not names or all(GENERIC_LABEL.match(n) for n in names) else names


def image_defaults(folder: str | Path, hf_config: dict | None) -> list[Derived]:
    """Channels from the model config; size, crop, resampling and normalisation from the folder's image
    processor (``preprocessor_config.json``, read as transformers' image processors read it)."""
    out = []
    channels = (hf_config or {}).get("num_channels")
    if channels in (1, 3):
        out.append(Derived("data.image_mode", "L" if channels == 1 else "RGB", f"config.json num_channels={channels}"))
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return out
    proc = json.loads(path.read_text())
    src = "preprocessor_config.json"
    size, crop = proc.get("size"), proc.get("crop_size") if proc.get("do_center_crop", "crop_size" in proc) else None
    side = _side(size)
    crop_side = _side(crop) or side
    if isinstance(size, dict) and "shortest_edge" in size and not crop and proc.get("crop_pct") and side < 384:
        crop_side, side = side, round(side / float(proc["crop_pct"]))  # ConvNeXt: resize up, crop back to the size
    if crop_side:
        out.append(Derived("data.image_size", int(crop_side), f"{src} {'crop_size' if crop else 'size'}"))
    if side:
        out.append(Derived("data.resize", int(side), f"{src} size"))
    if proc.get("resample") in RESAMPLE:
        out.append(Derived("data.resample", RESAMPLE[proc["resample"]], f"{src} resample={proc['resample']}"))
    if proc.get("do_rescale", True) is False:  # the model takes 0..255 pixels
        out.append(Derived("data.rescale", False, f"{src} do_rescale=false"))
    if proc.get("do_normalize", True) and proc.get("image_mean") and proc.get("image_std"):
        out += [Derived("data.mean", tuple(map(float, proc["image_mean"])), f"{src} image_mean"),
                Derived("data.std", tuple(map(float, proc["image_std"])), f"{src} image_std")]
    elif proc.get("do_normalize") is False:
        out += [Derived("data.mean", (0.0,), f"{src} do_normalize=false"),
                Derived("data.std", (1.0,), f"{src} do_normalize=false")]
    return out


def _side(size) -> int | None:
    """One side of a square from a processor's size: an int, {height, width}, or {shortest_edge}."""
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        if "shortest_edge" in size:
            return int(size["shortest_edge"])
        if "height" in size:
            return int(size["height"])
    return None


def covering_length(lengths, limit: int | None, share: float = 0.99) -> int:
    """The token count that covers ``share`` of the texts, rounded up to a multiple of 8 (kernels like it),
    at least 8 and at most ``limit``."""
    import numpy as np

    if not len(lengths):
        return min(8, limit or 8)
    wanted = int(np.ceil(np.quantile(np.asarray(lengths), share)))
    wanted = max(8, -(-wanted // 8) * 8)
    return min(wanted, limit) if limit else wanted
