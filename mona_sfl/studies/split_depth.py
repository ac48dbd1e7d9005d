"""Split-depth study: accuracy, privacy and communication of MonAcoSFL vs MocoSFL over cut layers.

For every (method, cut, seed) the study

1. trains a run with :class:`mona_sfl.engine.Trainer` in its own folder ``OUT/runs/<method>-cut<c>-seed<s>``
   (kNN and linear-probe accuracy come from its ``summary.json``);
2. runs the model-inversion attack on the run's synced client front
   (:func:`mona_sfl.privacy.attack_run`: ``attack.json``, ``attack.png`` in the run folder);
3. counts bytes analytically (:func:`mona_sfl.comms.comm_costs`) and records the runtime's
   measured counters (non-zero for ``runtime=ray``/``flower``);
4. extracts the online-vs-momentum misalignment ``ol_ml`` from the sync records of
   ``metrics.jsonl`` (trajectory saved as ``misalignment.csv`` in the run folder);

and writes one row to ``OUT/split_depth.csv``. Plots (PNG) go to ``OUT/plots/``.

Resumable: rows already in the CSV are skipped; a run folder with a checkpoint but no
summary is resumed (``Trainer.resume``); finished runs (``summary.json``) and attacks
(``attack.json`` with the same attack settings and checkpoint step) are reused. ``OUT/study.json``
records the shared settings; re-running into the same ``--out`` with different settings is
refused (use another ``--out``). Cuts, methods and seeds may be extended between runs.

Examples (``mona-sfl study``, :mod:`mona_sfl.cli.study`)::

    mona-sfl study --quick --out runs/study-quick        # a few minutes on 2 cores
    mona-sfl study --config default --cuts 1,2,4,6,8 --seeds 0,1,2 --out runs/study

From Python: :func:`run_study`.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import logging
import os
from collections.abc import Callable, Iterator, Sequence
import time
from pathlib import Path
from typing import Any

from mona_sfl.checkpoint import CONFIG, SUMMARY, CheckpointError, atomic_write_text, lock_run_dir, read_metrics
from mona_sfl.config import Config, ConfigError, load_config, resolve_config_path, to_flat
from mona_sfl.models import NUM_CUTS
from mona_sfl.plots import MISALIGNMENT, human_bytes

log = logging.getLogger("mona_sfl.study")

METHODS = {"MonAcoSFL": True, "MocoSFL": False}  # name -> algo.align_momentum
ALIASES = {"mona": "MonAcoSFL", "monacosfl": "MonAcoSFL", "moco": "MocoSFL", "mocosfl": "MocoSFL"}
SHORT = {"MonAcoSFL": "mona", "MocoSFL": "moco"}
CSV_NAME = "split_depth.csv"
STUDY_JSON = "study.json"

COLUMNS = [
    "method", "cut", "seed", "arch", "width", "activation_shape", "client_params",
    "knn_top1", "knn_top1_init", "knn_top1_tail", "linear_top1",
    "mia_mse", "mia_psnr", "mia_ssim", "mia_mse_mean_image",
    "mia_untrained_mse", "mia_untrained_psnr", "mia_untrained_ssim",
    "ol_ml_mean", "ol_ml_final",
    "bytes_per_step", "bytes_per_sync", "bytes_per_epoch", "bytes_total", "bytes_latent_total", "bytes_weights_total",
    "measured_bytes_up", "measured_bytes_down", "measured_bytes_sync",
    "steps", "syncs", "wall_s", "attack_s", "run_dir",
]

# Tiny settings for --quick (before the user's --set, which win).
QUICK_SET = [
    "runtime=local",
    "device=cpu",
    "model.width=0.125",
    "algo.K=64",
    "algo.dim=32",
    "algo.hidden_dim=64",
    "data.name=synthetic",
    "data.synthetic_size=400",
    "data.synthetic_test_size=0",  # a fifth of the training set, not the default config's 10,000 test images
    "fed.num_clients=2",
    "fed.sync_every=2",
    "train.epochs=2",
    "train.steps_per_epoch=4",
    "train.batch_size=16",
    "eval.every=0",
    "eval.linear_epochs=5",
    "eval.knn_k=20",
]
QUICK_CUTS = "1,4,8"
QUICK_ATTACK = {"epochs": 10, "aux_fraction": 0.1, "num_test": 32, "decoder_width": 16, "decoder_blocks": 1}
FULL_ATTACK = {"epochs": 50, "aux_fraction": 0.01, "num_test": 128, "decoder_width": 64, "decoder_blocks": 4}


# --------------------------------------------------------------------------- arguments


def parse_ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ConfigError(f"--{what} expects comma-separated integers, got '{text}'") from None
    if not vals:
        raise ConfigError(f"--{what} is empty")
    return list(dict.fromkeys(vals))


def parse_methods(text: str) -> list[str]:
    out = []
    for m in text.replace(" ", "").split(","):
        if not m:
            continue
        name = ALIASES.get(m.lower(), m)
        if name not in METHODS:
            raise ConfigError(f"--methods: unknown method '{m}': choose from MonAcoSFL (mona), MocoSFL (moco)")
        out.append(name)
    if not out:
        raise ConfigError("--methods is empty")
    return list(dict.fromkeys(out))




# --------------------------------------------------------------------------- files


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [dict(r) for r in csv.DictReader(f)]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    cols = list(COLUMNS)
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(r.get(k)) for k in cols})
    atomic_write_text(path, buf.getvalue())


@contextlib.contextmanager
def _study_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the study folder while its CSVs are read, updated and written.

    Blocking and short: two studies that share an ``--out`` (e.g. one per method, side by side)
    take turns at recording their rows, so neither overwrites the other's. The kernel drops the
    lock when its holder ends, so nothing stale is left behind.
    """
    import fcntl

    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def done_keys(csv_path: Path) -> set[tuple[str, int, int]]:
    """The (method, cut, seed) of every run already in the study's CSV."""
    with _study_lock(csv_path.parent):
        return {row_key(r) for r in read_rows(csv_path)}


