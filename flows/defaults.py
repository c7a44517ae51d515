"""The defaults a user's model sets, applied to what the config leaves unset, and checked against the data.

``tasks/techniques/models/folder_defaults.py`` reads a Hugging Face folder; this module decides which of its
values apply (a value the config sets always wins) and passes the text ones to the data stage (the token
length also depends on the data). After the data stage (``settle``): the model's family and its default
chains, fine-tuning settings for pretrained weights, and the check that a head used as it is
(``train.epochs: 0``) predicts the data's classes. Every derived value is logged as a ``derived.*`` param
and shown in one line.
"""

from __future__ import annotations

from optforge.flows.params import ConfigError, PipelineConfig
from optforge.tasks.techniques.data.data import source_kind
from optforge.tasks.techniques.models.folder_defaults import (
    Derived,
    image_defaults,
    model_classes,
    position_limit,
)
from optforge.tasks.techniques.models.models import HUGGINGFACE, num_layers, read_hf_config
from optforge.tasks.techniques.onnx.fuse import unsupported_reason
from optforge.tasks.techniques.registry import TECHNIQUES, section


def folder_config(cfg: PipelineConfig) -> dict | None:
    """The Hugging Face model folder's config.json, or None for any other model."""
    return read_hf_config(cfg.model.path) if cfg.model.arch == HUGGINGFACE and cfg.model.path else None


def apply_folder_defaults(cfg: PipelineConfig) -> tuple[PipelineConfig, list[Derived]]:
    """``cfg`` with the image settings the folder's processor and config give for the fields it leaves unset."""
    hf = folder_config(cfg)
    if hf is None or source_kind(cfg.data) != "image":
        return cfg, []
    derived = [d for d in image_defaults(cfg.model.path, hf) if d.field.split(".", 1)[1] not in cfg.data.model_fields_set]
    data = cfg.data.model_copy(update={d.field.split(".", 1)[1]: d.value for d in derived})
    return cfg.model_copy(update={"data": data}), derived


def text_limits(cfg: PipelineConfig) -> dict:
    """What the data stage takes from the folder: the most tokens the model takes, and the head's class order."""
    hf = folder_config(cfg)
    limit = position_limit(hf)
    return {"max_positions": limit[0] if limit else None, "model_classes": model_classes(hf)}


def derived_length(cfg: PipelineConfig, contract) -> list[Derived]:
    """The token length the data stage settled on, when the config left it unset."""
    if contract.kind != "text" or cfg.data.max_length is not None:
        return []
    return [Derived("data.max_length", contract.sequence_length, contract.preprocessing.get("max_length_from", ""))]


def check_head(cfg: PipelineConfig, contract) -> None:
    """With ``train.epochs: 0`` a Hugging Face head is used as it is: it must predict the data's classes, by count
    and, where both have names, by name and order. Fails before anything trains, showing both lists."""
    hf = folder_config(cfg)
    if hf is None or cfg.train.epochs > 0:
        return
    names = model_classes(hf)
    count = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2
    data_names = contract.preprocessing.get("labels")
    if count != contract.num_classes or (names and data_names and list(names) != list(data_names)):
        raise ConfigError(f"model.path: with train.epochs: 0 the model's head is used as it is, but it predicts "
                          f"{count} classes {names or ''} and the data has {contract.num_classes} "
                          f"{list(data_names) if data_names else ''}; give data with the head's classes (data.classes "
                          "sets their order), or fine-tune (train.epochs > 0) to train a new head")


# Fine-tuning pretrained weights, measured by bench/finetune_defaults.py on all-MiniLM-L6-v2 with a new 6-class head
# (630 training texts, 8 epochs): 1e-4 after a half-epoch warm-up reached 88.1% validation / 78.5% test accuracy,
# 3e-4 85.9 / 83.0, the from-scratch 1e-3 without warm-up 82.2 / 74.1; in 3 epochs 5e-5 and 2e-5 stayed at
# 73.3 / 65.9% test: on the small sets users bring, BERT's 2e-5..5e-5 gets too few steps. 1e-4 rather than 3e-4:
# the best validation, and further from the rates at which larger encoders diverge.
PRETRAINED_TRAIN = {"lr": 1e-4, "warmup_epochs": 0.5, "epochs": 8, "patience": 3}
# Every chain step that fine-tunes such a teacher's model (prune, factorize, QAT, clustering, ...) and a
# distilled student that starts from its weights: the teacher's rate, after this warm-up.
PRETRAINED_STEP = {"warmup_epochs": 0.5}


def pretrained_start(cfg: PipelineConfig) -> str | None:
    """Why the teacher starts from trained weights (the field that brings them), or None: from random weights."""
    if cfg.model.arch == HUGGINGFACE and cfg.model.path:
        return "model.path"
    if cfg.model.weights:
        return "model.weights"
    return "train.init_from" if cfg.train.init_from else None


def is_set(cfg, dotted: str) -> bool:
    """Whether the user's config sets ``dotted`` (every section on the way, then the field, was given)."""
    node = cfg
    for part in dotted.split("."):
        if part not in node.model_fields_set:
            return False
        node = getattr(node, part)
    return True


def with_value(cfg, dotted: str, value):
    """``cfg`` with ``dotted`` set to ``value`` (a copy of each section on the way)."""
    head, _, rest = dotted.partition(".")
    if not rest:
        return cfg.model_copy(update={head: value})
    return cfg.model_copy(update={head: with_value(getattr(cfg, head), rest, value)})


