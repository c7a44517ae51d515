"""The report's files from hand-made data: table, plot, decision text (no MLflow, no Prefect)."""

import base64
import re

import matplotlib.image as mpimg
import pytest

from optforge.tasks.techniques.measurement.report import COLUMNS, ReportData, headline, variant_rows, write_report
from optforge.tasks.techniques.measurement.selection import RegisterConfig, select_variant


def m(acc, lat, size):
    return {
        "accuracy": acc,
        "latency_ms_p50_b1": lat,
        "latency_ms_p95_b1": lat * 1.3,
        "size_mb": size,
        "throughput_sps_b64": 1000 / lat,
        "params": 1e6,
    }


VARIANTS = {
    "pytorch_fp32": m(97.4, 2.1, 25.7),
    "onnx_fp32": m(97.4, 1.45, 25.6),
    "onnx_int8_dynamic": m(97.0, 0.6, 6.5),
    "tiny_int8": m(95.2, 0.08, 0.3),
    "trt_fp16": m(97.4, 0.3, 13.0),
}
FORMATS = {"pytorch_fp32": "torch", "trt_fp16": "tensorrt"}


def _data(cfg=None, registration=None):
    cfg = cfg or RegisterConfig(max_latency_ms=1.0)
    formats = {n: FORMATS.get(n, "onnx") for n in VARIANTS}
    sel = select_variant(VARIANTS, cfg, formats)
    registration = registration or {
        "variant": sel.chosen,
        "model_name": "digits",
        "version": "3",
        "alias": "champion",
        "compared_with": "2",
        "decision": "beats champion v2: ...",
        "reason": sel.reason,
    }
    return ReportData("optforge run test", VARIANTS, sel, cfg, registration, formats, {"MLflow run": "abc"})


def test_report_has_the_table_the_plot_and_the_decision(tmp_path):
    files = write_report(_data(), tmp_path / "r")
    md = files.markdown.read_text()
    assert "**Registered digits version 3 (onnx_int8_dynamic) as 'champion', replacing version 2.**" in md
    assert "| " + " | ".join(h for _, h, _ in COLUMNS) + " |" in md
    for name in VARIANTS:
        assert re.search(rf"^\| {name} \|", md, re.MULTILINE), name
    assert "| onnx_int8_dynamic | onnx | 97.00 | -0.40 | 0.6 |" in md
    assert "![accuracy vs latency](pareto.png)" in md and "latency_ms_p50_b1 <= 1 ms" in md
    assert "not registrable" in md and "misses goals: accuracy 95.20% < 96.40%" in md

    png = files.plot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    h, w, _ = mpimg.imread(files.plot).shape
    assert (w, h) == (960, 660)  # 8 x 5.5 inches at 120 dpi
    page = files.html.read_text()
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page  # self-contained: the plot is inline
    assert '<tr class="selected">' in page and page.count("<tr") == len(VARIANTS) + 1
    assert "src='http" not in page and "<script" not in page


def test_nothing_registered_is_said_plainly(tmp_path):
    cfg = RegisterConfig(min_accuracy=99.0)
    data = _data(cfg, registration={"variant": None, "reason": "placeholder"})
    assert headline(data) == "Nothing registered: placeholder"
    files = write_report(data, tmp_path)
    assert "no variant reaches 99.00% accuracy" in files.markdown.read_text()
    assert files.plot.stat().st_size > 10_000


def test_rows_carry_speedup_and_pareto():
    rows = {r["variant"]: r for r in variant_rows(_data())}
    assert rows["pytorch_fp32"]["speedup"] == 1.0 and rows["onnx_int8_dynamic"]["speedup"] == pytest.approx(3.5)
    assert rows["tiny_int8"]["pareto"] == "yes" and rows["pytorch_fp32"]["pareto"] == ""


def test_unmeasured_variants_get_dashes_and_no_point(tmp_path):
    variants = {**VARIANTS, "trt_int8": {}}
    formats = {n: FORMATS.get(n, "onnx") for n in VARIANTS} | {"trt_int8": "skipped"}
    cfg = RegisterConfig()
    sel = select_variant(variants, cfg, formats)
    data = ReportData("t", variants, sel, cfg, {"variant": None, "reason": "disabled"}, formats)
    md = write_report(data, tmp_path).markdown.read_text()
    assert "| trt_int8 | skipped | – | – | – |" in md and "not measured (format 'skipped')" in md


def test_an_early_exit_curve_is_a_table_with_the_chosen_threshold_marked(tmp_path):
    from dataclasses import replace

    rows = [{"threshold": t, "accuracy": a, "expected_latency_ms": ms, "shares": sh}
            for t, a, ms, sh in [(0.5, 90.0, 0.4, [0.8, 0.2]), (0.9, 97.0, 0.6, [0.5, 0.5]), (1.01, 97.5, 1.0, [0, 1])]]
    curve = {"exit_blocks": [0], "validation": rows, "chosen": rows[1],
             "test": {"accuracy": 96.5, "shares": [0.45, 0.55]}}
    files = write_report(replace(_data(), exit_curves={"early_exit": curve}), tmp_path)
    text = files.markdown.read_text()
    assert "| share after block 0 | share at the head |" in text
    assert "## Early exit: early_exit (test split at the chosen threshold: 96.50% accuracy, shares 45%, 55%)" in text
    assert "| 0.9 (chosen) | 97.00 | 0.6 | 50% | 50% |" in text and "| full | 97.50 | 1 | 0% | 100% |" in text
    assert "0.9 (chosen)" in files.html.read_text()
    assert "Early exit" not in write_report(_data(), tmp_path / "plain").markdown.read_text()
