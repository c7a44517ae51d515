"""The run report: a markdown file, a self-contained HTML page and a Pareto plot (PNG).

Pure rendering from plain data (metrics, the selection, the registry outcome), so the pipeline's
report stage and ``optforge report RUN_ID`` (which reads the same data back from MLflow) produce the
same files. Matplotlib's object API with the Agg canvas: no pyplot global state, no display needed.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optforge.tasks.techniques.measurement.pareto import plot_pareto
from optforge.tasks.techniques.measurement.selection import RegisterConfig, Selection, describe_goals, is_measured

MARKDOWN, HTML, PLOT = "report.md", "report.html", "pareto.png"
# (key, header, format) of the variants table; "speedup" and "delta" are derived from the baseline.
COLUMNS = (
    ("variant", "variant", "{}"),
    ("format", "format", "{}"),
    ("accuracy", "accuracy %", "{:.2f}"),
    ("delta", "Δ acc (pts)", "{:+.2f}"),
    ("latency_ms_p50_b1", "p50 b1 ms", "{:.4g}"),  # 4 significant digits: from microseconds to seconds
    ("latency_ms_p95_b1", "p95 b1 ms", "{:.4g}"),
    ("speedup", "speed-up", "{:.2f}x"),
    ("throughput_sps_b64", "thr b64 /s", "{:,.0f}"),
    ("size_mb", "size MB", "{:.4g}"),
    ("params", "params", "{:,.0f}"),
    ("pareto", "Pareto", "{}"),
    ("verdict", "verdict", "{}"),
)


@dataclass(frozen=True)
class ReportData:
    """Everything a report shows; ``variants`` maps name -> metrics in display order."""

    title: str
    variants: dict[str, dict[str, float]]
    selection: Selection
    cfg: RegisterConfig
    registration: dict[str, Any]  # variant, model_name, version, alias, decision, compared_with, reason
    formats: dict[str, str] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)  # provenance: label -> value
    note: str = ""
    # Early-exit stages: run name -> early_exit_curve.json (the validation curve over thresholds, the choice).
    exit_curves: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportFiles:
    folder: Path
    markdown: Path
    html: Path
    plot: Path


def _status(name: str, sel: Selection) -> str:
    verdict = sel.verdicts.get(name, "")
    if verdict == "selected" and sel.chosen == name:
        return "selected"
    for key in ("misses goals", "not registrable", "not measured", "dominated"):
        if key in verdict:
            return key
    return "candidate"


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def variant_rows(data: ReportData) -> list[dict[str, Any]]:
    """One dict per variant with raw values, NaN where a variant was not measured."""
    base = data.variants.get(data.cfg.baseline, {})
    lat = data.cfg.latency_metric
    rows = []
    for name, m in data.variants.items():
        row = {"variant": name, "format": data.formats.get(name, "?"), **m}
        row["delta"] = _number(m.get("accuracy")) - _number(base.get("accuracy"))
        speedup = _number(base.get(lat)) / _number(m.get(lat)) if _number(m.get(lat)) > 0 else math.nan
        row["speedup"] = speedup
        row["pareto"] = "yes" if name in data.selection.pareto else ""
        row["verdict"] = data.selection.verdicts.get(name, "")
        rows.append(row)
    return rows


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def formatted_rows(data: ReportData) -> list[list[str]]:
    """The table's cells as text ("–" for what was not measured)."""
    return [[_cell(row.get(k), fmt) for k, _, fmt in COLUMNS] for row in variant_rows(data)]


def headline(data: ReportData) -> str:
    """One sentence: what was registered and with which alias, or that nothing was."""
    reg = data.registration
    if reg.get("version"):
        text = (
            f"Registered {reg['model_name']} version {reg['version']} ({reg['variant']}) as '{reg.get('alias') or '?'}'"
        )
        if reg.get("alias") == "champion" and reg.get("compared_with"):
            text += f", replacing version {reg['compared_with']}"
        return text + "."
    return "Nothing registered: " + str(reg.get("reason") or data.selection.reason)


def explanation(data: ReportData) -> list[str]:
    """Why: the selection rule's outcome, then the registry's decision."""
    sel, cfg = data.selection, data.cfg
    lines = []
    if sel.chosen:
        value = data.variants[sel.chosen][cfg.rank_by]
        lines.append(
            f"Selection: {sel.chosen} has the best {cfg.rank_by} ({value:.4g}) of {len(sel.candidates)} "
            f"candidate(s), the variants that meet the goals, can be registered and are on the Pareto "
            f"frontier among those (ties: higher accuracy, then smaller size, then name)."
        )
    else:
        lines.append(f"Selection: {sel.reason}")
    if data.registration.get("decision"):
        lines.append(f"Registry: {data.registration['decision']}")
    elif sel.chosen and not data.registration.get("version"):
        lines.append(f"Registry: {data.registration.get('reason', '')}")
    return lines


def rules(data: ReportData) -> list[str]:
    """The goals with this run's numbers, the ranking metric and the promotion rule."""
    cfg, base = data.cfg, data.variants.get(data.cfg.baseline)
    better = f"more than {cfg.min_improvement:g}% better" if cfg.min_improvement else "better"
    return [
        describe_goals(cfg, base["accuracy"]) if base else f"(baseline {cfg.baseline} missing)",
        f"ranked by {cfg.rank_by}; Pareto frontier over accuracy, {cfg.latency_metric} and size",
        (
            f"takes 'champion' only within the same accuracy gate of the champion (re-scored on this data) and "
            f"{better} by {cfg.rank_by}; otherwise 'challenger'"
        ),
    ]


