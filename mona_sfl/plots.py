"""Figures: every plot saved as PNG (200 dpi) and PDF, and the learning curves of run folders
(``mona-sfl plot``): training loss, kNN accuracy, learning rate and online/momentum
misalignment over steps, runs overlaid and labelled by how their configs differ.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Any

from mona_sfl.checkpoint import atomic_write_bytes
from mona_sfl.errors import UserError
from mona_sfl.runs import Run, differing_keys

DPI = 200


def save_figure(fig: Any, path: Path) -> list[Path]:
    """``path`` as PNG at :data:`DPI` and the same name with ``.pdf`` (each written atomically)."""
    png, pdf = path.with_suffix(".png"), path.with_suffix(".pdf")
    for target, fmt in ((png, "png"), (pdf, "pdf")):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=DPI, bbox_inches="tight")
        atomic_write_bytes(target, buf.getvalue())
    return [png, pdf]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: One marker per seed (the seed's position among the seeds shown), in every figure.
SEED_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def human_bytes(x: float, _pos: Any = None) -> str:
    """Bytes in decimal units: ``850 B``, ``12.3 kB``, ``4.5 MB``, ``1.2 GB``, ``3 TB`` (for axis ticks too)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= scale:
            v = x / scale
            return f"{v:.0f} {unit}" if v >= 100 or v == int(v) else f"{v:.1f} {unit}"
    return f"{x:.0f} B"


def bytes_axis(axis: Any) -> None:
    """Label a matplotlib axis (``ax.xaxis`` / ``ax.yaxis``) that shows bytes in MB / GB; on a log
    scale the ticks are at 1, 2 and 5 times the powers of ten (a narrow range still gets labels)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if axis.get_scale() == "log":
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(human_bytes))
    axis.set_minor_formatter(NullFormatter())


def spread_labels(ax: Any, texts: list[Any], pad: float = 2.0, rounds: int = 200) -> None:
    """Move labels (``ax.annotate(..., textcoords="offset points")`` results) apart until no two
    overlap: each round pushes every overlapping pair apart vertically by half the overlap each."""
    if len(texts) < 2:
        return
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    to_pt = 72.0 / fig.dpi
    for _ in range(rounds):
        boxes = [t.get_window_extent(renderer) for t in texts]
        moved = False
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                a, b = boxes[i], boxes[j]
                if a.x1 + pad <= b.x0 or b.x1 + pad <= a.x0 or a.y1 + pad <= b.y0 or b.y1 + pad <= a.y0:
                    continue
                overlap = (min(a.y1, b.y1) - max(a.y0, b.y0) + pad) * to_pt / 2 + 0.5
                lower, upper = (i, j) if (a.y0 + a.y1, i) <= (b.y0 + b.y1, j) else (j, i)
                for k, sign in ((lower, -1.0), (upper, 1.0)):
                    x, y = texts[k].xyann
                    texts[k].xyann = (x, y + sign * overlap)
                moved = True
                boxes = [t.get_window_extent(renderer) for t in texts]
        if not moved:
            return


def run_styles(runs: list[Run]) -> list[tuple[int, str, str]]:
    """Per run: (colour index, marker, line style). Runs that differ only in their seed share a
    colour; each seed has its marker (:data:`SEED_MARKERS`) and line style."""
    keys = [k for k in differing_keys(runs) if k != "seed"]
    groups: list[tuple[str, ...]] = []
    seeds: list[Any] = []
    for r in runs:
        g = tuple(repr(r.config.get(k)) for k in keys)
        if g not in groups:
            groups.append(g)
        if r.config.get("seed") not in seeds:
            seeds.append(r.config.get("seed"))
    if len(groups) == len(runs):  # no seeds to tell apart within a colour: one line style per run
        return [(i, SEED_MARKERS[0], DASHES[i % len(DASHES)]) for i in range(len(runs))]
    out = []
    for r in runs:
        k = seeds.index(r.config.get("seed"))
        out.append((groups.index(tuple(repr(r.config.get(x)) for x in keys)), SEED_MARKERS[k % len(SEED_MARKERS)], DASHES[k % len(DASHES)]))
    return out


#: Line styles: equal curves stay visible on top of each other.
DASHES = ["-", "--", ":", "-."]


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (the first points average what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


#: The y label of the online/momentum misalignment ``ol_ml`` (mean squared difference of the fronts).
MISALIGNMENT = "online vs momentum front:\nmean squared difference"

#: name -> (records that carry it, the y value, y label, title).
CURVES: dict[str, tuple[Any, str, str, str]] = {
    "loss": (lambda r: "loss" in r, "loss", "training loss (InfoNCE)", "Training loss"),
    "knn": (lambda r: "knn_top1" in r, "knn_top1", "kNN top-1 accuracy (%)", "kNN monitor accuracy"),
    "lr": (lambda r: "loss" in r and "lr" in r, "lr", "server learning rate", "Learning rate"),
    "misalignment": (
        lambda r: r.get("sync") and "ol_ml" in r, "ol_ml",
        MISALIGNMENT, "Misalignment at syncs",
    ),
}


def curve_figures(runs: list[Run], labels: list[str]) -> dict[str, Any]:
    """One matplotlib Figure per curve that some run recorded (``loss``, ``knn``, ``lr``, ``misalignment``)."""
    plt = _pyplot()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = run_styles(runs)
    figures: dict[str, Any] = {}
    for name, (has, field, ylabel, title) in CURVES.items():
        series = []
        for run, label, (c, marker, dash) in zip(runs, labels, styles):
            recs = [r for r in run.records if has(r) and isinstance(r.get(field), (int, float))]
            if recs:
                series.append((label, colours[c % len(colours)], marker, dash, [int(r["step"]) for r in recs], [float(r[field]) for r in recs]))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for label, colour, marker, dash, steps, values in series:
            every = max(1, len(values) // 15)  # a few markers per line: the seed stays readable on long curves
            if name == "loss" and len(values) > 50:  # noisy per-step values: faint, with a trailing mean on top
                window = max(2, len(values) // 50)
                ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
                ax.plot(steps, _smooth(values, window), color=colour, linestyle=dash, linewidth=1.6, marker=marker, markevery=every,
                        markersize=4, label=f"{label} (mean of {window} steps)")
            else:
                ax.plot(steps, values, color=colour, linestyle=dash, linewidth=1.6, label=label, marker=marker, markevery=every, markersize=4)
        if name == "misalignment" and all(v > 0 for *_, values in series for v in values):
            ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        # below the axes, long labels wrapped: the plot keeps its width whatever the labels
        handles, texts = ax.get_legend_handles_labels()
        ax.legend(handles, [textwrap.fill(t, 90) for t in texts], loc="upper center", bbox_to_anchor=(0.5, -0.16),
                  fontsize="small", frameon=False)
        figures[name] = fig
    return figures


def plot_runs(runs: list[Run], labels: list[str], out: Path) -> list[Path]:
    """The curves of ``runs`` in ``out`` (``loss``, ``knn``, ``lr``, ``misalignment`` .png and .pdf); the files written."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder: choose another --out")
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for name, fig in curve_figures(runs, labels).items():
        paths += save_figure(fig, out / name)
        plt.close(fig)
    return paths


__all__ = [
    "CURVES", "DASHES", "DPI", "MISALIGNMENT", "SEED_MARKERS", "bytes_axis", "curve_figures", "human_bytes", "plot_runs", "run_styles", "save_figure",
    "spread_labels",
]
