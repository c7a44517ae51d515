"""Pareto dominance over (accuracy up, latency down, size down), and the plot that shows it.

A variant is on the frontier when no other variant is at least as accurate, at least as fast and at
least as small, and strictly better in one of the three. Equal points do not dominate each other, so
exact duplicates both stay on the frontier (the ranking rule breaks that tie, not this module).
"""

from __future__ import annotations

from pathlib import Path

Metrics = dict[str, dict[str, float]]
# What selection made of a variant -> its colour in the plot.
STATUS_COLORS = {
    "selected": "#2ca02c",
    "candidate": "#1f77b4",
    "dominated": "#9ecae1",
    "not registrable": "#ff7f0e",
    "misses goals": "#9e9e9e",
}


def objectives(latency_metric: str) -> tuple[tuple[str, int], ...]:
    """(metric, sign) pairs where a larger ``sign * value`` is better."""
    return (("accuracy", 1), (latency_metric, -1), ("size_mb", -1))


def dominates(a: dict[str, float], b: dict[str, float], latency_metric: str) -> bool:
    """True when ``a`` is no worse than ``b`` on every objective and better on at least one."""
    pairs = [(sign * a[m], sign * b[m]) for m, sign in objectives(latency_metric)]
    return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)


def dominator(name: str, metrics: Metrics, among: list[str] | tuple[str, ...], latency_metric: str) -> str | None:
    """The first variant of ``among`` that dominates ``name``, or None when none does."""
    return next((o for o in among if o != name and dominates(metrics[o], metrics[name], latency_metric)), None)


def pareto_front(
    metrics: Metrics, latency_metric: str, among: list[str] | tuple[str, ...] | None = None
) -> tuple[str, ...]:
    """Names in ``among`` (default: all, in input order) that no other name in ``among`` dominates."""
    names = list(metrics) if among is None else list(among)
    return tuple(n for n in names if dominator(n, metrics, names, latency_metric) is None)


def _place_labels(ax, points: list[tuple[float, float]], labels: list[str], areas: list[float], dpi: float) -> None:
    """Annotate each point where its text covers the least of other labels and markers; leader lines to far ones."""
    px = dpi / 72  # display pixels per point (1/72 inch)
    radii = [0.5 * a**0.5 for a in areas]  # pt; half the side of a square of the marker's area
    centers = ax.transData.transform(points)
    markers = [(x - r * px, y - r * px, x + r * px, y + r * px) for (x, y), r in zip(centers, radii)]
    placed: list[tuple[float, float, float, float]] = []
    frame = ax.get_window_extent()

    def inter(a, b) -> float:
        return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))

    def covered(box, own):
        others = placed + [m for j, m in enumerate(markers) if j != own]
        outside = (box[2] - box[0]) * (box[3] - box[1]) - inter(box, (frame.x0, frame.y0, frame.x1, frame.y1))
        return sum(inter(box, b) for b in others) + 2 * outside  # text outside the axes would hit the title or legend

    for i in sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1])):
        (x, y), r = centers[i], radii[i]
        w = 4.6 * max(len(line) for line in labels[i].split("\n")) * px  # ~4.6 pt per character at font size 8
        h = 22 * px  # two lines of 8 pt text
        # Beside the marker first, then above/below it, then further out (nearest first).
        steps = [
            (r + 3, -11),
            (-(r + 3), -11),
            (r * 0.5, r + 2),
            (r * 0.5, -(r + 24)),
            (-(r * 0.5), r + 2),
            (-(r * 0.5), -(r + 24)),
            (r + 6, r + 20),
            (r + 6, -(r + 42)),
            (-(r + 6), r + 20),
            (-(r + 6), -(r + 42)),
        ]
        options = []
        for dx, dy in steps:
            left = x + dx * px if dx > 0 else x + dx * px - w
            options.append(((left, y + dy * px, left + w, y + dy * px + h), dx, dy))
        box, dx, dy = min(options, key=lambda o: covered(o[0], i))  # min() keeps the first of equally good ones
        placed.append(box)
        far = (dx, dy) not in steps[:2]  # not right beside its marker: a leader line says whose label it is
        leader = {"arrowprops": {"arrowstyle": "-", "lw": 0.6, "color": "#777", "shrinkB": 0}} if far else {}
        ax.annotate(
            labels[i],
            points[i],
            textcoords="offset points",
            xytext=(dx, dy),
            fontsize=8,
            ha="left" if dx > 0 else "right",
            va="bottom",
            **leader,
        )