def plot(data: ReportData, path: str | Path) -> Path:
    """The report's Pareto plot: every measured variant, coloured by what selection made of it."""
    cfg, sel, lat = data.cfg, data.selection, data.cfg.latency_metric
    measured = {n: m for n, m in data.variants.items() if is_measured(m, cfg)}  # unmeasured: no point to draw
    points = {n: (m[lat], m["accuracy"], m["size_mb"]) for n, m in measured.items()}
    targets = []
    if cfg.max_latency_ms is not None:
        targets.append((cfg.max_latency_ms, f"max {cfg.max_latency_ms:g} ms"))
    if cfg.min_speedup is not None and cfg.baseline in measured:
        targets.append((measured[cfg.baseline][lat] / cfg.min_speedup, f"{cfg.min_speedup:g}x speed-up"))
    return plot_pareto(
        points, {n: _status(n, sel) for n in points}, set(sel.pareto), sel.floor, targets, cfg.baseline, lat, path
    )


def exit_tables(data: ReportData) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per early-exit stage: a title, headers and rows of its accuracy-latency curve (validation split)."""
    tables = []
    for name, record in data.exit_curves.items():
        exits = [f"after block {b}" for b in record["exit_blocks"]] + ["at the head"]
        headers = ["threshold", "val accuracy %", "expected b1 ms (PyTorch)", *(f"share {e}" for e in exits)]
        chosen = record["chosen"]["threshold"]
        rows = [[("full" if r["threshold"] > 1 else f"{r['threshold']:g}") + (" (chosen)" if r["threshold"] == chosen
                                                                             else ""),
                 f"{r['accuracy']:.2f}", f"{r['expected_latency_ms']:.4g}", *(f"{s:.0%}" for s in r["shares"])]
                for r in record["validation"]]
        test = record["test"]
        title = (f"Early exit: {name} (test split at the chosen threshold: {test['accuracy']:.2f}% accuracy, "
                 f"shares {', '.join(f'{s:.0%}' for s in test['shares'])})")
        tables.append((title, headers, rows))
    return tables


def render_markdown(data: ReportData, plot_ref: str | None = PLOT) -> str:
    """GitHub-flavored markdown; ``plot_ref`` None replaces the image with a pointer (Prefect UI)."""
    headers = [h for _, h, _ in COLUMNS]
    lines = [f"# {data.title}", "", f"**{headline(data)}**", ""]
    lines += [f"- {t}" for t in explanation(data)]
    lines += ["", "## Goals and rules", ""] + [f"- {t}" for t in rules(data)]
    lines += ["", "## Variants", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in formatted_rows(data)]
    lines += ["", "## Pareto plot", ""]
    lines.append(
        f"![accuracy vs latency]({plot_ref})" if plot_ref else f"See `{PLOT}` in the MLflow run's `report/` artifacts."
    )
    for title, headers, rows in exit_tables(data):
        lines += ["", f"## {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    if data.meta:
        lines += ["", "## Provenance", ""] + [f"- {k}: `{v}`" for k, v in data.meta.items()]
    if data.note:
        lines += ["", f"_{data.note}_"]
    return "\n".join(lines) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;padding:0 1em}
table{border-collapse:collapse;font-size:14px}th,td{padding:4px 8px;border-bottom:1px solid #ddd;text-align:right}
th{background:#f3f3f3}td:first-child,td:nth-child(2),td:last-child,th:first-child,th:nth-child(2),th:last-child{text-align:left}
tr.selected{background:#e6f4e6;font-weight:600}tr.misses{color:#888}.headline{font-size:1.15em}
img{max-width:100%;border:1px solid #eee}code{background:#f3f3f3;padding:0 3px}"""


def render_html(data: ReportData, png: bytes) -> str:
    """One self-contained page: inline CSS, the plot as a data URI."""
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for _, h, _ in COLUMNS)
    body = []
    for name, row in zip(data.variants, formatted_rows(data)):
        status = _status(name, data.selection)
        cls = {"selected": "selected", "misses goals": "misses", "not measured": "misses"}.get(status, "")
        body.append(f'<tr class="{cls}">' + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(data.title)}</title><style>{_CSS}</style>",
        f"</head><body><h1>{e(data.title)}</h1><p class='headline'><strong>{e(headline(data))}</strong></p><ul>",
        *(f"<li>{e(t)}</li>" for t in explanation(data)),
        "</ul><h2>Goals and rules</h2><ul>",
        *(f"<li>{e(t)}</li>" for t in rules(data)),
        "</ul>",
        f"<h2>Variants</h2><table><tr>{head}</tr>{''.join(body)}</table><h2>Pareto plot</h2>",
        f"<img alt='accuracy vs latency' src='data:image/png;base64,{base64.b64encode(png).decode()}'>",
    ]
    for title, headers, rows in exit_tables(data):
        parts.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr>"
                     + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
                     + "</table>")
    if data.meta:
        parts.append(
            "<h2>Provenance</h2><ul>"
            + "".join(f"<li>{e(k)}: <code>{e(v)}</code></li>" for k, v in data.meta.items())
            + "</ul>"
        )
    if data.note:
        parts.append(f"<p><em>{e(data.note)}</em></p>")
    return "".join(parts) + "</body></html>\n"


def write_report(data: ReportData, folder: str | Path) -> ReportFiles:
    """Write ``report.md``, ``report.html`` and ``pareto.png`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png = plot(data, folder / PLOT)
    (folder / MARKDOWN).write_text(render_markdown(data), encoding="utf-8")
    (folder / HTML).write_text(render_html(data, png.read_bytes()), encoding="utf-8")
    return ReportFiles(folder, folder / MARKDOWN, folder / HTML, png)
