"""Base class of the typed per-technique configs.

Each technique owns one config. The config's dict is what gets logged as MLflow params and what
keys the Prefect cache, so it must round-trip through JSON/YAML unchanged (see
``tests/techniques/test_config.py``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator


class TechniqueConfig(BaseModel):
    """Frozen, strict pydantic model: unknown keys are errors that name the key, and a key that was renamed
    is an error that names its new one (``RENAMED``: old key -> where it lives now), never a silent alias."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
    RENAMED: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            old = [key for key in cls.RENAMED if key in data]
            if old:
                raise ValueError("; ".join(f"{key} is now {cls.RENAMED[key]}" for key in old))
        return data

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field (what MLflow logs and the cache hashes)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Inverse of ``to_dict``."""
        return cls.model_validate(data)
