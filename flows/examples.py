"""``optforge examples``: write the example data and small model folders that ``configs/examples/`` use.

Nothing is downloaded: the image folder is scikit-learn's digits upscaled to 32x32 RGB PNGs, the text
set is generated from word lists (three topics), the tokenizer is a WordPiece trained here with
``tokenizers``, and the Hugging Face models are small configs with random weights saved with
``save_pretrained`` (safetensors). Tests build their inputs with the same functions.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

import numpy as np

TOPICS = {
    "sports": "match goal team player score coach league season win referee stadium ball".split(),
    "weather": "rain sun cloud storm wind forecast snow cold warm humid thunder sky".split(),
    "food": "bread cheese soup recipe kitchen oven spice salad dinner taste sugar fruit".split(),
}
FILLER = "the a today we saw really very some and then it was quite".split()


def write_image_folder(out: Path, per_class: int | None = None, size: int = 32) -> Path:
    """Digits as ``out/<digit>/<i>.png`` RGB images of ``size`` pixels (all 1,797, or ``per_class`` each)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts: dict[int, int] = {}
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        if per_class is not None and counts.get(int(label), 0) >= per_class:
            continue
        counts[int(label)] = counts.get(int(label), 0) + 1
        folder = out / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray((image * (255 / 16)).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        grey.convert("RGB").save(folder / f"{i}.png")
    return out


def write_text_csv(path: Path, rows: int = 600, seed: int = 0, long_every: int = 50) -> Path:
    """A CSV of (text, label) with three topics; every ``long_every``-th text is long (tests truncation)."""
    rng = random.Random(seed)
    names = sorted(TOPICS)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(rows):
            label = i % len(names)
            words = TOPICS[names[label]]
            n = 60 if long_every and i % long_every == 0 else rng.randint(5, 12)
            text = " ".join(rng.choice(words) if rng.random() < 0.5 else rng.choice(FILLER) for _ in range(n))
            writer.writerow([text, label])
    return path


def train_tokenizer(texts: list[str], out: Path, vocab_size: int = 200):
    """A WordPiece tokenizer trained on ``texts`` with ``tokenizers``, saved as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(str(out))
    return fast


def write_bert(out: Path, texts: list[str], num_labels: int = 3, hidden: int = 32, layers: int = 2, heads: int = 2,
               ffn_ratio: int = 2, positions: int = 128) -> Path:
    """A small BERT classifier (random weights) with its own WordPiece tokenizer, in one save_pretrained folder.

    The defaults are the tests' tiny model; ``write_examples`` writes a larger one (see there).
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = train_tokenizer(texts, out)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=hidden * ffn_ratio, max_position_embeddings=positions, num_labels=num_labels)
    BertForSequenceClassification(config).save_pretrained(str(out))
    return out


def write_resnet(out: Path, num_labels: int = 10, channels: int = 3, hidden_sizes: tuple[int, ...] = (16, 32)) -> Path:
    """A small ResNet image classifier (random weights, one basic block per stage) as a save_pretrained folder.

    The defaults are the tests' tiny two-stage model; ``write_examples`` writes a larger one (see there).
    """
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=channels, embedding_size=hidden_sizes[0], hidden_sizes=list(hidden_sizes),
                          depths=[1] * len(hidden_sizes), layer_type="basic", num_labels=num_labels)
    ResNetForImageClassification(config).save_pretrained(str(out))
    return out


# The text example's BERT: 6 layers of width 128 with BERT's 4x feed-forward (1.24 M weights). Its layers, not its
# embeddings, hold most of the weights, as in BERT-base; in a 2-layer width-32 BERT the embeddings and the graph's
# fixed overhead dominate and no layer-dropped, INT8 student can be much smaller than its teacher.
EXAMPLE_BERT = {"hidden": 128, "layers": 6, "heads": 4, "ffn_ratio": 4, "positions": 64}
# The image example's ResNet: four stages of 32 to 256 channels (1.23 M weights), ResNet-18's widths halved with
# one block per stage. The two-stage 22 k-weight ResNet the tests use is all per-call overhead: ORT FP32 is
# 14x PyTorch on it and no INT8 variant can be faster than ORT FP32.
EXAMPLE_RESNET = {"hidden_sizes": (32, 64, 128, 256)}


def write_examples(root: Path) -> dict[str, Path]:
    """Everything ``configs/examples/*.yaml`` read, under ``root`` (default ``examples/``)."""
    texts_csv = write_text_csv(root / "topics.csv")
    with open(texts_csv) as fh:
        texts = [row["text"] for row in csv.DictReader(fh)]
    return {"images": write_image_folder(root / "digits_images"), "resnet": write_resnet(root / "resnet_tiny", **EXAMPLE_RESNET),
            "texts": texts_csv, "bert": write_bert(root / "bert_tiny", texts, **EXAMPLE_BERT)}


def cmd_examples(args: argparse.Namespace) -> int:
    from optforge.flows.environment import quiet_libraries

    quiet_libraries()  # no "Writing model shards" bars
    written = write_examples(Path(args.out))
    for name, path in written.items():
        print(f"{name:7} {path}")
    print("run: optforge run --config configs/examples/image_resnet.yaml  (or text_bert.yaml)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("examples", help="write the example image folder, text set and small Hugging Face models")
    p.add_argument("--out", default="examples", help="folder to write into (configs/examples/ read 'examples/')")
    p.set_defaults(func=cmd_examples)
