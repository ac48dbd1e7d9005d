"""Finished (or unfinished) run folders side by side: what they hold, how their configs
differ, and a table of their summaries (``mona-sfl compare``; the labels of ``mona-sfl plot``).

This module imports neither torch nor matplotlib.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mona_sfl.checkpoint import METRICS, SUMMARY, load_run_config, read_metrics
from mona_sfl.config import to_flat, toml_value
from mona_sfl.errors import UserError


@dataclass
class Run:
    """One run folder: its resolved config (flat keys), its summary (None while unfinished), its records."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any] | None
    records: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return self.path.name or str(self.path)


def load_run(path: str | Path) -> Run:
    """The run in ``path``; a UserError when it is not a run folder."""
    p = Path(path)
    config = to_flat(load_run_config(p))
    summary = None
    if (p / SUMMARY).is_file():
        try:
            summary = json.loads((p / SUMMARY).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{p / SUMMARY} cannot be read: {e}") from None
        if not isinstance(summary, dict):
            raise UserError(f"{p / SUMMARY} does not hold a summary (a JSON object)")
    return Run(p, config, summary, read_metrics(p / METRICS))


def load_runs(paths: list[str] | list[Path]) -> list[Run]:
    if not paths:
        raise UserError("give at least one run folder")
    return [load_run(p) for p in paths]


def differing_keys(runs: list[Run]) -> list[str]:
    """The config keys whose values are not the same in every run, in schema order."""
    keys = list(runs[0].config)
    return [k for k in keys if len({json.dumps(r.config.get(k)) for r in runs}) > 1]


def show(value: Any) -> str:
    """A config value as on the command line (``true``, ``0.25``, ``resnet18``)."""
    return value if isinstance(value, str) else toml_value(value)


#: A legend label names at most this many differing keys (``mona-sfl compare`` shows them all).
LABEL_KEYS = 4


def labels(runs: list[Run]) -> list[str]:
    """One legend label per run: its values of the keys that differ (``model.cut=4``; the first
    :data:`LABEL_KEYS` of them), or its folder name where the configs are the same; the folder
    name is added where labels collide."""
    keys = differing_keys(runs)
    more = f", +{len(keys) - LABEL_KEYS} more keys" if len(keys) > LABEL_KEYS else ""
    out = [(", ".join(f"{k}={show(r.config[k])}" for k in keys[:LABEL_KEYS]) + more) if keys else r.name for r in runs]
    return [f"{lab} ({r.name})" if out.count(lab) > 1 and lab != r.name else lab for lab, r in zip(out, runs)]


#: Summary columns of the compare table: (summary key, heading, format).
COLUMNS: list[tuple[str, str, str]] = [
    ("knn_top1", "kNN top-1 %", "{:.2f}"),
    ("linear_top1", "linear top-1 %", "{:.2f}"),
    ("knn_top1_init", "kNN at init %", "{:.2f}"),
    ("final_loss", "final loss", "{:.4f}"),
    ("steps", "steps", "{}"),
    ("images_per_s", "images/s", "{:.1f}"),
    ("wall_s", "train s", "{:.1f}"),
]


def compare_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Heading and rows of the compare table: the run, the differing config keys, the summary."""
    keys = differing_keys(runs)
    heading = ["run", *keys, *(h for _, h, _ in COLUMNS)]
    rows = []
    for r in runs:
        cells = [r.name, *(show(r.config[k]) for k in keys)]
        for key, _, fmt in COLUMNS:
            v = (r.summary or {}).get(key)
            cells.append(fmt.format(v) if v is not None else ("unfinished" if r.summary is None and key == "knn_top1" else "-"))
        rows.append(cells)
    return heading, rows


def table(heading: list[str], rows: list[list[str]]) -> str:
    """A plain-text table, columns aligned (numbers to the right)."""
    widths = [max(len(x) for x in col) for col in zip(heading, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(heading), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]) + "\n"


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (n - 1 in the denominator; NaN for one value) and n."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std, n


def number(value: Any) -> float | None:
    """A finite number from a summary or a CSV cell (``""``, ``None``, text and NaN: None)."""
    if isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def aggregate(records: list[dict[str, Any]], key: str) -> tuple[float, float, int] | None:
    """:func:`mean_std` of ``key`` over the records that hold a finite number under it (None if none do).

    The one place where ``train --seeds`` and ``study`` turn per-seed results into mean, sample std and n.
    """
    values = [x for x in (number(r.get(key)) for r in records) if x is not None]
    return mean_std(values) if values else None


#: A column of a results table: (record key, heading, format spec, scale: the value is multiplied by it).
Column = tuple[str, str, str, float]

#: Columns of the seeds table.
SEED_COLUMNS: list[Column] = [
    ("knn_top1", "kNN top-1 %", ".2f", 1.0), ("linear_top1", "linear top-1 %", ".2f", 1.0), ("final_loss", "final loss", ".4f", 1.0),
]


def seeds_table(seeds: list[int], summaries: list[dict[str, Any]], dirs: list[Path]) -> str:
    """One row per seed, then the mean and the sample std over the seeds (with n)."""
    columns = [c for c in SEED_COLUMNS if all(c[0] in s for s in summaries)]
    heading = ["seed", *(c[1] for c in columns), "run folder"]
    rows = [[str(seed), *(f"{s[k] * x:{d}}" for k, _, d, x in columns), str(p)] for seed, s, p in zip(seeds, summaries, dirs)]
    stats = [aggregate(summaries, c[0]) for c in columns]
    n = len(summaries)
    rows.append([f"mean (n={n})", *(f"{st[0] * x:{d}}" if st else "-" for st, (_, _, d, x) in zip(stats, columns)), ""])
    rows.append([f"sample std (n={n})", *(f"{st[1] * x:{d}}" if st else "-" for st, (_, _, d, x) in zip(stats, columns)), ""])
    return table(heading, rows)


def grouped_table(records: list[dict[str, Any]], group_by: list[str], columns: list[Column]) -> str:
    """One row per value of the ``group_by`` keys (in first-seen order): the group, n (its records),
    and per column ``mean ± sample std`` over the group (just the mean when one value is finite;
    ``-`` when none is). Columns that no record holds are left out."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(str(r.get(k, "")) for k in group_by), []).append(r)
    columns = [c for c in columns if any(number(r.get(c[0])) is not None for r in records)]
    heading = [*group_by, "n", *(f"{h} (mean ± std)" for _, h, _, _ in columns)]
    rows = []
    for key, rs in groups.items():
        cells = [*key, str(len(rs))]
        for k, _, d, x in columns:
            st = aggregate(rs, k)
            if st is None:
                cells.append("-")
            else:
                cells.append(f"{st[0] * x:{d}}" + (f" ± {st[1] * x:{d}}" if st[2] > 1 else "") + (f" (n={st[2]})" if st[2] != len(rs) else ""))
        rows.append(cells)
    return table(heading, rows)


def _numeric(text: str) -> bool:
    """A cell to right-align: a number, or one followed by more (``22.00 ± 0.71``)."""
    try:
        float(text.split(" ", 1)[0])
    except ValueError:
        return False
    return True


__all__ = [
    "COLUMNS", "LABEL_KEYS", "SEED_COLUMNS", "Column", "Run", "aggregate", "compare_rows", "differing_keys", "grouped_table", "labels",
    "load_run", "load_runs", "mean_std", "number", "seeds_table", "show", "table",
]
