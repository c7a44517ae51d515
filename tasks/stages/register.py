"""Prefect task: select a variant, register it, and give it the ``champion`` or ``challenger`` alias.

The rules live in ``tasks.techniques.measurement.selection``; this shell does the registry I/O. The version
holding ``champion`` is loaded through pyfunc and scored on *this* run's test split, so the accuracy
gate compares both models on the same data; its ranking metric (latency, size, ...) is the one
recorded in its model-version tags by the benchmark that measured it (same metric names, same
``benchmark`` settings; the ``cpu_model`` tag says where it was timed). Timings are not re-measured
because a pyfunc wrapper's overhead differs from the benchmark's and would favour neither fairly.

The decision is written to the register run as ``selection.json``, so ``optforge report`` shows what
was decided then, even after the rules in the code change.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import get_args

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from optforge.tasks.runtime.caching import stage_task
from optforge.tasks.runtime.refs import DataRef, Format, ModelRef, Registration, VariantResult
from optforge.tasks.runtime.tracking import child_run, registry_lock
from optforge.tasks.techniques.data.data import Splits, load_splits
from optforge.tasks.techniques.data.texts import raw_texts
from optforge.tasks.techniques.measurement.benchmark import cpu_model, torch_predictor
from optforge.tasks.techniques.measurement.metrics import top1_accuracy
from optforge.tasks.techniques.measurement.selection import (
    CHAMPION,
    Incumbent,
    RankMetric,
    RegisterConfig,
    decide_promotion,
    select_variant,
)
from optforge.tasks.techniques.models.rebuild import load_model
from optforge.tasks.techniques.onnx.export import save_program

# Run by MLflow on load (a "model from code"); see that file for why ONNX is not logged with mlflow.onnx.
SERVING_PYFUNC = Path(__file__).with_name("serving_pyfunc.py")
METRIC_TAGS = frozenset(get_args(RankMetric))
SELECTION_FILE = "selection.json"
CONTRACT_TAG = "input_contract"  # a hash of the input contract: versions of one name must take the same inputs
# How the three base variants came to be; other variants say it in ModelRef.info["chain"].
BASE_CHAINS = {
    "pytorch_fp32": "train",
    "onnx_fp32": "train>export",
    "onnx_int8_dynamic": "train>export>quantize",
}


@dataclass(frozen=True)
class RegistryOutcome(Registration):
    """A ``Registration`` plus the alias it got and the champion it was compared with."""

    alias: str | None = None  # "champion" or "challenger"
    compared_with: str | None = None  # the version that held "champion" when this one was registered
    decision: str = ""  # why the alias went where it did


def hash_config(config: dict) -> str:
    """16 hex chars of the sha256 of the pipeline config's canonical JSON (the flow passes it to ``register``)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def chain_of(ref: ModelRef) -> str:
    """How the variant was made, e.g. ``train>export>quantize``, from its lineage where it has one."""
    lineage = ref.info.get("lineage", {})
    if lineage.get("chain"):  # compression chains spell it out
        return str(lineage["chain"])
    if lineage.get("parent_variant") and lineage.get("technique"):  # engines: one technique on a parent variant
        parent = lineage["parent_variant"]
        return f"{BASE_CHAINS.get(parent, parent)}>{lineage['technique']}"
    return BASE_CHAINS.get(ref.name, ref.name)


def raw_example(data: DataRef, splits: Splits):
    """What a user of the registered model passes in, four test rows of it: float rows (table), NCHW arrays
    (image) or raw strings (text, kept by the data stage for this)."""
    return next(_raw_batches(data, splits, rows=4))


def _log_torch(ref: ModelRef, data: DataRef, splits: Splits, registered_name: str):
    model, _ = load_model(ref.path)
    if splits.contract.kind != "table":  # image and text: the pyfunc over an exported program takes raw inputs
        with tempfile.TemporaryDirectory() as tmp:
            program = save_program(model, splits.contract, splits.test.rows(0, 2), Path(tmp) / "model.pt2")
            return _log_pyfunc({"torch_program": str(program)}, data, splits, registered_name, ["torch"])
    example = raw_example(data, splits)
    signature = infer_signature(example, torch_predictor(model, 1)({"input": example}))
    # The model folder (state_dict + spec) rides along as extra files, so that ``train.init_from`` can
    # fine-tune from a registered version without unpickling the flavor's whole-module file.
    extra = [str(Path(ref.path) / "model.json"), str(Path(ref.path) / "model.pt")]
    return mlflow.pytorch.log_model(
        model, name="model", signature=signature, input_example=example, registered_model_name=registered_name,
        extra_files=extra,
    )