def record_row(out: Path, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Add (or replace) ``row`` in ``OUT/split_depth.csv`` as it is on disk now, rewrite ``curves.csv``; all rows.

    The CSV is re-read under the study lock, so rows that another study process recorded in
    the same folder meanwhile are kept.
    """
    csv_path = out / CSV_NAME
    with _study_lock(out):
        rows = [r for r in read_rows(csv_path) if row_key(r) != row_key(row)]
        rows.append(row)
        write_rows(csv_path, rows)
        write_curves(out, rows)
    return rows


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return v


def row_key(r: dict[str, Any]) -> tuple[str, int, int]:
    return (str(r["method"]), int(r["cut"]), int(r["seed"]))


def _fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def check_study(out: Path, settings: dict[str, Any]) -> None:
    """Record the shared settings; refuse to mix results from different settings in one folder."""
    p = out / STUDY_JSON
    if p.is_file():
        old = json.loads(p.read_text(encoding="utf-8"))
        if old.get("fingerprint") != _fingerprint(settings):
            prev = old.get("settings", {})
            diff = sorted(
                {f"{sec}.{k}" for sec in ("config", "attack") for k in set(prev.get(sec, {})) | set(settings[sec])
                 if prev.get(sec, {}).get(k) != settings[sec].get(k)}
            )
            raise ConfigError(
                f"{out} holds a study with different settings (differs in: {', '.join(diff[:8]) or '?'}): "
                "use another --out, or the same --config/--set/--quick/--threads/--attack-* options as before"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, json.dumps({"fingerprint": _fingerprint(settings), "settings": settings}, indent=2) + "\n")


# --------------------------------------------------------------------------- one run


def train_run(cfg: Config, run_dir: Path, *, progress: bool, report: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, resume or reuse the run in ``run_dir``; returns its summary."""
    from mona_sfl.engine import Trainer

    if (run_dir / CONFIG).is_file():
        try:
            on_disk = load_config(run_dir / CONFIG)
        except ConfigError as e:
            raise CheckpointError(f"{run_dir / CONFIG} is not a valid config: {e}") from None
        if to_flat(on_disk) != to_flat(cfg):
            diff = sorted(k for k, v in to_flat(cfg).items() if to_flat(on_disk).get(k) != v)
            raise ConfigError(f"run folder {run_dir} was trained with another config (differs in: {', '.join(diff[:8])}): use another --out")
    if (run_dir / SUMMARY).is_file():
        return json.loads((run_dir / SUMMARY).read_text(encoding="utf-8"))
    if (run_dir / "checkpoint.pt").is_file():
        trainer = Trainer.resume(run_dir, progress=progress)
        report(f"  resuming {run_dir} at step {trainer.global_step}")
        resumed = True
    else:
        for name in (CONFIG, "metrics.jsonl"):  # a run that died before its first checkpoint
            (run_dir / name).unlink(missing_ok=True)
        trainer = Trainer(cfg, run_dir, progress=progress)
        resumed = False
    with trainer:
        return trainer.run(resumed=resumed)


def misalignment(run_dir: Path) -> list[dict[str, float]]:
    """(step, ol_ml, ol_og, ml_mg) of every sync record; also written to ``misalignment.csv``."""
    recs = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("sync") and "ol_ml" in r]
    traj = [{"step": int(r["step"]), "ol_ml": float(r["ol_ml"]), "ol_og": float(r.get("ol_og", float("nan"))), "ml_mg": float(r.get("ml_mg", float("nan")))} for r in recs]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["step", "ol_ml", "ol_og", "ml_mg"], lineterminator="\n")
    w.writeheader()
    w.writerows(traj)
    atomic_write_text(run_dir / "misalignment.csv", buf.getvalue())
    return traj


