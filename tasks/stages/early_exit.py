"""Prefect task: add early-exit heads to a PyTorch model folder, train them, choose the threshold on validation.

Logged to the stage's MLflow run: the threshold and how it was chosen, the full model's and the exits'
accuracy, the share of test samples leaving at each exit (``exit_share_<i>``, the model's own head last),
the expected batch-1 latency over that mix (PyTorch, from each exit's measured latency), and the
accuracy-latency curve over the thresholds (``early_exit_curve.json`` and a plot). The benchmark then times
the exported model on real test rows, so its latency is the real mix, not this estimate.
"""

from __future__ import annotations

import mlflow

from optforge.tasks.runtime.caching import stage_task
from optforge.tasks.runtime.progress import StageProgress
from optforge.tasks.runtime.refs import DataRef, ModelRef
from optforge.tasks.runtime.tracking import child_run
from optforge.tasks.stages.compress import log_result, open_input, output_and_tags, torch_ref
from optforge.tasks.techniques.compression.early_exit import NEVER, EarlyExitConfig, EarlyExitModel
from optforge.tasks.techniques.compression.exit_policy import (
    choose_threshold,
    curve,
    exit_latencies_ms,
    exit_probs,
    train_heads,
)
from optforge.tasks.techniques.models.models import save_model


@stage_task("early_exit")
def early_exit(cfg: EarlyExitConfig, model: ModelRef, teacher: ModelRef, data: DataRef, workdir: str,
               parent_run_id: str | None, run_name: str = "early_exit") -> ModelRef:
    """Exit heads after the chosen blocks, trained from the final head; the threshold meets the accuracy budget."""
    out, tags = output_and_tags("early_exit", cfg, model, teacher, data, workdir)
    with child_run(parent_run_id, "early_exit", run_name=run_name, params={"early_exit": cfg.to_dict()}, tags=tags,
                   system_metrics=True) as run:
        net, spec, splits, before, acc_before = open_input(model, data)
        ee = EarlyExitModel(net, cfg.exits, spec.num_classes, splits.contract.example(batch=1))
        with StageProgress(f"{run_name} heads", cfg.finetune.epochs) as progress:
            train_heads(ee, splits.train, cfg, on_epoch=progress.feed().epoch)
        latencies = exit_latencies_ms(ee, splits.test.take([0]))
        val_probs = exit_probs(ee, splits.val)
        val_curve = curve(val_probs, splits.val.labels, latencies, cfg.thresholds)
        if cfg.threshold is None:
            pick, how = choose_threshold(val_curve, cfg.accuracy_budget), "validation"
        else:  # curve(..., [t])[0] is the row of threshold t
            pick, how = curve(val_probs, splits.val.labels, latencies, [cfg.threshold])[0], "config"
        ee.threshold.fill_(pick["threshold"])
        test_row = curve(exit_probs(ee, splits.test), splits.test.labels, latencies, [pick["threshold"]])[0]
        _log_exits(val_curve, pick, how, test_row, latencies, ee.exits)
        spec = spec.then("early_exit", {"exits": ee.exits, "threshold": pick["threshold"]})
        info = log_result(ee, before, acc_before, splits)
        save_model(ee, spec, out / "model")
        mlflow.log_artifacts(str(out / "model"), "model")
    return torch_ref("early_exit", out / "model", run.info.run_id,
                info | {"early_exit": {"threshold": pick["threshold"], "shares": test_row["shares"]}})


def _log_exits(val_curve: list[dict], pick: dict, how: str, test_row: dict, latencies: list[float],
               exits: list[int]) -> None:
    full = next(r for r in val_curve if r["threshold"] == NEVER)
    mlflow.log_params({"early_exit.chosen_threshold": pick["threshold"], "early_exit.chosen_by": how,
                       "early_exit.blocks": ",".join(map(str, exits))})
    mlflow.log_metrics({"val_accuracy_full": full["accuracy"], "val_accuracy_exits": pick["accuracy"],
                        "expected_latency_ms_b1": test_row["expected_latency_ms"],
                        "full_latency_ms_b1": latencies[-1],
                        **{f"exit_share_{i}": share for i, share in enumerate(test_row["shares"])},
                        **{f"exit_latency_ms_{i}": ms for i, ms in enumerate(latencies)}})
    if pick["threshold"] == NEVER:
        mlflow.set_tag("optforge.note", "early_exit: no threshold kept validation accuracy within "
                       "accuracy_budget, so every sample runs to the model's own head")
    mlflow.log_dict({"exit_blocks": exits, "exit_latency_ms_b1": latencies, "validation": val_curve, "chosen": pick,
                     "test": test_row}, "early_exit_curve.json")
    mlflow.log_figure(_plot(val_curve, pick), "early_exit_curve.png")


def _plot(rows: list[dict], pick: dict):
    from matplotlib.figure import Figure  # the object API, as the report uses: no pyplot global state

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.plot([r["expected_latency_ms"] for r in rows], [r["accuracy"] for r in rows], "o-")
    for r in rows:
        ax.annotate("full" if r["threshold"] == NEVER else f"{r['threshold']:g}",
                    (r["expected_latency_ms"], r["accuracy"]), fontsize=7)
    ax.plot([pick["expected_latency_ms"]], [pick["accuracy"]], "r*", markersize=12, label="chosen")
    ax.set_xlabel("expected latency at batch 1 (ms, PyTorch)")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend()
    fig.tight_layout()
    return fig
