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
from mona_sfl.runs import Run

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


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (the first points average what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


#: name -> (records that carry it, the y value, y label, title).
CURVES: dict[str, tuple[Any, str, str, str]] = {
    "loss": (lambda r: "loss" in r, "loss", "training loss (InfoNCE)", "Training loss"),
    "knn": (lambda r: "knn_top1" in r, "knn_top1", "kNN top-1 accuracy (%)", "kNN monitor accuracy"),
    "lr": (lambda r: "loss" in r and "lr" in r, "lr", "server learning rate", "Learning rate"),
    "misalignment": (
        lambda r: r.get("sync") and "ol_ml" in r, "ol_ml",
        "online vs momentum front: mean squared difference", "Misalignment at syncs",
    ),
}


def curve_figures(runs: list[Run], labels: list[str]) -> dict[str, Any]:
    """One matplotlib Figure per curve that some run recorded (``loss``, ``knn``, ``lr``, ``misalignment``)."""
    plt = _pyplot()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    dashes = ["-", "--", ":", "-."]  # equal curves stay visible on top of each other
    figures: dict[str, Any] = {}
    for name, (has, field, ylabel, title) in CURVES.items():
        series = []
        for i, (run, label) in enumerate(zip(runs, labels)):
            recs = [r for r in run.records if has(r) and isinstance(r.get(field), (int, float))]
            if recs:
                series.append((label, colours[i % len(colours)], dashes[i % len(dashes)], [int(r["step"]) for r in recs], [float(r[field]) for r in recs]))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for label, colour, dash, steps, values in series:
            if name == "loss" and len(values) > 50:  # noisy per-step values: faint, with a trailing mean on top
                window = max(2, len(values) // 50)
                ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
                ax.plot(steps, _smooth(values, window), color=colour, linestyle=dash, linewidth=1.6, label=f"{label} (mean of {window} steps)")
            else:
                ax.plot(steps, values, color=colour, linestyle=dash, linewidth=1.6, label=label, marker="o" if len(values) <= 30 else None, markersize=4)
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


__all__ = ["CURVES", "DPI", "curve_figures", "plot_runs", "save_figure"]