def knn_curve(run_dir: Path) -> list[dict[str, float]]:
    """(step, knn_top1) of every kNN evaluation of a run (initial, periodic, final); also ``knn_curve.csv``."""
    pts: dict[int, float] = {}
    for r in read_metrics(run_dir / "metrics.jsonl"):
        if "knn_top1" in r and "step" in r:
            pts[int(r["step"])] = float(r["knn_top1"])  # the final evaluation wins over a periodic one at the same step
    curve = [{"step": k, "knn_top1": v} for k, v in sorted(pts.items())]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["step", "knn_top1"], lineterminator="\n")
    w.writeheader()
    w.writerows(curve)
    atomic_write_text(run_dir / "knn_curve.csv", buf.getvalue())
    return curve


#: Share of the run whose kNN evaluations ``knn_top1_tail`` averages (the last 30% of the steps).
TAIL_FRACTION = 0.3


def tail_mean(curve: list[dict[str, float]], steps: int, fraction: float = TAIL_FRACTION) -> float | None:
    """Mean kNN top-1 of the evaluations at steps >= ``steps - round(fraction * steps)``; None without one.

    One evaluation at the last step can land where a periodic client learning rate is zero (the
    reference's schedule, at steps 200, 600, 1,000, ...), and there MocoSFL recovers several points
    in a few dozen steps; the mean over the tail of the curve is the steadier end point.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"the tail fraction must be in (0, 1], got {fraction}")
    start = steps - round(fraction * steps)
    tail = [p["knn_top1"] for p in curve if start <= p["step"] <= steps]
    return sum(tail) / len(tail) if tail else None


CURVE_COLUMNS = ["method", "cut", "seed", "step", "knn_top1", "ol_ml", "ol_og", "ml_mg"]


def write_curves(out: Path, rows: list[dict[str, Any]]) -> Path:
    """``OUT/curves.csv``: every run's kNN curve and sync divergence metrics, one row per (run, step)."""
    lines: list[dict[str, Any]] = []
    for r in rows:
        run_dir = out / str(r["run_dir"])
        by_step: dict[int, dict[str, Any]] = {}
        for t in read_rows(run_dir / "knn_curve.csv"):
            by_step.setdefault(int(t["step"]), {})["knn_top1"] = t["knn_top1"]
        for t in read_rows(run_dir / "misalignment.csv"):
            by_step.setdefault(int(t["step"]), {}).update({k: t[k] for k in ("ol_ml", "ol_og", "ml_mg")})
        for step in sorted(by_step):
            lines.append({"method": r["method"], "cut": r["cut"], "seed": r["seed"], "step": step, **by_step[step]})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CURVE_COLUMNS, lineterminator="\n")
    w.writeheader()
    for line in lines:
        w.writerow({k: line.get(k, "") for k in CURVE_COLUMNS})
    atomic_write_text(out / "curves.csv", buf.getvalue())
    return out / "curves.csv"


def _same_attack(old: dict[str, Any], attack_kw: dict[str, Any], seed: int) -> bool:
    """Whether a stored attack result was made with these options, seed and held-out draw."""
    from mona_sfl.privacy.attack import HELD_OUT_DRAW

    same_kw = all(old.get(k) == v for k, v in attack_kw.items())
    return same_kw and old.get("seed") == seed and old.get("held_out_draw") == HELD_OUT_DRAW


def attack_cached(run_dir: Path, attack_kw: dict[str, Any], step: int, device: str, seed: int, progress: bool = False) -> dict[str, Any]:
    from mona_sfl.privacy.attack import ATTACK_JSON, attack_run

    p = run_dir / ATTACK_JSON
    if p.is_file():
        old = json.loads(p.read_text(encoding="utf-8"))
        if _same_attack(old, attack_kw, seed) and old.get("meta", {}).get("checkpoint_step") == step:
            return old
    return attack_run(run_dir, device=device, seed=seed, progress=progress, **attack_kw).to_dict()


def baseline_cached(cfg: Config, out_dir: Path, attack_kw: dict[str, Any], device: str, seed: int, progress: bool = False) -> dict[str, Any]:
    from mona_sfl.privacy.attack import ATTACK_JSON, attack_config

    p = out_dir / ATTACK_JSON
    if p.is_file():
        old = json.loads(p.read_text(encoding="utf-8"))
        if _same_attack(old, attack_kw, seed):
            return old
    return attack_config(cfg, out_dir, device=device, seed=seed, progress=progress, **attack_kw).to_dict()


