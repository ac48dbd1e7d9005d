"""``log.backends``: metrics.csv, TensorBoard and W&B hold the records of metrics.jsonl, also after a resume."""

from __future__ import annotations

import csv
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from conftest import crash_in_server_step, tiny_overrides
from conftest import train as train_tiny

from mona_sfl.checkpoint import read_metrics
from mona_sfl.cli import main
from mona_sfl.config import ConfigError, load_config, schema_config
from mona_sfl.engine import Trainer
from mona_sfl.logs import numbers

TINY = tiny_overrides("eval.every=1", "train.checkpoint_every=2")


def cfg_with(*extra: str) -> Any:
    return schema_config([*TINY, *extra])


def _csv_records(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def assert_csv_holds_the_jsonl(run: Path) -> None:
    jsonl, rows = read_metrics(run / "metrics.jsonl"), _csv_records(run)
    assert len(rows) == len(jsonl) > 5
    for rec, row in zip(jsonl, rows):
        assert {k: v for k, v in row.items() if v != ""} == {k: str(v) for k, v in rec.items()}


def _tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_tensorboard_holds_the_jsonl(run: Path) -> None:
    expected: dict[str, list[tuple[int, float]]] = {}
    for rec in read_metrics(run / "metrics.jsonl"):
        for k, v in numbers(rec).items():
            expected.setdefault(k, []).append((rec["step"], v))
    got = _tensorboard_scalars(run)
    assert set(got) == set(expected) >= {"loss", "knn_top1", "ol_ml", "epoch"}
    for tag, points in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-6), tag  # float32


def test_csv_and_tensorboard_hold_the_same_records(tmp_path: Path, one_thread: None) -> None:
    train_tiny(cfg_with("log.backends=csv,tensorboard"), tmp_path / "r")
    assert_csv_holds_the_jsonl(tmp_path / "r")
    assert_tensorboard_holds_the_jsonl(tmp_path / "r")
    train_tiny(cfg_with(), tmp_path / "plain")  # the default: metrics.jsonl only
    assert not (tmp_path / "plain" / "metrics.csv").exists() and not (tmp_path / "plain" / "tensorboard").exists()


def test_after_a_crash_and_a_resume_the_backends_hold_the_jsonl_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    cfg = cfg_with("log.backends=jsonl,tensorboard,csv")
    run = tmp_path / "r"
    with crash_in_server_step(monkeypatch, 6):  # step 5 is logged after the step-4 checkpoint: twice unless rebuilt
        train_tiny(cfg, run)
    with Trainer.resume(run, progress=False) as t:
        t.run(resumed=True)
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 7))
    assert_csv_holds_the_jsonl(run)
    assert_tensorboard_holds_the_jsonl(run)


def test_wandb_gets_the_records_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    calls: dict[str, Any] = {"log": [], "finished": 0}

    class FakeRun:
        def log(self, data: dict[str, float], step: int) -> None:
            calls["log"].append((step, data))

        def finish(self) -> None:
            calls["finished"] += 1

    def init(**kw: Any) -> FakeRun:
        calls["init"] = kw
        return FakeRun()

    fake = types.ModuleType("wandb")
    fake.init = init  # type: ignore[attr-defined]
    fake.__spec__ = types.SimpleNamespace(name="wandb")  # type: ignore[assignment]  # importlib.util.find_spec reads it
    monkeypatch.setitem(sys.modules, "wandb", fake)
    train_tiny(cfg_with("log.backends=wandb", "log.wandb_project=demo"), tmp_path / "r")
    assert calls["init"]["mode"] == "offline" and calls["init"]["project"] == "demo"
    assert calls["init"]["dir"] == str(tmp_path / "r") and calls["init"]["config"]["model.cut"] == 2
    assert calls["log"] == [(r["step"], numbers(r)) for r in read_metrics(tmp_path / "r" / "metrics.jsonl")]
    assert calls["finished"] == 1


def test_a_missing_wandb_is_a_clear_error_before_anything_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ConfigError, match="pip install wandb"):
        Trainer(cfg_with("log.backends=csv,wandb"), tmp_path / "r")
    args = ["train", "--quiet", "--out", str(tmp_path / "cli")] + [a for o in TINY for a in ("--set", o)]
    assert main([*args, "--set", "log.backends=wandb"]) == 2
    assert "the wandb package is not installed: pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "cli").exists()


def test_backends_are_checked_and_a_list_is_accepted_in_a_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[log]\nbackends = ["csv", "tensorboard"]\n')
    cfg = load_config(f)
    assert cfg.log.backends == "csv,tensorboard" and cfg.log.backend_names == ["jsonl", "csv", "tensorboard"]
    for bad, message in [("tb", "choose one of jsonl, csv, tensorboard, wandb"), ("csv,", "empty name"), ("csv,csv", "twice")]:
        with pytest.raises(ConfigError, match=message):
            schema_config([f"log.backends={bad}"])
    f.write_text('[log]\nbackends = ["csv", 3]\n')
    with pytest.raises(ConfigError, match="list of names"):
        load_config(f)
    with pytest.raises(ConfigError, match="log.wandb_mode"):
        schema_config(["log.wandb_mode=cloud"])
