"""The split-depth study (`mona-sfl study`): --quick writes the CSV and the plots, and a re-run skips finished rows."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

REQUIRED = [
    "method", "cut", "seed", "knn_top1", "linear_top1", "mia_mse", "mia_psnr", "mia_ssim",
    "bytes_per_step", "bytes_per_sync", "bytes_total", "client_params", "wall_s", "ol_ml_mean",
]
PLOTS = ["accuracy_vs_cut.png", "attack_vs_cut.png", "bytes_vs_cut.png", "tradeoff.png", "misalignment.png"]
# --quick with even fewer steps, images and attack epochs
ARGS = [
    "--quick", "--cuts", "1,8", "--seeds", "0",
    "--set", "train.epochs=1", "--set", "train.steps_per_epoch=2", "--set", "data.synthetic_size=200",
    "--set", "eval.linear_epochs=2",
    "--attack-epochs", "1", "--attack-num-test", "8", "--attack-width", "8",
]


@pytest.fixture(scope="module")
def study():
    from mona_sfl.cli import main
    from mona_sfl.studies import split_depth

    threads = torch.get_num_threads()
    yield SimpleNamespace(main=lambda argv: main(["study", *argv]), write_rows=split_depth.write_rows)
    torch.set_num_threads(threads)  # --quick sets one thread


def rows_of(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames or []), list(r)


@pytest.mark.slow
def test_quick_study_then_resume(study, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mona_sfl.comms import comm_costs
    from mona_sfl.config import load_config, schema_config

    out = tmp_path / "study"
    assert study.main(ARGS + ["--out", str(out)]) == 0
    text = capsys.readouterr().out
    csv_path = out / "split_depth.csv"
    assert f"wrote CSV: {csv_path}" in text
    cols, rows = rows_of(csv_path)
    assert set(REQUIRED) <= set(cols)
    assert sorted((r["method"], int(r["cut"]), int(r["seed"])) for r in rows) == [
        ("MocoSFL", 1, 0), ("MocoSFL", 8, 0), ("MonAcoSFL", 1, 0), ("MonAcoSFL", 8, 0)
    ]
    for r in rows:
        for k in ("knn_top1", "linear_top1", "mia_mse", "mia_psnr", "mia_ssim", "wall_s", "ol_ml_mean"):
            assert math.isfinite(float(r[k])), (k, r[k])
        assert 0 < float(r["mia_mse"]) < 1 and -1 <= float(r["mia_ssim"]) <= 1
        cfg = load_config((out / r["run_dir"] / "config.toml"))
        assert cfg.data.synthetic_test_size == 0  # --quick: a fifth of the training images, not the default config's 10,000
        c = comm_costs(cfg)
        assert int(r["bytes_total"]) == c.bytes_total and int(r["bytes_per_step"]) == c.bytes_per_step
        assert int(r["syncs"]) == c.total_syncs and int(r["steps"]) == c.total_steps == 2
        assert (out / r["run_dir"] / "attack.json").is_file() and (out / r["run_dir"] / "misalignment.csv").is_file()
    by = {(r["method"], r["cut"]): r for r in rows}
    assert int(by["MonAcoSFL", "8"]["bytes_per_sync"]) > int(by["MocoSFL", "8"]["bytes_per_sync"])
    # the study ends with its results table: one line per (method, cut), n seeds, the mean (one seed: no std)
    table = text.split("results over seeds (sample std; n = seeds):\n", 1)[1].splitlines()
    assert table[0].split()[:3] == ["method", "cut", "n"] and "kNN top-1 % (mean ± std)" in table[0]
    assert [line.split()[:3] for line in table[2:6]] == [["MonAcoSFL", "1", "1"], ["MonAcoSFL", "8", "1"], ["MocoSFL", "1", "1"], ["MocoSFL", "8", "1"]]
    for line in table[2:6]:
        cells = line.split()
        assert cells[3] == f"{float(by[cells[0], cells[1]]['knn_top1']):.2f}"
        assert cells[-1] == f"{int(by[cells[0], cells[1]]['bytes_total']) / 1e6:.1f}"
    assert by["MonAcoSFL", "8"]["bytes_per_step"] == by["MocoSFL", "8"]["bytes_per_step"]

    import matplotlib.image as mpimg

    for name in PLOTS:
        p = out / "plots" / name
        assert p.is_file() and p.stat().st_size > 0 and f"wrote plot: {p}" in text
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
        assert p.with_suffix(".pdf").read_bytes().startswith(b"%PDF-")
        with Image.open(p) as im:
            assert im.info["dpi"] == pytest.approx((200, 200), abs=0.01)

    # re-run: every row is skipped, nothing retrained, the CSV is unchanged
    before = csv_path.read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    assert study.main(ARGS + ["--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("in the CSV, skipped") == 4 and "training" not in text
    assert csv_path.read_text() == before
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")} == mtimes

    # a row missing from the CSV whose run has a checkpoint but no summary: resumed, not retrained
    run = out / "runs" / "moco-cut8-seed0"
    (run / "summary.json").unlink()
    study.write_rows(csv_path, [r for r in rows if not (r["method"] == "MocoSFL" and r["cut"] == "8")])
    assert study.main(ARGS + ["--out", str(out), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert text.count("skipped") == 3 and f"resuming {run}" in text and (run / "summary.json").is_file()
    _, rows2 = rows_of(csv_path)
    assert len(rows2) == 4

    # other settings into the same folder are refused
    assert study.main(ARGS + ["--out", str(out), "--attack-epochs", "3"]) == 2
    assert "different settings" in capsys.readouterr().err


@pytest.mark.slow
def test_regime_preset_writes_curves_and_plots(tmp_path: Path, study) -> None:
    """`--regime` runs the reference regime's federation and schedule (tiny with --quick), curves and plots, no attack."""
    from mona_sfl.config import load_config, schema_config
    from mona_sfl.studies.regimes import REGIMES, regime_overrides

    out = tmp_path / "regime"
    argv = ["--regime", "batch20", "--quick", "--cuts", "2", "--steps", "4", "--curve-every", "2", "--no-attack",
            "--set", "data.synthetic_size=200", "--set", "eval.linear=false", "--set", "train.client_threads=2", "--out", str(out)]
    assert study.main(argv) == 0
    cols, rows = rows_of(out / "split_depth.csv")
    assert sorted(r["method"] for r in rows) == ["MocoSFL", "MonAcoSFL"]
    assert all(r["steps"] == "4" and r["mia_ssim"] == "" for r in rows)
    cfg = load_config(out / rows[0]["run_dir"] / "config.toml")
    assert (cfg.fed.num_clients, cfg.train.batch_size, cfg.fed.sync_every) == (5, 20, 10)
    assert (cfg.train.client_schedule, cfg.data.partition, cfg.train.max_steps, cfg.eval.every_steps) == ("reference", "noniid", 4, 2)
    # --quick runs one thread: server compute with it, client compute too unless a --set says otherwise
    assert (cfg.train.client_threads, cfg.train.server_threads) == (2, 1)
    _, curves = rows_of(out / "curves.csv")
    for method in ("MonAcoSFL", "MocoSFL"):
        knn_steps = [int(c["step"]) for c in curves if c["method"] == method and c["knn_top1"]]
        assert knn_steps == [0, 2, 4]  # initial, every 2 steps, final
        synced = [c for c in curves if c["method"] == method and c["ol_ml"]]
        assert [int(c["step"]) for c in synced] == [4]  # the run's last step syncs
        row = next(r for r in rows if r["method"] == method)
        knn = {int(c["step"]): float(c["knn_top1"]) for c in curves if c["method"] == method and c["knn_top1"]}
        assert float(row["knn_top1_tail"]) == pytest.approx(knn[4]) and float(row["knn_top1"]) == pytest.approx(knn[4])  # tail of 4 steps: step 4 only
    for name in ("accuracy_vs_cut", "curves_cut2"):
        for ext in ("png", "pdf"):
            assert (out / "plots" / f"{name}.{ext}").stat().st_size > 1000
    assert not (out / "plots" / "attack_vs_cut.png").exists()
    # the presets themselves
    assert set(REGIMES) == {"batch20", "batch2", "clients20", "clients200"}
    c200 = schema_config(regime_overrides("clients200", steps=10))
    assert (c200.fed.num_clients, c200.train.batch_size, c200.clients_per_epoch, c200.fed.sync_every) == (200, 1, 100, 50)
    c20 = schema_config(regime_overrides("clients20", width=0.25))
    assert (c20.clients_per_epoch, c20.fed.sync_every, c20.model.width, c20.train.max_steps) == (5, 12, 0.25, 1000)
    assert study.main(["--regime", "batch21", "--out", str(tmp_path / "x")]) == 2  # a typo is a clear error