def plot_pareto(
    points: dict[str, tuple[float, float, float]],
    status: dict[str, str],
    front: set[str],
    floor: float,
    targets: list[tuple[float, str]],
    baseline: str,
    latency_metric: str,
    path: str | Path,
) -> Path:
    """Accuracy against latency, marker area proportional to size; frontier ringed, floor and targets drawn.

    Args:
        points: name -> (latency ms, accuracy %, size MB).
        status: name -> a key of ``STATUS_COLORS``.
        front: names on the Pareto frontier (drawn with a black ring).
        floor: accuracy floor (%), a horizontal line.
        targets: (latency ms, label) vertical lines: a latency target, the latency a speed-up goal asks for.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    names = list(points)
    xs, ys, sizes = ([points[n][i] for n in names] for i in range(3))
    biggest = max(sizes) or 1.0
    areas = [60 + 1200 * s / biggest for s in sizes]  # marker area in pt^2: 60 for the smallest, 1,260 for the largest
    fig = Figure(figsize=(8, 5.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for n, x, y, area in zip(names, xs, ys, areas):
        ring, chosen = n in front, status[n] == "selected"
        ax.scatter(
            [x],
            [y],
            s=area,
            color=STATUS_COLORS[status[n]],
            alpha=0.95 if chosen else 0.6,
            zorder=5 if chosen else 3,  # the selected variant stays visible inside a cluster
            edgecolors="black" if ring else "white",
            linewidths=1.8 if ring else 0.8,
            marker="*" if status[n] == "selected" else "o",
        )
    ax.axhline(floor, color="#d62728", ls=":", lw=1.2)
    ax.annotate(
        f"accuracy floor {floor:.2f}%",
        (0.01, floor),
        xycoords=("axes fraction", "data"),
        textcoords="offset points",
        xytext=(0, 3),
        fontsize=8,
        color="#d62728",
    )
    for x, label in targets:
        ax.axvline(x, color="#9467bd", ls=":", lw=1.2)
        ax.annotate(
            label,
            (x, 0.02),
            xycoords=("data", "axes fraction"),
            xytext=(3, 0),
            textcoords="offset points",
            fontsize=8,
            color="#9467bd",
        )
    if min(xs) > 0 and max(xs) / min(xs) > 20:  # variants an order of magnitude apart: log scale keeps all readable
        ax.set_xscale("log")
    ax.margins(x=0.25, y=0.2)
    ax.set_xlabel(f"{latency_metric} (ms, lower is better)")
    ax.set_ylabel("accuracy % (higher is better)")
    ax.set_title("Accuracy vs latency; marker area ∝ size (MB)", fontsize=11)
    ax.grid(True, alpha=0.3)
    handles = [
        Line2D([], [], ls="", marker="*" if k == "selected" else "o", color=c, markersize=9, label=k)
        for k, c in STATUS_COLORS.items()
    ]
    handles.append(
        Line2D(
            [],
            [],
            ls="",
            marker="o",
            mfc="white",
            mec="black",
            mew=1.8,
            label="Pareto frontier (accuracy, latency, size)",
        )
    )
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=3, frameon=False)
    fig.draw_without_rendering()  # final layout first: labels are placed in display coordinates
    labels = [f"{n}{' (baseline)' if n == baseline else ''}\n{s:.2f} MB" for n, s in zip(names, sizes)]
    _place_labels(ax, list(zip(xs, ys)), labels, areas, fig.dpi)
    path = Path(path)
    fig.savefig(path)
    return path
