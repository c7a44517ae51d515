"""What tasks hand each other: small, picklable references to artifacts on disk.

Tasks pass these instead of models or arrays, so Prefect's result records stay a few hundred bytes
and Ray workers elsewhere can read the files from shared storage. ``sha256`` (of the content) is
what the next stage's cache key uses, so a changed input re-runs everything downstream of it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, or of a folder's files (names and bytes, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class DataRef:
    """The split dataset (.npz) and the shapes models need."""

    path: str
    sha256: str
    num_features: int
    num_classes: int
    image_shape: tuple[int, int, int] | None
    sizes: dict[str, int] = field(default_factory=dict)
    run_id: str | None = None


@dataclass(frozen=True)
class ModelRef:
    """A variant's artifact: a PyTorch model folder (model.pt + model.json) or an .onnx file."""

    name: str
    format: str  # "torch" | "onnx"
    path: str
    sha256: str
    run_id: str | None = None
    info: dict = field(default_factory=dict)

    def exists(self) -> bool:
        return Path(self.path).exists()


@dataclass(frozen=True)
class VariantResult:
    """One variant's benchmark metrics (stable names, so MLflow compares them column by column)."""

    name: str
    metrics: dict[str, float]
    run_id: str | None = None


@dataclass(frozen=True)
class Registration:
    """What the register stage decided: a registered version, or why nothing was registered."""

    variant: str | None
    model_name: str | None
    version: str | None
    reason: str
    run_id: str | None = None
