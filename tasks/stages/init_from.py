"""Prefect task: turn ``train.init_from`` into a local model folder the training workers can read.

Accepted forms: ``runs:/RUN_ID/PATH`` (e.g. the train stage's ``runs:/…/model``), ``models:/NAME@ALIAS``
or ``models:/NAME/VERSION`` (a registered PyTorch version: its state_dict and spec travel as the
flavor's extra files), and a local folder holding ``model.pt`` + ``model.json``. The folder is copied
under ``<workdir>/init/<content hash>/``, and that hash goes into the train stage's cache key, so
moving an alias to another version re-trains while an unchanged one reuses the cached stage.

Not cached itself on purpose: an alias is a pointer that can move between runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task

from optforge.tasks.runtime.refs import Format, ModelRef, file_sha256
from optforge.tasks.techniques.models.init_weights import FIELD
from optforge.tasks.techniques.models.models import MODEL_FILES, missing_model_file


def _model_folder(root: Path) -> Path | None:
    """The folder under ``root`` that holds model.json + model.pt (itself, model/, or extra_files/)."""
    for folder in (root, root / "model", root / "extra_files"):
        if missing_model_file(folder) is None:
            return folder
    return None


def _registered_version(uri: str) -> tuple[str, str]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, version); a clear error when absent."""
    client, rest = MlflowClient(), uri.removeprefix("models:/")
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return name, str(client.get_model_version_by_alias(name, alias).version)
        name, _, version = rest.partition("/")
        return name, str(client.get_model_version(name, version).version)
    except MlflowException as exc:
        raise ValueError(f"{FIELD}: no registered model version at {uri} ({exc.message})") from None


def _torch_source_hint(name: str, version: str) -> str:
    """For a non-PyTorch version: the PyTorch model it was made from, when the pipeline run says so."""
    tags = MlflowClient().get_model_version(name, version).tags
    try:
        parent = MlflowClient().get_run(tags.get("pipeline_run", "")).data.tags
    except MlflowException:
        return ""
    train_run = parent.get("optforge.stage.train.run_id")
    return f"; its FP32 PyTorch source is runs:/{train_run}/model" if train_run else ""


def _download(uri: str, into: Path) -> Path:
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(into)))
    except (MlflowException, OSError) as exc:
        raise ValueError(f"{FIELD}: cannot fetch {uri} ({exc})") from None


def fetch_init_model(init_from: str, workdir: str) -> ModelRef:
    """Resolve and copy ``init_from`` into the work folder; return a reference to the model folder."""
    resolved = init_from
    with tempfile.TemporaryDirectory() as tmp:
        if init_from.startswith("models:/"):
            name, version = _registered_version(init_from)
            resolved = f"models:/{name}/{version}"
            folder = _model_folder(_download(resolved, Path(tmp)))
            if folder is None:
                raise ValueError(f"{FIELD}: {init_from} (version {version}) is not a PyTorch model that can be "
                                 f"fine-tuned{_torch_source_hint(name, version)}")
        elif init_from.startswith("runs:/"):
            folder = _model_folder(_download(init_from, Path(tmp)))
            if folder is None:
                raise ValueError(f"{FIELD}: {init_from} holds no model.pt + model.json (a PyTorch model folder)")
        else:
            local = Path(init_from).expanduser()
            if not local.exists():
                raise ValueError(f"{FIELD}: {init_from} does not exist")
            folder = _model_folder(local.parent if local.is_file() else local)
            if folder is None:
                raise ValueError(f"{FIELD}: {init_from} is not a model folder (expected model.pt + model.json)")
        sha = file_sha256(folder)
        dest = Path(workdir).resolve() / "init" / sha[:16]
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".staging-"))
            for f in MODEL_FILES:
                shutil.copy2(folder / f, staging / f)
            try:
                os.replace(staging, dest)  # a complete folder appears, or none
            except OSError:  # another run put the same content there first
                shutil.rmtree(staging, ignore_errors=True)
    return ModelRef("init", Format.TORCH, str(dest), sha, info={"init_from": init_from, "resolved": resolved})


@task(name="resolve_init")
def resolve_init(init_from: str, workdir: str) -> ModelRef:
    """Prefect shell of ``fetch_init_model`` (runs every time: see the module docstring)."""
    return fetch_init_model(init_from, workdir)
