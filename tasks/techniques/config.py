"""Base class of the typed per-technique configs.

Each technique owns one config. The config's dict is what gets logged as MLflow params and what
keys the Prefect cache, so it must round-trip through JSON/YAML unchanged (see
``tests/techniques/test_config.py``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class TechniqueConfig(BaseModel):
    """Frozen, strict pydantic model: unknown keys are errors that name the key."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field (what MLflow logs and the cache hashes)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Inverse of ``to_dict``."""
        return cls.model_validate(data)
