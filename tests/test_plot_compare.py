"""``mona-sfl plot`` and ``mona-sfl compare``: figures (PNG 200 dpi + PDF) with the labels, and the table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_overrides
from conftest import train as train_tiny
from PIL import Image

from mona_sfl.checkpoint import read_metrics
from mona_sfl.cli import main
from mona_sfl.config import load_config, schema_config
from mona_sfl.core.schedule import server_lr
from mona_sfl.plots import curve_figures
from mona_sfl.runs import COLUMNS, labels, load_runs

TINY = tiny_overrides("eval.every_steps=2")
LABELS = ["model.cut=2, algo.align_momentum=true", "model.cut=3, algo.align_momentum=false"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> list[Path]:
    base = tmp_path_factory.mktemp("runs")
    train_tiny(schema_config(TINY), base / "mona")
    train_tiny(schema_config([*TINY, "model.cut=3", "algo.align_momentum=false"]), base / "moco")
    return [base / "mona", base / "moco"]


def test_steps_record_the_server_learning_rate(two_runs: list[Path]) -> None:
    cfg = load_config(two_runs[0] / "config.toml")
    steps = [r for r in read_metrics(two_runs[0] / "metrics.jsonl") if "loss" in r]
    assert [r["lr"] for r in steps] == [server_lr(cfg.train.lr, r["epoch"], cfg.train.epochs) for r in steps]
    assert steps[0]["lr"] == cfg.train.lr > steps[-1]["lr"]


def test_plot_writes_png_and_pdf_of_every_curve(two_runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "figs"
    assert main(["plot", *map(str, two_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    for name in ("loss", "knn", "lr", "misalignment"):
        png, pdf = out / f"{name}.png", out / f"{name}.pdf"
        assert str(png) in printed and str(pdf) in printed
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.info["dpi"] == pytest.approx((200, 200), abs=0.01)
            assert im.size[0] > 1000
        data = pdf.read_bytes()
        assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    assert main(["plot", str(two_runs[0])]) == 0  # one run: RUN_DIR/plots
    assert (two_runs[0] / "plots" / "loss.pdf").is_file()


def test_the_figures_carry_the_labels(two_runs: list[Path]) -> None:
    runs = load_runs(two_runs)
    assert labels(runs) == LABELS
    figures = curve_figures(runs, labels(runs))
    assert list(figures) == ["loss", "knn", "lr", "misalignment"]
    ylabels = {"loss": "training loss (InfoNCE)", "knn": "kNN top-1 accuracy (%)", "lr": "server learning rate"}
    for name, fig in figures.items():
        (ax,) = fig.axes
        assert ax.get_xlabel() == "training step"
        assert ax.get_ylabel() == ylabels.get(name, "online vs momentum front:\nmean squared difference")
        assert [t.get_text() for t in ax.get_legend().get_texts()] == LABELS
    knn_steps = list(figures["knn"].axes[0].get_lines()[0].get_xdata())
    assert knn_steps == [r["step"] for r in runs[0].records if "knn_top1" in r] == [0, 2, 4, 6]


def test_labels_of_runs_with_one_config_are_their_folder_names(two_runs: list[Path]) -> None:
    runs = load_runs([two_runs[0], two_runs[0]])
    assert labels(runs) == ["mona", "mona"]


def test_compare_prints_the_differences_and_the_results(two_runs: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", *map(str, two_runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    heading = lines[0].split("  ")
    assert [h.strip() for h in heading if h.strip()] == ["run", "model.cut", "algo.align_momentum", *(h for _, h, _ in COLUMNS)]
    runs = load_runs(two_runs)
    for line, run, cut, align in zip(lines[2:], runs, ["2", "3"], ["true", "false"]):
        cells = line.split()
        assert cells[:3] == [run.name, cut, align]
        assert cells[3] == f"{run.summary['knn_top1']:.2f}" and str(run.summary["steps"]) in cells
    assert len(lines) == 4


def test_plot_and_compare_refuse_what_is_not_a_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    for cmd in ("plot", "compare"):
        assert main([cmd, str(tmp_path / "nowhere")]) == 2
        assert "does not exist" in capsys.readouterr().err
        assert main([cmd, str(tmp_path / "empty")]) == 2
        assert "not a mona_sfl run folder" in capsys.readouterr().err


def test_plot_refuses_an_out_that_is_a_file(two_runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    assert main(["plot", str(two_runs[0]), "--out", str(tmp_path / "file")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_reading_and_plotting_runs_imports_no_torch() -> None:
    code = "import sys, mona_sfl.runs, mona_sfl.plots, mona_sfl.cli.plot, mona_sfl.cli.compare; print('TORCH', 'torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "TORCH False" in r.stdout


def test_labels_name_at_most_four_keys_and_the_folder_where_they_collide() -> None:
    from mona_sfl.runs import Run

    a = {f"k{i}": 0 for i in range(6)}
    b = {**a, **{f"k{i}": 1 for i in range(5)}}
    c = {**a, "k5": 1}  # differs from a only in a key the label leaves out
    runs = [Run(Path("x/a"), a, None, []), Run(Path("x/b"), b, None, []), Run(Path("x/c"), c, None, [])]
    assert labels(runs) == [
        "k0=0, k1=0, k2=0, k3=0, +2 more keys (a)",
        "k0=1, k1=1, k2=1, k3=1, +2 more keys",
        "k0=0, k1=0, k2=0, k3=0, +2 more keys (c)",
    ]


def _fake_runs() -> list:
    """Four runs in memory: two methods x two seeds, loss every step, kNN every 5 steps, ol_ml at syncs."""
    from mona_sfl.runs import Run

    runs = []
    for align in (True, False):
        for seed in (0, 1):
            recs = [{"step": t, "epoch": 0, "loss": 5.0 - 0.01 * t + 0.1 * seed, "lr": 0.06} for t in range(1, 61)]
            recs += [{"step": t, "knn_top1": 10.0 + t / 10 + seed} for t in range(0, 61, 5)]
            recs += [{"step": t, "sync": True, "ol_ml": 1e-4 * (2 if align else 50) * (1 + seed)} for t in range(10, 61, 10)]
            runs.append(Run(Path(f"{'mona' if align else 'moco'}-s{seed}"), {"seed": seed, "model.cut": 2, "algo.align_momentum": align}, None, recs))
    return runs


def test_runs_that_differ_in_seed_share_a_colour_and_each_seed_has_a_marker() -> None:
    from mona_sfl.plots import SEED_MARKERS, run_styles

    runs = _fake_runs()
    assert labels(runs) == [f"seed={s}, algo.align_momentum={a}" for a in ("true", "false") for s in (0, 1)]
    styles = run_styles(runs)
    assert [c for c, _, _ in styles] == [0, 0, 1, 1]
    assert [m for _, m, _ in styles] == [SEED_MARKERS[0], SEED_MARKERS[1]] * 2
    figures = curve_figures(runs, labels(runs))
    for name in ("knn", "misalignment"):
        lines = figures[name].axes[0].get_lines()
        assert [ln.get_color() for ln in lines][0] == lines[1].get_color() != lines[2].get_color() == lines[3].get_color()
        assert [ln.get_marker() for ln in lines] == [SEED_MARKERS[0], SEED_MARKERS[1]] * 2
    # runs of different configs (no seed pairs) keep one colour each
    assert [c for c, _, _ in run_styles(runs[::2])] == [0, 1]


def test_human_byte_units_on_axes() -> None:
    import matplotlib.pyplot as plt

    from mona_sfl.plots import bytes_axis, human_bytes

    assert [human_bytes(x) for x in (850, 12_345, 4.5e6, 1e7, 123e6, 1.23e9, 2.5e12)] == [
        "850 B", "12.3 kB", "4.5 MB", "10 MB", "123 MB", "1.2 GB", "2.5 TB"
    ]
    fig, ax = plt.subplots()
    ax.plot([1e6, 1e7, 1e9], [1, 2, 3])
    ax.set_xscale("log")
    bytes_axis(ax.xaxis)
    fig.canvas.draw()
    shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert "10 MB" in shown and "1 GB" in shown and not any("10^" in t or "e+" in t for t in shown)
    plt.close(fig)


def test_spread_labels_leaves_no_two_labels_overlapping() -> None:
    import matplotlib.pyplot as plt

    from mona_sfl.plots import spread_labels

    fig, ax = plt.subplots()
    ax.scatter([0.5, 0.5, 0.51, 0.5], [0.5, 0.5, 0.5, 0.505])
    texts = [ax.annotate(f"cut {c}", (0.5, 0.5), xytext=(6, 4), textcoords="offset points") for c in (1, 2, 4, 8)]
    renderer = fig.canvas.get_renderer()
    assert texts[0].get_window_extent(renderer).overlaps(texts[1].get_window_extent(renderer))
    spread_labels(ax, texts)
    boxes = [t.get_window_extent(renderer) for t in texts]
    assert not any(boxes[i].overlaps(boxes[j]) for i in range(4) for j in range(i + 1, 4))
    plt.close(fig)