def _log_onnx(ref: ModelRef, data: DataRef, splits: Splits, registered_name: str):
    return _log_pyfunc({"onnx_model": ref.path}, data, splits, registered_name, ["onnxruntime"])


def _log_pyfunc(model_artifacts: dict, data: DataRef, splits: Splits, registered_name: str, runtimes: list[str]):
    """Log ``tasks/stages/serving_pyfunc.py`` with the model file, the contract and (text) the tokenizer."""
    import importlib.metadata as md

    artifacts = {**model_artifacts, "contract": str(Path(data.path) / "contract.json")}
    if splits.contract.kind == "text":
        artifacts["tokenizer"] = str(Path(data.path) / "tokenizer")
        runtimes = [*runtimes, "transformers", "tokenizers"]
    example = raw_example(data, splits)
    # Explicit requirements: inferring them would load the model in a subprocess (seconds) to learn the same.
    requirements = [f"{p}=={md.version(p)}" for p in runtimes] + [f"numpy=={np.__version__}"]
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(SERVING_PYFUNC),
        artifacts=artifacts,
        signature=_signature(example, splits),
        input_example=example,
        pip_requirements=requirements,
        registered_model_name=registered_name,
    )


def _signature(example, splits: Splits):
    """Input schema from the raw example; output: (N, num_classes) float32 logits."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, splits.num_classes))])
    return ModelSignature(inputs=infer_signature(example).inputs, outputs=outputs)


LOGGERS = {Format.TORCH: _log_torch, Format.ONNX: _log_onnx}


def predict_logits(model_uri: str, X: np.ndarray) -> np.ndarray:
    """Logits of a registered model of any flavor (older ONNX-flavor versions return {output: array})."""
    out = mlflow.pyfunc.load_model(model_uri).predict(X)
    return np.asarray(next(iter(out.values())) if isinstance(out, dict) else out)


def current_champion(client: MlflowClient, name: str, splits: Splits, data: DataRef) -> Incumbent | None:
    """The version holding ``champion``, scored on ``splits``' test data; None when no version holds it.

    Raises:
        ValueError: the champion takes other inputs (its ``input_contract`` tag differs): comparing it
            with this run's models would be meaningless, so the registry name must differ.
    """
    try:
        version = client.get_registered_model(name).aliases.get(CHAMPION)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    if version is None:
        return None
    tags = client.get_model_version(name, str(version)).tags
    ours = contract_tag(splits.contract)
    if tags.get(CONTRACT_TAG, ours) != ours:
        raise ValueError(f"register.model_name: '{name}' holds models of other inputs (champion version {version}: "
                         f"{tags.get('data_kind', '?')} data {tags.get('inputs', '?')}; this run: {splits.contract.kind} "
                         f"data {','.join(splits.contract.names)}); set register.model_name to a name of its own")
    metrics = {}
    for key in METRIC_TAGS & set(tags):
        try:
            metrics[key] = float(tags[key])
        except ValueError:
            pass
    try:
        logits = np.concatenate([predict_logits(f"models:/{name}/{version}", raw)
                                 for raw in _raw_batches(data, splits)])
        accuracy = top1_accuracy(logits, splits.test.labels)
    except Exception as exc:
        return Incumbent(str(version), None, metrics, f"{type(exc).__name__}: {exc}"[:300])
    return Incumbent(str(version), accuracy, metrics)


def contract_tag(contract) -> str:
    return hashlib.sha256(contract.key().encode()).hexdigest()[:16]


def describe_inputs(contract) -> str:
    """The model version's description: what to pass to ``predict`` and what comes back."""
    pre = contract.preprocessing
    if contract.kind == "text":
        how = f"a list of raw strings; they are tokenized with the logged tokenizer to {pre.get('max_length')} tokens"
    elif contract.kind == "image":
        how = (f"an (N, {', '.join(map(str, contract.inputs[0].sample_shape()))}) float32 array: {pre.get('mode')} "
               f"images resized (shorter side {pre.get('resize')}), center-cropped to {pre.get('crop')}, scaled to "
               f"[0, 1], minus mean {pre.get('mean')}, divided by std {pre.get('std')}")
    else:
        how = f"an (N, {contract.num_features}) float32 array of standardised features"
    labels = pre.get("labels")
    names = f" Classes, in order: {labels}." if labels else ""
    return f"predict() takes {how}; it returns (N, {contract.num_classes}) logits.{names}"


