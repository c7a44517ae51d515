"""What tasks hand each other: small, picklable references to artifacts on disk.

Tasks pass these instead of models or arrays, so Prefect's result records stay a few hundred bytes
and Ray workers elsewhere can read the files from shared storage. ``sha256`` (of the content) is
what the next stage's cache key uses, so a changed input re-runs everything downstream of it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import Enum
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
    """The split folder and the input contract every stage builds its inputs from."""

    path: str
    sha256: str
    contract: dict  # InputContract.to_dict()
    name: str = "data"  # short name of the source ('digits', a file's stem): registry and dataset names
    sizes: dict[str, int] = field(default_factory=dict)
    run_id: str | None = None

    @property
    def inputs(self):
        from optforge.tasks.techniques.contract import InputContract

        return InputContract.from_dict(self.contract)

    @property
    def num_classes(self) -> int:
        return int(self.contract["num_classes"])


class Format(str, Enum):
    """What a variant's artifact is, and so how it is loaded, timed and registered: a closed set."""

    TORCH = "torch"  # a model folder: model.pt + model.json
    ONNX = "onnx"  # an .onnx file
    TENSORRT = "tensorrt"  # a serialized engine (needs CUDA)
    TVM = "tvm"  # a folder of TVM libraries, one per static batch size, built for one CPU
    TORCH_CUDA = "torch_cuda"  # the baseline's folder, run by PyTorch on CUDA
    SKIPPED = "skipped"  # could not be built here; ``info["skip_reason"]`` says why
    FAILED = "failed"  # a step of its chain raised; ``info["error"]`` (one line) and ``info["failed_step"]`` say which

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ModelRef:
    """A variant's artifact: a PyTorch model folder (model.pt + model.json) or an .onnx file."""

    name: str
    format: Format
    path: str
    sha256: str
    run_id: str | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "format", Format(self.format))  # a typo fails here, not in a loader far away

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
