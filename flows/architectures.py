"""Tiny folders of the classification architectures users bring most, for the architecture matrix.

Each is built from transformers' own config class (random weights, seconds to build) and saved with
``save_pretrained`` beside what the real checkpoints ship with it: a tokenizer (a WordPiece trained here on the
data) for text, an image processor of the family's own class for images. ``tests/flows/test_arch_matrix.py``
runs the pipeline's default chains on each; ``bench/arch_matrix.py`` prints the architecture x chain table.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

TEXT_POSITIONS = 64
IMAGE_SIZE = 32
_TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def _text_configs() -> dict[str, Callable]:
    import transformers as t

    p = TEXT_POSITIONS
    return {
        "bert": lambda v: t.BertConfig(vocab_size=v, max_position_embeddings=p, **_TEXT),
        "distilbert": lambda v: t.DistilBertConfig(vocab_size=v, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                                   max_position_embeddings=p),
        "roberta": lambda v: t.RobertaConfig(vocab_size=v, max_position_embeddings=p + 2, pad_token_id=1, **_TEXT),
        "albert": lambda v: t.AlbertConfig(vocab_size=v, embedding_size=16, max_position_embeddings=p, **_TEXT),
        "electra": lambda v: t.ElectraConfig(vocab_size=v, embedding_size=16, max_position_embeddings=p, **_TEXT),
        "deberta-v2": lambda v: t.DebertaV2Config(vocab_size=v, max_position_embeddings=p, relative_attention=True,
                                                  position_biased_input=False, pos_att_type=["p2c", "c2p"], **_TEXT),
        "xlm-roberta": lambda v: t.XLMRobertaConfig(vocab_size=v, max_position_embeddings=p + 2, pad_token_id=1,
                                                    **_TEXT),
        "mpnet": lambda v: t.MPNetConfig(vocab_size=v, max_position_embeddings=p + 2, pad_token_id=1, **_TEXT),
        "modernbert": lambda v: t.ModernBertConfig(vocab_size=v, max_position_embeddings=p, hidden_size=32,
                                                   num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                                   global_attn_every_n_layers=2, local_attention=16, pad_token_id=0,
                                                   cls_token_id=2, sep_token_id=3, bos_token_id=2, eos_token_id=3),
        "mobilebert": lambda v: t.MobileBertConfig(vocab_size=v, max_position_embeddings=p, embedding_size=16,
                                                   intra_bottleneck_size=16, true_hidden_size=16,
                                                   num_feedforward_networks=1, **_TEXT),
    }


def _image_configs() -> dict[str, tuple[Callable, Callable]]:
    """name -> (config from the class count, the family's image processor)."""
    import transformers as t

    s = IMAGE_SIZE
    vit = {"image_size": s, "patch_size": 8, **_TEXT}
    return {
        "vit": (lambda n: t.ViTConfig(num_labels=n, **vit), lambda: t.ViTImageProcessor(size={"height": s, "width": s})),
        "deit": (lambda n: t.DeiTConfig(num_labels=n, **vit),
                 lambda: t.DeiTImageProcessor(size={"height": s + 4, "width": s + 4}, crop_size={"height": s, "width": s})),
        "swin": (lambda n: t.SwinConfig(num_labels=n, image_size=s, patch_size=4, embed_dim=16, depths=[1, 1],
                                        num_heads=[2, 2], window_size=4),
                 lambda: t.ViTImageProcessor(size={"height": s, "width": s})),
        "convnext": (lambda n: t.ConvNextConfig(num_labels=n, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1]),
                     lambda: t.ConvNextImageProcessor(size={"shortest_edge": s}, crop_pct=0.875)),
        "resnet": (lambda n: t.ResNetConfig(num_labels=n, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                            layer_type="basic"),
                   lambda: t.ConvNextImageProcessor(size={"shortest_edge": s}, crop_pct=0.875)),
        "regnet": (lambda n: t.RegNetConfig(num_labels=n, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                            groups_width=8),
                   lambda: t.ConvNextImageProcessor(size={"shortest_edge": s}, crop_pct=0.875)),
        "mobilenet_v2": (lambda n: t.MobileNetV2Config(num_labels=n, image_size=s, depth_multiplier=0.35),
                         lambda: t.MobileNetV2ImageProcessor(size={"shortest_edge": s + 4},
                                                             crop_size={"height": s, "width": s})),
        "efficientnet": (lambda n: t.EfficientNetConfig(num_labels=n, image_size=s, width_coefficient=0.25,
                                                        depth_coefficient=0.25, hidden_dim=320),
                         lambda: t.EfficientNetImageProcessor(size={"height": s, "width": s})),
        "mobilevit": (lambda n: t.MobileViTConfig(num_labels=n, image_size=s, patch_size=2, hidden_sizes=[16, 24, 32],
                                                  neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32], num_attention_heads=2),
                      lambda: t.MobileViTImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})),
    }


TEXT_ARCHITECTURES = ("bert", "distilbert", "roberta", "albert", "electra", "deberta-v2", "xlm-roberta", "mpnet",
                      "modernbert", "mobilebert")
IMAGE_ARCHITECTURES = ("vit", "deit", "swin", "convnext", "resnet", "regnet", "mobilenet_v2", "efficientnet",
                       "mobilevit")


def write_text_model(name: str, out: Path, texts: list[str], num_labels: int) -> Path:
    """A tiny ``name`` sequence classifier with a WordPiece tokenizer trained on ``texts``, in one folder."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from optforge.flows.examples import train_tokenizer

    tokenizer = train_tokenizer(texts, out)
    config = _text_configs()[name](len(tokenizer))
    config.num_labels = num_labels
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(str(out))
    return out


def write_image_model(name: str, out: Path, num_labels: int) -> Path:
    """A tiny ``name`` image classifier with its family's image processor, in one folder."""
    import torch
    from transformers import AutoModelForImageClassification

    make_config, processor = _image_configs()[name]
    config = make_config(num_labels)
    if name == "deit":  # the Auto class maps DeiT to two heads and picks by config.architectures
        config.architectures = ["DeiTForImageClassification"]
    torch.manual_seed(0)
    AutoModelForImageClassification.from_config(config).save_pretrained(str(out))
    processor().save_pretrained(str(out))
    return out
