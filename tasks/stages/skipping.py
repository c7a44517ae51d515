"""A variant that cannot be built here: its reason recorded once, for every engine stage that may skip.

The stage still completes: the reason goes to the MLflow run (tag ``optforge.skipped``), to a marker
file in the stage's folder, to the Prefect state's message, and through the benchmark into the summary
table. A missing GPU or optional package never fails the pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from prefect.states import Completed

from optforge.tasks.runtime.refs import Format, ModelRef, file_sha256


def skipped_variants(reason: str, names: list[str], out: Path, onnx_model: ModelRef, run_id: str,
                     single: bool = False):
    """A Completed state (its message names the variants and the reason) whose data are one
    ``Format.SKIPPED`` ref per name; with ``single``, the one ref itself (a stage that returns one variant)."""
    mlflow.set_tag("optforge.skipped", reason)
    marker = out / "skipped.json"
    out.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"reason": reason, "variants": names}, indent=2))
    tmp.replace(marker)
    info = {"skip_reason": reason, "source_onnx": onnx_model.path}
    refs = [ModelRef(n, Format.SKIPPED, str(marker), file_sha256(marker), run_id, info) for n in names]
    return Completed(message=f"skipped {', '.join(names)}: {reason}", data=refs[0] if single else refs)