def test_two_studies_share_one_folder(tmp_path: Path, study, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A study records its rows into the CSV as it is on disk when the run ends, so that a second study
    process writing the same --out meanwhile (one per method, side by side) loses nothing."""
    from mona_sfl.config import load_config
    from mona_sfl.studies import split_depth

    out = tmp_path / "shared"
    argv = ["--regime", "batch20", "--quick", "--cuts", "2", "--steps", "2", "--curve-every", "0", "--no-attack", "--no-plots",
            "--set", "data.synthetic_size=200", "--set", "eval.linear=false", "--out", str(out)]
    real_run_one = split_depth.run_one
    other = {}

    def run_one_while_other_finishes(cfg, method, cut, seed, out_dir, *a, **kw):  # noqa: ANN001, ANN002, ANN003
        row = real_run_one(cfg, method, cut, seed, out_dir, *a, **kw)
        if not other:  # the other process records its MocoSFL row while this one trains
            other.update({k: v for k, v in row.items() if k != "_elapsed"}, method="MocoSFL", seed=7)
            split_depth.record_row(out_dir, other)
        return row

    monkeypatch.setattr(split_depth, "run_one", run_one_while_other_finishes)
    assert study.main([*argv, "--methods", "mona"]) == 0
    _, rows = rows_of(out / "split_depth.csv")
    assert sorted((r["method"], r["seed"]) for r in rows) == [("MocoSFL", "7"), ("MonAcoSFL", "0")]
    _, curves = rows_of(out / "curves.csv")
    assert {(c["method"], c["seed"]) for c in curves} == {("MocoSFL", "7"), ("MonAcoSFL", "0")}
    # a run that the other study has recorded is skipped, not trained again; the plots and the table
    # cover every run in the folder, the other process's method too
    monkeypatch.setattr(split_depth, "run_one", lambda *a, **kw: pytest.fail("trained a run that is in the CSV"))
    plotted: list[tuple[str, str]] = []
    monkeypatch.setattr(split_depth, "plot_all", lambda out_dir, rows: plotted.extend((r["method"], str(r["seed"])) for r in rows) or [])
    capsys.readouterr()
    assert study.main([a for a in argv if a != "--no-plots"] + ["--methods", "mona"]) == 0
    assert sorted(plotted) == [("MocoSFL", "7"), ("MonAcoSFL", "0")]
    table = capsys.readouterr().out.split("results over seeds (sample std; n = seeds):\n", 1)[1].splitlines()
    assert sorted(line.split()[0] for line in table[2:]) == ["MocoSFL", "MonAcoSFL"]
    # --threads is every run's client and server thread count, so another count is another study
    assert study.main([*argv, "--methods", "mona", "--threads", "2"]) == 2
    assert load_config(out / "runs" / "mona-cut2-seed0" / "config.toml").train.server_threads == 1


def test_study_plot_labels_units_and_markers(tmp_path: Path) -> None:
    """Legends name the sample std and n, bytes show as MB, each seed has its marker, one colour per method."""
    from matplotlib.figure import Figure

    from mona_sfl.plots import SEED_MARKERS
    from mona_sfl.studies import split_depth

    rows = [{"method": m, "cut": str(c), "seed": str(s), "knn_top1": str(10 + c + s), "bytes_total": str(10**6 * (9 - c)),
             "mia_ssim": str(0.8 - c / 10 + s / 100), "mia_mse": "0.05", "mia_psnr": "13"}
            for m in ("MonAcoSFL", "MocoSFL") for c in (1, 4) for s in ((0, 1) if c == 1 else (0,))]
    assert split_depth._seeds_label(rows, "MonAcoSFL") == " (mean ± sample std, n=1-2)"
    assert split_depth._seeds_label([r for r in rows if r["cut"] == "4"], "MocoSFL") == " (n=1)"
    fig = Figure()
    ax = fig.subplots()
    split_depth._lines(ax, rows, "knn_top1", ["MonAcoSFL", "MocoSFL"])
    _, texts = ax.get_legend_handles_labels()
    assert texts == ["MonAcoSFL (mean ± sample std, n=1-2)", "MocoSFL (mean ± sample std, n=1-2)"]
    lines = ax.get_lines()
    assert lines[0].get_color() != lines[-1].get_color()
    assert list(lines[0].get_ydata()) == [11.5, 14.0]  # the mean over seeds 0 and 1 at cut 1
    for r in rows:
        (tmp_path / r["method"] / r["seed"] / r["cut"]).mkdir(parents=True)
        r["run_dir"] = f"{r['method']}/{r['seed']}/{r['cut']}"
        split_depth.write_rows(tmp_path / r["run_dir"] / "misalignment.csv", [{"step": t, "ol_ml": 1e-4 * t} for t in (10, 20)])
    paths = split_depth.plot_all(tmp_path, rows)
    assert [p.name for p in paths] == [
        "accuracy_vs_cut.png", "attack_vs_cut.png", "bytes_vs_cut.png", "tradeoff.png", "misalignment.png",  # no kNN curves: no curves_cut*
    ]
    for p in paths:
        with Image.open(p) as im:
            assert im.info["dpi"] == pytest.approx((200, 200), abs=0.01)
        assert p.with_suffix(".pdf").is_file()
    assert split_depth.MISALIGNMENT.startswith("online vs momentum front") and "|" not in split_depth.MISALIGNMENT
    assert SEED_MARKERS[0] != SEED_MARKERS[1]


def test_curves_show_knn_misalignment_and_momentum_spread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-cut learning-curve figure has three panels: kNN, ol_ml and ml_mg over steps, both methods."""
    from mona_sfl import plots
    from mona_sfl.studies import split_depth

    figs = []
    real = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: (figs.append(fig), real(fig, path))[1])
    rows = []
    for m, scale in (("MonAcoSFL", 1e-9), ("MocoSFL", 1e-7)):
        run = tmp_path / m
        run.mkdir()
        split_depth.write_rows(run / "knn_curve.csv", [{"step": 0, "knn_top1": 12.5}, {"step": 10, "knn_top1": 20.0}])
        split_depth.write_rows(run / "misalignment.csv", [{"step": t, "ol_ml": 1e-6 * t, "ol_og": 0.0, "ml_mg": scale * t} for t in (5, 10)])
        rows.append({"method": m, "cut": "7", "seed": "0", "run_dir": m})
    assert [p.name for p in split_depth.plot_curves(tmp_path, rows)] == ["curves_cut7.png"]
    axs = figs[0].axes
    assert [len(ax.get_lines()) for ax in axs] == [2, 2, 2]
    assert "momentum fronts vs their mean" in axs[2].get_ylabel()
    spread = {ln.get_label(): list(ln.get_ydata()) for ln in axs[2].get_lines()}
    assert spread == {"MonAcoSFL, seed 0": [5e-9, 1e-8], "MocoSFL, seed 0": [5e-7, 1e-6]}
    assert (tmp_path / "plots" / "curves_cut7.pdf").is_file()


def test_tail_mean_averages_the_last_30_percent_of_the_curve() -> None:
    """``knn_top1_tail``: the mean of the kNN evaluations in the last 30% of the steps, both ends included."""
    from mona_sfl.studies.split_depth import tail_mean

    curve = [{"step": t, "knn_top1": float(t // 100)} for t in range(0, 1001, 100)]  # 0, 1, ..., 10
    assert tail_mean(curve, 1000) == (7 + 8 + 9 + 10) / 4
    assert tail_mean(curve, 1000, fraction=1.0) == sum(range(11)) / 11
    assert tail_mean(curve, 1000, fraction=0.05) == 10.0  # the final evaluation alone
    assert tail_mean(curve, 950) == (7 + 8 + 9) / 3  # steps 665..950; a point past the run's end is not counted
    assert tail_mean([], 1000) is None
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="tail fraction"):
            tail_mean(curve, 1000, fraction=bad)