def run_one(
    cfg: Config, method: str, cut: int, seed: int, out: Path, attack_kw: dict[str, Any], *, baseline: bool, progress: bool,
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    from mona_sfl.comms import comm_costs

    run_dir = out / "runs" / f"{SHORT[method]}-cut{cut}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    with lock_run_dir(run_dir, "the study"):  # no other study, train --resume or attack writes it meanwhile
        t0 = time.perf_counter()
        summary = train_run(cfg, run_dir, progress=progress, report=report)
        t1 = time.perf_counter()
        attack_device = cfg.device  # the attack runs where training ran
        mia = attack_cached(run_dir, attack_kw, int(summary["steps"]), attack_device, seed, progress) if attack_kw else {}
        t_attack = time.perf_counter() - t1
        traj = misalignment(run_dir)
        curve = knn_curve(run_dir)
    costs = comm_costs(cfg)
    if costs.total_steps != summary["steps"] or costs.total_syncs != summary["syncs"]:
        log.warning(
            "the run took %s steps / %s syncs, the accounting expected %d / %d (clients lost?)",
            summary["steps"], summary["syncs"], costs.total_steps, costs.total_syncs,
        )
    measured = {k: int(summary.get(f"bytes_{k}", 0)) for k in ("up", "down", "sync")}
    if any(measured.values()):
        expected = {"up": costs.counted_up_total, "down": costs.counted_down_total, "sync": costs.counted_sync_total}
        off = {k: (measured[k], expected[k]) for k in measured if measured[k] != expected[k]}
        if off:
            log.warning(
                "measured bytes differ from the analytic counts (measured, analytic): %s; the analytic per-step counts assume "
                "full batches (a client's last batch of a pass holds the remainder of its images)", off,
            )
    row: dict[str, Any] = {
        "method": method,
        "cut": cut,
        "seed": seed,
        "arch": cfg.model.arch,
        "width": cfg.model.width,
        "activation_shape": "x".join(str(d) for d in costs.activation_shape),
        "client_params": costs.client_params,
        "knn_top1": summary.get("knn_top1"),
        "knn_top1_init": summary.get("knn_top1_init"),
        "knn_top1_tail": tail_mean(curve, int(summary["steps"])),
        "linear_top1": summary.get("linear_top1"),
        "mia_mse": mia.get("mse"),
        "mia_psnr": mia.get("psnr"),
        "mia_ssim": mia.get("ssim"),
        "mia_mse_mean_image": mia.get("mse_mean_image"),
        "ol_ml_mean": sum(t["ol_ml"] for t in traj) / len(traj) if traj else None,
        "ol_ml_final": traj[-1]["ol_ml"] if traj else None,
        "bytes_per_step": costs.bytes_per_step,
        "bytes_per_sync": costs.bytes_per_sync,
        "bytes_per_epoch": costs.bytes_per_epoch,
        "bytes_total": costs.bytes_total,
        "bytes_latent_total": costs.latent_total,
        "bytes_weights_total": costs.weights_total,
        "measured_bytes_up": measured["up"],
        "measured_bytes_down": measured["down"],
        "measured_bytes_sync": measured["sync"],
        "steps": summary["steps"],
        "syncs": summary["syncs"],
        "wall_s": summary.get("wall_s"),
        "attack_s": mia.get("train_s", t_attack) if mia else None,
        "run_dir": str(run_dir.relative_to(out)),
    }
    if baseline and attack_kw:
        b = baseline_cached(cfg, out / "baseline" / f"cut{cut}-seed{seed}", attack_kw, attack_device, seed, progress)
        row.update({"mia_untrained_mse": b["mse"], "mia_untrained_psnr": b["psnr"], "mia_untrained_ssim": b["ssim"]})
    row["_elapsed"] = time.perf_counter() - t0
    return row


# --------------------------------------------------------------------------- plots


def _num(v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return x


def _agg(rows: list[dict[str, Any]], method: str, key: str) -> tuple[list[int], list[float], list[float]]:
    """Mean and std over seeds of ``key`` per cut, for one method (NaNs ignored)."""
    by: dict[int, list[float]] = {}
    for r in rows:
        if r["method"] == method:
            v = _num(r.get(key))
            if not math.isnan(v):
                by.setdefault(int(r["cut"]), []).append(v)
    from mona_sfl.runs import mean_std

    cuts = sorted(by)
    stats = [mean_std(by[c]) for c in cuts]
    # sample std (n - 1) over seeds; no bar (0) for a single seed
    return cuts, [m for m, _, _ in stats], [sd if n > 1 else 0.0 for _, sd, n in stats]


def _seeds_label(rows: list[dict[str, Any]], method: str) -> str:
    """`` (n=2)`` or `` (n=1-3)``: seeds per cut behind a method's points; bars, where drawn, are the sample std."""
    per_cut: dict[int, set[int]] = {}
    for r in rows:
        if r["method"] == method:
            per_cut.setdefault(int(r["cut"]), set()).add(int(r["seed"]))
    ns = sorted({len(v) for v in per_cut.values()})
    if not ns:
        return ""
    n = f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}-{ns[-1]}"
    return f" (mean ± sample std, {n})" if ns[-1] > 1 else f" ({n})"


COLOURS = {"MonAcoSFL": "tab:blue", "MocoSFL": "tab:red"}
MARKERS = {"MonAcoSFL": "o", "MocoSFL": "s"}


#: Methods sit this far apart (in cuts) around each cut, so that equal values stay visible.
DODGE = 0.06


def _lines(ax, rows, key, methods, label_suffix="", **kw) -> None:  # noqa: ANN001
    for i, m in enumerate(methods):
        cuts, mean, std = _agg(rows, m, key)
        if cuts:
            shift = (i - (len(methods) - 1) / 2) * DODGE
            ax.errorbar([c + shift for c in cuts], mean, yerr=std if any(std) else None, label=f"{m}{label_suffix}{_seeds_label(rows, m)}",
                        color=COLOURS[m], marker=MARKERS[m], capsize=3, **kw)


def plot_curves(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """One figure per cut: kNN top-1, online/momentum misalignment and the clients' momentum spread over steps, both methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    from mona_sfl.plots import SEED_MARKERS, save_figure

    pdir = out / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    paths = []
    seeds = sorted({int(r["seed"]) for r in rows})
    for c in sorted({int(r["cut"]) for r in rows}):
        fig, axs = plt.subplots(1, 3, figsize=(17, 4.2))
        drawn = False
        for r in sorted((r for r in rows if int(r["cut"]) == c), key=lambda r: (r["method"], int(r["seed"]))):
            run_dir = out / str(r["run_dir"])
            marker = SEED_MARKERS[seeds.index(int(r["seed"])) % len(SEED_MARKERS)]
            label = f"{r['method']}, seed {r['seed']}"
            knn = read_rows(run_dir / "knn_curve.csv")
            if knn:
                axs[0].plot([int(t["step"]) for t in knn], [_num(t["knn_top1"]) for t in knn], color=COLOURS[r["method"]],
                            marker=marker, markersize=4, alpha=0.85, label=label)
                drawn = True
            traj = read_rows(run_dir / "misalignment.csv")
            if traj:
                for ax, key in ((axs[1], "ol_ml"), (axs[2], "ml_mg")):
                    ax.plot([int(t["step"]) for t in traj], [max(_num(t.get(key)), 1e-30) for t in traj], color=COLOURS[r["method"]],
                            marker=marker, markersize=3, alpha=0.85, label=label)
        if not drawn:
            plt.close(fig)
            continue
        axs[0].set_ylabel("kNN top-1 (%)")
        axs[1].set_ylabel(MISALIGNMENT)
        axs[2].set_ylabel("clients' momentum fronts vs their mean:\nmean squared difference")
        for ax in axs[1:]:
            ax.set_yscale("log")
        for ax in axs:
            ax.set_xlabel("training step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"Learning curves at cut {c}")
        fig.tight_layout()
        save_figure(fig, pdir / f"curves_cut{c}.png")
        plt.close(fig)
        paths.append(pdir / f"curves_cut{c}.png")
    return paths


def plot_all(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    from mona_sfl.plots import SEED_MARKERS, bytes_axis, save_figure, spread_labels

    pdir = out / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    seeds = sorted({int(r["seed"]) for r in rows})
    cuts_all = sorted({int(r["cut"]) for r in rows})
    paths = []

    def finish(fig, ax_list, name: str) -> None:  # noqa: ANN001
        for ax in ax_list:
            ax.set_xlabel("cut layer (client units)")
            ax.set_xticks(cuts_all)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, pdir / name)
        plt.close(fig)
        paths.append(pdir / name)

    # 1. accuracy vs cut
    fig, axs = plt.subplots(1, 2, figsize=(10, 4))
    _lines(axs[0], rows, "knn_top1", methods)
    _lines(axs[0], rows, "knn_top1_init", methods, " (init)", linestyle=":", alpha=0.5)
    axs[0].set_ylabel("kNN top-1 (%)")
    _lines(axs[1], rows, "linear_top1", methods)
    axs[1].set_ylabel("linear probe top-1 (%)")
    fig.suptitle("Accuracy vs cut layer")
    finish(fig, axs, "accuracy_vs_cut.png")

    attacked = any(not math.isnan(_num(r.get("mia_ssim"))) for r in rows)
    # 2. attack vs cut
    fig, axs = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, lab in ((axs[0], "ssim", "attack SSIM (higher = less private)"), (axs[1], "mse", "attack MSE (higher = more private)"), (axs[2], "psnr", "attack PSNR (dB)")):
        _lines(ax, rows, f"mia_{key}", methods)
        cuts, mean, _ = _agg([dict(r, method="MonAcoSFL") for r in rows], "MonAcoSFL", f"mia_untrained_{key}")
        if cuts:
            ax.plot(cuts, mean, "k--", label="untrained front")
        if key == "mse":
            cuts, mean, _ = _agg([dict(r, method="MonAcoSFL") for r in rows], "MonAcoSFL", "mia_mse_mean_image")
            if cuts:
                ax.plot(cuts, mean, color="gray", linestyle=":", label="mean-image guess")
        ax.set_ylabel(lab)
    fig.suptitle("Model-inversion attack on the smashed activations vs cut layer")
    if attacked:
        finish(fig, axs, "attack_vs_cut.png")
    else:
        plt.close(fig)

    # 3. bytes vs cut
    fig, ax = plt.subplots(figsize=(6.5, 4))
    _lines(ax, rows, "bytes_total", methods, " total")
    cuts, mean, _ = _agg(rows, methods[0], "bytes_latent_total")
    if cuts:
        ax.plot(cuts, mean, color="gray", linestyle="--", label="activations + gradients")
    for m in methods:
        cuts, mean, _ = _agg(rows, m, "bytes_weights_total")
        if cuts:
            ax.plot(cuts, mean, color=COLOURS[m], linestyle=":", label=f"{m} front syncs")
    ax.set_yscale("log")
    bytes_axis(ax.yaxis)
    ax.set_ylabel("traffic per run (all clients, float32)")
    fig.suptitle("Communication vs cut layer")
    finish(fig, [ax], "bytes_vs_cut.png")

    # 4. trade-off (needs the attack)
    if not attacked:
        return paths + plot_curves(out, rows)
    acc_key = "linear_top1" if any(not math.isnan(_num(r.get("linear_top1"))) for r in rows) else "knn_top1"
    fig, axs = plt.subplots(1, 2, figsize=(12, 4.8))
    norm = plt.Normalize(vmin=min(_num(r["mia_ssim"]) for r in rows), vmax=max(_num(r["mia_ssim"]) for r in rows) + 1e-12)
    sc = None
    labels: list[list[Any]] = [[], []]
    for m in methods:
        for key in sorted({int(r["cut"]) for r in rows if r["method"] == m}):
            rs = [r for r in rows if r["method"] == m and int(r["cut"]) == key]
            acc = sum(_num(r.get(acc_key)) for r in rs) / len(rs)
            ssim = sum(_num(r["mia_ssim"]) for r in rs) / len(rs)
            tot = sum(_num(r["bytes_total"]) for r in rs) / len(rs)
            axs[0].scatter(ssim, acc, s=60, color=COLOURS[m], marker=MARKERS[m], alpha=0.8, edgecolors="k")
            labels[0].append(axs[0].annotate(f"cut {key}", (ssim, acc), fontsize=8, xytext=(6, 4), textcoords="offset points",
                                                 color=COLOURS[m]))
            sc = axs[1].scatter(tot, acc, c=[ssim], cmap="viridis", norm=norm, s=70, marker=MARKERS[m], edgecolors=COLOURS[m], linewidths=1.5)
            labels[1].append(axs[1].annotate(f"cut {key}", (tot, acc), fontsize=8, xytext=(6, 4), textcoords="offset points",
                                                 color=COLOURS[m]))
    n_label = {m: _seeds_label(rows, m).replace(" (mean ± sample std, ", " (mean of ") for m in methods}
    for m in methods:
        axs[0].scatter([], [], color=COLOURS[m], marker=MARKERS[m], edgecolors="k", label=f"{m}{n_label[m]}")
        axs[1].scatter([], [], facecolors="none", edgecolors=COLOURS[m], marker=MARKERS[m], label=f"{m}{n_label[m]}")
    axs[0].set_xlabel("attack SSIM (lower = more private)")
    axs[0].set_ylabel(f"{acc_key.replace('_top1', '')} top-1 (%)")
    axs[0].set_title("accuracy vs privacy (label colour = method)", fontsize=10)
    axs[1].set_xscale("log")
    bytes_axis(axs[1].xaxis)
    axs[1].set_xlabel("traffic per run (all clients)")
    axs[1].set_ylabel(f"{acc_key.replace('_top1', '')} top-1 (%)")
    axs[1].set_title("accuracy vs communication (colour = attack SSIM)", fontsize=10)
    if sc is not None:
        fig.colorbar(sc, ax=axs[1], label="attack SSIM")
    for ax in axs:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.margins(0.12)
    fig.suptitle("Accuracy - privacy - communication trade-off")
    fig.tight_layout()
    for ax, texts in zip(axs, labels):
        spread_labels(ax, texts)
    save_figure(fig, pdir / "tradeoff.png")
    plt.close(fig)
    paths.append(pdir / "tradeoff.png")

    # 5. misalignment trajectories
    ncols = min(3, len(cuts_all))
    nrows = math.ceil(len(cuts_all) / ncols)
    fig, axs = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.3 * nrows), squeeze=False)
    for i, c in enumerate(cuts_all):
        ax = axs[i // ncols][i % ncols]
        for r in rows:
            if int(r["cut"]) != c:
                continue
            p = out / str(r["run_dir"]) / "misalignment.csv"
            traj = read_rows(p)
            if not traj:
                continue
            steps = [int(t["step"]) for t in traj]
            vals = [max(_num(t["ol_ml"]), 1e-30) for t in traj]
            ax.plot(steps, vals, color=COLOURS[r["method"]], marker=SEED_MARKERS[seeds.index(int(r["seed"])) % len(SEED_MARKERS)],
                    markersize=4, alpha=0.8, label=f"{r['method']}, seed {r['seed']}")
        ax.set_yscale("log")
        ax.set_title(f"cut {c}", fontsize=10)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if i % ncols == 0:
            ax.set_ylabel(MISALIGNMENT)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for j in range(len(cuts_all), nrows * ncols):
        axs[j // ncols][j % ncols].axis("off")
    fig.suptitle("Online vs momentum front misalignment at syncs (before averaging)")
    fig.tight_layout()
    save_figure(fig, pdir / "misalignment.png")
    plt.close(fig)
    paths.append(pdir / "misalignment.png")
    return paths + plot_curves(out, rows)


# --------------------------------------------------------------------------- the study


def attack_settings(quick: bool = False, **given: Any) -> dict[str, Any]:
    """The decoder settings (``FULL_ATTACK`` or ``QUICK_ATTACK`` with ``given`` ones that are not None), checked."""
    kw = dict(QUICK_ATTACK if quick else FULL_ATTACK)
    kw.update({k: v for k, v in given.items() if v is not None})
    if kw["epochs"] < 1 or kw["num_test"] < 1 or kw["decoder_width"] < 1 or not 0 < kw["aux_fraction"] <= 1:
        raise ConfigError(f"invalid attack settings {kw}: epochs, num-test, width >= 1 and aux-fraction in (0, 1]")
    return kw


def run_study(
    out: str | Path,
    *,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    cuts: Sequence[int] | None = None,
    methods: Sequence[str] = tuple(METHODS),
    seeds: Sequence[int] = (0,),
    attack: dict[str, Any] | None = None,
    no_attack: bool = False,
    regime: str | None = None,
    steps: int | None = None,
    width: float | None = None,
    curve_every: int | None = None,
    baseline: bool = False,
    quick: bool = False,
    threads: int | None = None,
    progress: bool = False,
    plots: bool = True,
    report: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train, attack and count every (method, cut, seed) not yet in ``OUT/split_depth.csv``; returns all rows.

    ``config``/``overrides`` are shared by every run (``quick`` puts :data:`QUICK_SET` first,
    ``regime`` puts :func:`mona_sfl.studies.regimes.regime_overrides` with ``steps``, ``width``
    and ``curve_every`` next, the user's ``overrides`` win); ``attack`` is
    :func:`attack_settings`'s dict (``no_attack`` skips the attack); ``report`` receives one
    line per event. Besides the CSV: ``OUT/curves.csv`` (kNN and divergence over steps).
    """
    from mona_sfl.studies.regimes import regime_overrides

    if regime:
        extra = regime_overrides(regime, steps=steps, width=width, curve_every=curve_every)
    else:  # the same options on the config as it is
        extra = [f"{k}={v}" for k, v in (("train.max_steps", steps), ("model.width", width), ("eval.every_steps", curve_every)) if v is not None]
    cuts = list(cuts) if cuts is not None else parse_ints(QUICK_CUTS if quick else ",".join(map(str, range(1, NUM_CUTS + 1))), "cuts")
    methods = [ALIASES.get(m.lower(), m) for m in methods]
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"unknown method '{m}': choose from MonAcoSFL (mona), MocoSFL (moco)")
    if quick:  # --quick keeps its tiny queue and projector; a regime keeps its federation and schedule
        extra = [o for o in extra if not o.startswith("algo.")]
    threads = threads if threads is not None else (1 if quick else None)
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        # the engine sets its own count for client and server compute and evaluation
        # (train.client_threads / server_threads; server 0 = every CPU): without these, two
        # one-thread studies side by side would each run their server phases on every core
        extra += [f"train.client_threads={threads}", f"train.server_threads={threads}"]
    base_overrides = (QUICK_SET if quick else []) + extra + list(overrides)
    config_path = resolve_config_path(config)
    base = load_config(config_path, base_overrides)  # validates the shared settings once
    for c in cuts:
        if not 1 <= c <= NUM_CUTS:
            raise ConfigError(f"--cuts: cut {c} is out of range: legal cut layers are 1..{NUM_CUTS}")
    attack_kw = {} if no_attack else (attack_settings(quick) if attack is None else attack)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    out = Path(out)
    shared = {k: v for k, v in to_flat(base).items() if k not in ("model.cut", "algo.align_momentum", "seed")}
    check_study(out, {"config": shared, "attack": attack_kw})
    csv_path = out / CSV_NAME
    todo = [(m, c, s) for s in seeds for c in cuts for m in methods]
    report(f"split-depth study: {len(todo)} runs ({', '.join(methods)}; cuts {cuts}; seeds {list(seeds)}) into {out}")
    t_start = time.perf_counter()
    for i, (m, c, s) in enumerate(todo, 1):
        tag = f"[{i}/{len(todo)}] {m} cut {c} seed {s}"
        if (m, c, s) in done_keys(csv_path):  # re-read: another study sharing this folder may have run it
            report(f"{tag}: in the CSV, skipped")
            continue
        cfg = load_config(config_path, base_overrides + [f"model.cut={c}", f"algo.align_momentum={str(METHODS[m]).lower()}", f"seed={s}"])
        report(f"{tag}: training")
        row = run_one(cfg, m, c, s, out, attack_kw, baseline=baseline, progress=progress, report=report)
        elapsed = row.pop("_elapsed")
        record_row(out, row)
        lin = row.get("linear_top1")
        mia = f", attack SSIM {row['mia_ssim']:.3f} MSE {row['mia_mse']:.4f}" if row.get("mia_ssim") is not None else ""
        report(
            f"{tag}: kNN {row['knn_top1']:.2f}%" + (f", linear {lin:.2f}%" if lin is not None else "")
            + f"{mia}, {human_bytes(row['bytes_total'])} total, {elapsed:.1f} s"
        )
    with _study_lock(out):
        rows: list[dict[str, Any]] = read_rows(csv_path)
        if not csv_path.is_file():
            write_rows(csv_path, rows)
        write_curves(out, rows)
    report(f"wrote CSV: {csv_path} ({len(rows)} rows) and {out / 'curves.csv'} in {time.perf_counter() - t_start:.1f} s")
    # the figures and the table show every run in the folder, not only this process's methods: with one
    # process per method side by side, the one that ends last draws both methods on each figure
    if plots and rows:
        with _study_lock(out):
            for p in plot_all(out, rows):
                report(f"wrote plot: {p}")
    if rows:
        report("results over seeds (sample std; n = seeds):\n" + results_table(rows).rstrip("\n"))
    return rows


#: Columns of the study's results table (``OUT/split_depth.csv`` keys; bytes shown in MB).
RESULT_COLUMNS = [
    ("knn_top1", "kNN top-1 %", ".2f", 1.0),
    ("knn_top1_tail", "kNN last 30% %", ".2f", 1.0),
    ("linear_top1", "linear top-1 %", ".2f", 1.0),
    ("mia_ssim", "attack SSIM", ".3f", 1.0),
    ("mia_psnr", "attack PSNR dB", ".2f", 1.0),
    ("ol_ml_mean", "ol_ml", ".3g", 1.0),
    ("bytes_total", "MB per run", ".1f", 1e-6),
]


def results_table(rows: list[dict[str, Any]]) -> str:
    """One line per (method, cut): n seeds, and the mean ± sample std over them of accuracy, attack and bytes."""
    from mona_sfl.runs import grouped_table

    ordered = sorted(rows, key=lambda r: (list(METHODS).index(r["method"]) if r["method"] in METHODS else len(METHODS), int(r["cut"]), int(r["seed"])))
    return grouped_table(ordered, ["method", "cut"], RESULT_COLUMNS)