def _raw_batches(data: DataRef, splits: Splits, rows: int = 256):
    """The test split in batches of what the registered pyfunc takes: feature rows or NCHW arrays, or for
    text the raw strings the data stage kept (``test/texts.jsonl``)."""
    if splits.contract.kind == "text":
        from itertools import islice

        texts = raw_texts(data.path)
        while batch := list(islice(texts, rows)):
            yield batch
        return
    (name,) = splits.contract.names
    for inputs, _ in splits.test.batches(rows):
        yield inputs[name]


@stage_task("register")
def register(
    cfg: RegisterConfig,
    results: list[VariantResult],
    variants: list[ModelRef],
    data: DataRef,
    parent_run_id: str | None,
    config_hash: str | None = None,
) -> RegistryOutcome:
    """Register the selected variant and set its alias, or record why nothing is registered.

    Args:
        config_hash: hash of the whole pipeline config (``hash_config(cfg.to_dict())``), put in the version's tags.
    """
    with child_run(parent_run_id, "register", params={"register": cfg.to_dict()}) as run:
        run_id = run.info.run_id
        formats = {v.name: v.format for v in variants}
        selection = select_variant({r.name: r.metrics for r in results}, cfg, formats)
        mlflow.set_tags(
            {"optforge.selection": selection.reason[:5000], "optforge.passing": ",".join(selection.passing)}
        )
        if selection.chosen is None or not cfg.enabled:
            reason = selection.reason if selection.chosen is None else f"register.enabled is false ({selection.reason})"
            outcome = RegistryOutcome(None, None, None, reason, run_id)
        else:
            ref = next(v for v in variants if v.name == selection.chosen)
            chosen = next(r for r in results if r.name == selection.chosen)
            outcome = _register(cfg, ref, chosen, data, selection.reason, run_id, parent_run_id, config_hash)
        mlflow.log_dict(
            {
                "config": cfg.to_dict(),
                "selection": selection.to_dict(),
                "registration": asdict(outcome),
                "variants": {v.name: {"format": v.format, "chain": chain_of(v)} for v in variants},
            },
            SELECTION_FILE,
        )
    return outcome


def _register(
    cfg: RegisterConfig,
    ref: ModelRef,
    chosen: VariantResult,
    data: DataRef,
    why: str,
    run_id: str,
    parent_run_id: str | None,
    cfg_hash: str | None,
) -> RegistryOutcome:
    if not cfg.model_name:
        raise ValueError("register.model_name: not set; the optimize flow derives it (flows.plan.registry_name), "
                         "direct callers must pass one")
    client = MlflowClient()
    splits = load_splits(data.path)
    # From reading the champion to moving the alias, one run at a time (see registry_lock).
    with registry_lock(cfg.model_name):
        return _register_locked(cfg, ref, chosen, data, why, run_id, parent_run_id, cfg_hash, client, splits)


def _register_locked(cfg, ref, chosen, data, why, run_id, parent_run_id, cfg_hash, client, splits) -> RegistryOutcome:
    incumbent = current_champion(client, cfg.model_name, splits, data)  # before registering: the alias still points there
    info = LOGGERS[ref.format](ref, data, splits, cfg.model_name)
    mlflow.log_metrics(chosen.metrics)
    version = str(info.registered_model_version)
    promotion = decide_promotion(chosen.metrics, incumbent, cfg)
    tags = {
        "variant": ref.name,
        "format": ref.format,
        "chain": chain_of(ref),
        "data_fingerprint": data.sha256,
        "config_hash": cfg_hash or "",
        "pipeline_run": parent_run_id or "",
        "benchmark_run": chosen.run_id or "",
        "cpu_model": cpu_model(),
        CONTRACT_TAG: contract_tag(splits.contract),
        "data_kind": splits.contract.kind,
        "inputs": ",".join(splits.contract.names),
        "rank_by": cfg.rank_by,
        "decision": f"{promotion.alias}: {promotion.reason}",
        **{k: f"{v:.6g}" for k, v in chosen.metrics.items()},
    }
    for key, value in tags.items():
        client.set_model_version_tag(cfg.model_name, version, key, value)
    client.update_model_version(cfg.model_name, version, description=describe_inputs(splits.contract))
    client.set_registered_model_alias(cfg.model_name, promotion.alias, version)
    if promotion.alias == CHAMPION and incumbent is not None:
        client.set_model_version_tag(cfg.model_name, incumbent.version, "replaced_by", version)
    mlflow.set_tags(
        {
            "optforge.registered_model": cfg.model_name,
            "optforge.registered_version": version,
            "optforge.alias": promotion.alias,
        }
    )
    reason = f"{why}; {promotion.alias}: {promotion.reason}"
    return RegistryOutcome(
        ref.name,
        cfg.model_name,
        version,
        reason,
        run_id,
        promotion.alias,
        incumbent.version if incumbent else None,
        promotion.reason,
    )
