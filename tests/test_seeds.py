"""``mona-sfl train --seeds``: one run folder per seed, and a table with the mean and the sample std (n shown)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from conftest import tiny_overrides

from mona_sfl.api import train_seeds
from mona_sfl.cli import main
from mona_sfl.config import ConfigError, load_config
from mona_sfl.runs import grouped_table, mean_std

TINY = tiny_overrides("train.epochs=1")


def test_mean_std_is_the_sample_std() -> None:
    assert mean_std([1.0, 2.0, 6.0]) == (3.0, pytest.approx(statistics.stdev([1.0, 2.0, 6.0])), 3)
    mean, std, n = mean_std([4.0])
    assert (mean, n) == (4.0, 1) and math.isnan(std)


def test_grouped_table_mean_sample_std_and_n_per_group() -> None:
    """The study's table: one row per group, n, mean ± sample std; a missing value counts in no mean."""
    rows = [
        {"method": "MonAcoSFL", "cut": 2, "acc": 20.0, "b": 2_000_000}, {"method": "MonAcoSFL", "cut": 2, "acc": 23.0, "b": 2_000_000},
        {"method": "MocoSFL", "cut": 2, "acc": "", "b": 3_500_000}, {"method": "MonAcoSFL", "cut": 6, "acc": 10.0, "b": "nan"},
        {"method": "MonAcoSFL", "cut": 6, "acc": 12.0, "b": 1e6},
    ]
    lines = grouped_table(rows, ["method", "cut"], [("acc", "acc %", ".2f", 1.0), ("b", "MB", ".1f", 1e-6), ("x", "never", ".1f", 1.0)]).splitlines()
    assert lines[0].split() == ["method", "cut", "n", "acc", "%", "(mean", "±", "std)", "MB", "(mean", "±", "std)"]
    assert [line.split() for line in lines[2:]] == [
        ["MonAcoSFL", "2", "2", "21.50", "±", f"{statistics.stdev([20.0, 23.0]):.2f}", "2.0", "±", "0.0"],
        ["MocoSFL", "2", "1", "-", "3.5"],
        ["MonAcoSFL", "6", "2", "11.00", "±", "1.41", "1.0", "(n=1)"],
    ]


def test_train_seeds_runs_each_seed_in_its_folder_and_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None) -> None:
    args = ["train", "--quiet", "--out", str(tmp_path / "s"), "--seeds", "0,2"] + [a for o in TINY for a in ("--set", o)]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    knn = []
    for seed in (0, 2):
        run = tmp_path / "s" / f"seed{seed}"
        assert load_config(run / "config.toml").seed == seed
        knn.append(json.loads((run / "summary.json").read_text())["knn_top1"])
        row = next(line.split() for line in out if line.split()[:1] == [str(seed)])
        assert row[1] == f"{knn[-1]:.2f}" and row[-1] == str(run)
    assert out[0].split()[:3] == ["seed", "kNN", "top-1"]
    mean_row = next(line for line in out if line.startswith("mean (n=2)"))
    std_row = next(line for line in out if line.startswith("sample std (n=2)"))
    assert mean_row.split()[2] == f"{statistics.mean(knn):.2f}"
    assert std_row.split()[3] == f"{statistics.stdev(knn):.2f}"


def test_seeds_refuse_bad_input_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["train", "--quiet", "--out", str(tmp_path / "s")] + [a for o in TINY for a in ("--set", o)]
    for extra, message in [
        (["--seeds", "0,x"], "comma-separated integers"),
        (["--seeds", "0,-1"], "seed must be in"),
        (["--seeds", "0", "--set", "seed=4"], "do not set it as well"),
        (["--seeds", "0", "--resume", str(tmp_path)], "--seeds starts new runs"),
    ]:
        assert main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match="twice"):
        train_seeds(None, TINY, [1, 1], tmp_path / "t")
