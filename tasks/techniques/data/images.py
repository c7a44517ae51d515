"""Image folders: one sub-folder per class (the layout torchvision's ``ImageFolder`` reads), PNG or JPEG.

Each image is decoded with Pillow, resized (shorter side), center-cropped to a square, scaled to
[0, 1] and normalised per channel, then written into a memory-mapped (N, C, H, W) float32 array of
its split, one image at a time: preparing a folder never holds more than one image in memory.
Classes are the sub-folders' names in sorted order (or a Hugging Face head's own order); the split is by file, seeded like every source.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from optforge.tasks.techniques.contract import image_contract
from optforge.tasks.techniques.data.data import class_order, write_meta
from optforge.tasks.techniques.data.split import split_indices

SUFFIXES = (".png", ".jpg", ".jpeg")


def scan(folder: Path, wanted=None, preferred=None) -> tuple[list[Path], np.ndarray, list[str]]:
    """(files, labels, class names) of an image folder, classes in ``class_order``; errors name the folder and
    what was expected."""
    if not folder.is_dir():
        raise FileNotFoundError(f"data.source: image folder not found: {folder}")
    classes = [p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not classes:
        raise ValueError(f"data.source: {folder} has no class sub-folders; expected one sub-folder of images per class "
                         "(e.g. cat/1.png, dog/2.png)")
    classes = class_order(classes, wanted, preferred, str(folder))
    files, labels = [], []
    for i, name in enumerate(classes):
        found = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        files += found
        labels += [i] * len(found)
    counts = {c: labels.count(i) for i, c in enumerate(classes)}
    non_empty = [c for c, n in counts.items() if n]
    if len(non_empty) < 2:
        raise ValueError(f"data.source: {folder} has images of {len(non_empty)} class(es) {non_empty}; need at least 2 "
                         f"class sub-folders with {'/'.join(SUFFIXES)} images (found {counts})")
    return files, np.asarray(labels, np.int64), classes


def load_image(path: Path, mode: str, resize: int, crop: int, mean: np.ndarray, std: np.ndarray,
               resample: str = "bilinear", rescale: bool = True) -> np.ndarray:
    """One image as normalised float32 (C, crop, crop); an unreadable file is a ValueError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert(mode)
            w, h = img.size
            scale = resize / min(w, h)
            img = img.resize((max(crop, round(w * scale)), max(crop, round(h * scale))),
                             Image.Resampling[resample.upper()])
            w, h = img.size
            left, top = (w - crop) // 2, (h - crop) // 2
            img = img.crop((left, top, left + crop, top + crop))
            arr = np.asarray(img, dtype=np.float32) / (255.0 if rescale else 1.0)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"data.source: cannot read image {path} ({type(exc).__name__}: {exc})") from exc
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return ((arr - mean) / std).transpose(2, 0, 1).astype(np.float32)


def _first_size(path: Path) -> int:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return min(img.size)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"data.source: cannot read image {path} ({type(exc).__name__}: {exc})") from exc


def prepare_images(cfg, out: Path, model_classes=None) -> None:
    """Decode ``cfg.source`` into the split folder ``out`` (see ``tasks.techniques.data.data``); ``model_classes``:
    the head's class order, kept when its names are the folders' (``class_order``)."""
    folder = Path(cfg.source)
    files, labels, classes = scan(folder, cfg.classes, model_classes)
    channels = 3 if cfg.image_mode == "RGB" else 1
    crop = cfg.image_size or _first_size(files[0])
    resize = cfg.resize or crop
    mean, std = _channel_stats(cfg.mean, channels, "data.mean"), _channel_stats(cfg.std, channels, "data.std")
    num_classes = cfg.num_classes or len(classes)
    if num_classes < len(classes):
        raise ValueError(f"data.num_classes: {num_classes} but {folder} has {len(classes)} class folders")
    train, val, test = split_indices(len(files), cfg, "data.source")
    for part, index in (("train", train), ("val", val), ("test", test)):
        sub = out / part
        sub.mkdir(parents=True)
        pixels = np.lib.format.open_memmap(sub / "pixel_values.npy", mode="w+", dtype=np.float32,
                                           shape=(len(index), channels, crop, crop))
        for row, i in enumerate(index):
            pixels[row] = load_image(files[i], cfg.image_mode, resize, crop, mean, std, cfg.resample, cfg.rescale)
        pixels.flush()
        del pixels
        np.save(sub / "labels.npy", labels[index])
    preprocessing = {"resize": resize, "crop": crop, "mode": cfg.image_mode, "resample": cfg.resample,
                     "rescale": cfg.rescale, "mean": mean.ravel().tolist(),
                     "std": std.ravel().tolist(), "labels": classes, "layout": "NCHW float32, normalised"}
    write_meta(out, image_contract(channels, crop, num_classes, preprocessing), {"images": len(files)})


def _channel_stats(values, channels: int, field: str) -> np.ndarray:
    values = list(values)
    if len(values) == 1:
        values = values * channels
    if channels == 1 and len(values) == 3:  # ImageNet's RGB defaults for a grey image: their mean
        values = [sum(values) / 3]
    if len(values) != channels:
        raise ValueError(f"{field}: expected {channels} value(s) for {channels}-channel images, got {len(values)}")
    return np.asarray(values, np.float32).reshape(1, 1, channels)