def apply_finetune_defaults(cfg: PipelineConfig) -> tuple[PipelineConfig, list[Derived]]:
    """Fine-tuning settings for a teacher that starts from trained weights, where the config leaves them unset.

    The train stage (when it trains) gets ``PRETRAINED_TRAIN``. Every fine-tuning step of the run's chains
    (and a distilled student that starts from the teacher's weights) then fine-tunes at the peak rate the
    teacher was trained with (``PRETRAINED_TRAIN``'s when it was taken as given), after a warm-up: the
    from-scratch 1e-3 without one undoes what the teacher learnt. A model optforge trains from random weights
    keeps its defaults."""
    source = pretrained_start(cfg)
    if source is None:
        return cfg, []
    why = f"fine-tuning from trained weights ({source})"
    derived = [Derived(f"train.{k}", v, why) for k, v in PRETRAINED_TRAIN.items()
               if cfg.train.epochs > 0 and not is_set(cfg, f"train.{k}")]
    for d in derived:
        cfg = with_value(cfg, d.field, d.value)
    step = {"lr": cfg.train.lr if cfg.train.epochs > 0 else PRETRAINED_TRAIN["lr"],
            "warmup_epochs": PRETRAINED_STEP["warmup_epochs"]}
    step_why = f"the teacher's rate ({'train.lr' if cfg.train.epochs > 0 else 'pretrained default'}), after a warm-up"
    for technique in (TECHNIQUES[s] for s in dict.fromkeys(s for chain in cfg.compress.chains for s in chain)):
        settings = section(cfg, technique)
        # A distilled student fine-tunes trained weights only when it starts from the teacher's (derive).
        loop = "finetune" if hasattr(settings, "finetune") else \
            "train" if getattr(settings, "derive", "none") != "none" else None
        for key, value in (step.items() if loop else ()):
            field = f"{technique.config_key}.{loop}.{key}"
            if not is_set(cfg, field):
                derived.append(Derived(field, value, step_why))
                cfg = with_value(cfg, field, value)
    return cfg, derived


# Default chains by model family, when compress.chains is not set. The README's table says why each.
VISION_TRANSFORMERS = frozenset({"vit", "deit", "swin", "swinv2", "beit", "dinov2", "levit", "mobilevit", "pvt"})
FAMILY_CHAINS = {
    "table MLP": None,  # DEFAULT_CHAINS: the default run's chains
    "CNN": (("prune", "static"), ("distill", "static"), ("factorize", "static")),
    "vision transformer": (("distill", "quantize"), ("prune", "quantize"), ("factorize", "quantize")),
    "text encoder": (("distill", "fuse", "quantize"), ("prune", "quantize"), ("factorize", "quantize"),
                     ("early_exit", "quantize")),
    "other nn.Module": (("prune", "quantize"), ("factorize", "quantize")),
    "ONNX file": (),
}
# How the family's distilled student starts: from the teacher's layers (transformers) or its channels (CNNs).
FAMILY_STUDENT = {"text encoder": "layers", "vision transformer": "layers", "CNN": "width"}


def family(cfg: PipelineConfig, contract) -> str:
    """What kind of model this is, for its default chains: one of ``FAMILY_CHAINS``."""
    arch = cfg.model.arch
    if arch == "onnx":
        return "ONNX file"
    if arch == HUGGINGFACE:
        if contract.kind == "text":
            return "text encoder"
        model_type = (folder_config(cfg) or {}).get("model_type", "")
        return "vision transformer" if model_type in VISION_TRANSFORMERS else "CNN"
    if arch in ("cnn", "dscnn"):
        return "CNN"
    return "table MLP" if arch == "mlp" else "other nn.Module"


def apply_family_chains(cfg: PipelineConfig, contract) -> tuple[PipelineConfig, str, list[Derived]]:
    """(cfg with the family's chains where compress.chains is unset, the family, what was derived)."""
    kind = family(cfg, contract)
    chains = FAMILY_CHAINS[kind]
    if chains is None or is_set(cfg, "compress.chains"):
        return cfg, kind, []
    if kind == "text encoder" and unsupported_reason(folder_config(cfg)):
        chains = tuple(tuple(s for s in c if s != "fuse") for c in chains)  # ORT's fusion does not know it: say so
        chains = tuple(dict.fromkeys(chains))
    derived = [Derived("compress.chains", [list(c) for c in chains], f"the default chains of a {kind}")]
    cfg = with_value(cfg, "compress.chains", chains)
    student = FAMILY_STUDENT.get(kind)
    if student == "layers" and not num_layers(folder_config(cfg)):  # stages, not a stack of layers (Swin, MobileViT)
        student = "width"
    if student and any("distill" in c for c in chains) and not is_set(cfg, "compress.distill.derive"):
        derived.append(Derived("compress.distill.derive", student, f"a {kind}'s student starts from its own weights"))
        cfg = with_value(cfg, "compress.distill.derive", student)
    if kind == "CNN" and not is_set(cfg, "onnx.static.per_channel"):  # conv weights vary by channel
        derived.append(Derived("onnx.static.per_channel", True, "a CNN's convolution weights differ by channel"))
        cfg = with_value(cfg, "onnx.static.per_channel", True)
    return cfg, kind, derived


def settle(cfg: PipelineConfig, contract) -> tuple[PipelineConfig, str, list[Derived]]:
    """After the data stage: (cfg with the defaults that depend on the data and the model, the model's family,
    what was derived). Fails before anything trains when a head used as it is does not fit the data."""
    derived = derived_length(cfg, contract)
    cfg, kind, chains = apply_family_chains(cfg, contract)
    cfg, tuning = apply_finetune_defaults(cfg)
    check_head(cfg, contract)
    return cfg, kind, derived + chains + tuning


def summary_line(derived: list[Derived]) -> str:
    return "from the model folder: " + "; ".join(f"{d.field}={d.value} ({d.why})" for d in derived)
