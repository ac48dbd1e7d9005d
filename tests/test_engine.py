"""End-to-end runs of the in-process engine: run folder, exact resume, CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_same, crash_in_server_step, load_checkpoint, losses, tiny_overrides
from mona_sfl.checkpoint import read_metrics
from mona_sfl.cli import main
from mona_sfl.config import load_config, schema_config
from mona_sfl.engine import Trainer

# the default device, a kNN monitor every epoch and the linear probe (2 epochs)
TINY = tiny_overrides("train.checkpoint_every=2", "eval.every=1", "eval.linear_epochs=2", drop=("device", "eval.linear"))


def tiny_cfg(*extra: str):
    return schema_config(TINY + list(extra))


def test_run_folder_contents(tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = Trainer(tiny_cfg(), run, progress=False).run()
    assert {"config.toml", "metrics.jsonl", "summary.json", "checkpoint.pt"} <= {p.name for p in run.iterdir()}
    assert summary["steps"] == 6 and summary["epochs"] == 2
    on_disk = json.loads((run / "summary.json").read_text())
    for key in ("knn_top1", "knn_top1_init", "linear_top1", "steps", "images_per_s", "wall_s"):
        assert key in on_disk
    assert 0 <= on_disk["knn_top1"] <= 100
    recs = read_metrics(run / "metrics.jsonl")
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all({"epoch", "step", "loss"} <= set(r) for r in steps)
    syncs = [r["step"] for r in steps if r.get("sync")]
    assert syncs == [2, 3, 5, 6]  # every 2 steps within an epoch, and at each epoch end
    assert all("ol_ml" in r for r in steps if r.get("sync"))
    assert len([r for r in recs if "knn_top1" in r]) >= 3  # init, per epoch, final
    assert load_config(run / "config.toml") == tiny_cfg()
    ckpt = load_checkpoint(run)
    assert {"server", "clients", "global_online"} <= set(ckpt)
    assert {"online", "momentum", "queue", "optimizer"} <= set(ckpt["server"])


@pytest.mark.parametrize("align", ["true", "false"])
def test_resume_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, align: str) -> None:
    cfg = tiny_cfg(f"algo.align_momentum={align}")
    full = tmp_path / "full"
    Trainer(cfg, full, progress=False).run()

    part = tmp_path / "part"
    with crash_in_server_step(monkeypatch, 6):  # dies in step 6, after the checkpoint at step 4
        Trainer(cfg, part, progress=False).run()
    assert max(s for s, _ in losses(part)) == 5
    trainer = Trainer.resume(part, progress=False)
    assert trainer.global_step == 4
    trainer.run(resumed=True)

    assert losses(part) == losses(full)
    a, b = load_checkpoint(full), load_checkpoint(part)
    assert_same(a["server"]["online"], b["server"]["online"], "server.online")
    assert_same(a["global_online"], b["global_online"], "global_online")
    assert_same(a["server"]["queue"]["queue"], b["server"]["queue"]["queue"], "server.queue.queue")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "mona_sfl", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_cli_train_prints_knn(tmp_path: Path) -> None:
    args = ["train", "--quiet", "--out", str(tmp_path / "r")]
    for o in TINY + ["train.epochs=1", "eval.linear=false"]:
        args += ["--set", o]
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "kNN top-1 accuracy:" in r.stdout and "at initialisation" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "model.cut=12"], "legal cut layers are 1..9"),
        (["--set", "bogus=1"], "unknown config key 'bogus'"),
        (["--config", "missing.toml"], "config file not found"),
        (["--set", "data.name=cifar10"], "needs a data directory"),
        (["--set", "data.name=imagefolder", "--set", "data.dir=nowhere"], "nowhere"),
        (["--set", "train.batch_size=500", "--set", "data.synthetic_size=200"], "larger than the smallest client"),
    ],
)
def test_cli_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    r = main(["train", "--quiet", "--out", str(tmp_path / "r"), *args])
    assert r == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_bad_input_message_and_existing_run_untouched(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.toml").write_text("seed = 1\n")
    before = (run / "config.toml").read_bytes()
    r = run_cli("train", "--out", str(run), cwd=tmp_path)
    assert r.returncode == 2 and "already holds a run" in r.stderr and "Traceback" not in r.stderr
    assert (run / "config.toml").read_bytes() == before
    r = run_cli("train", "--set", "model.cut=12", cwd=tmp_path)
    assert r.returncode == 2 and "model.cut=12" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train", "--resume", str(tmp_path / "none"), cwd=tmp_path)
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run_cli("train", "--resume", str(run), cwd=tmp_path)
    assert r.returncode == 2 and "checkpoint" in r.stderr


def test_knn_every_steps_gives_a_curve_and_leaves_training_alone(tmp_path: Path) -> None:
    """eval.every_steps adds kNN records at fixed steps (not twice where an epoch ends) and
    changes no loss: evaluation reads the models only."""
    plain = tmp_path / "plain"
    Trainer(tiny_cfg("eval.every=0"), plain, progress=False).run()
    curve = tmp_path / "curve"
    Trainer(tiny_cfg("eval.every=1", "eval.every_steps=2"), curve, progress=False).run()
    assert losses(curve) == losses(plain)
    knn_steps = [r["step"] for r in read_metrics(curve / "metrics.jsonl") if "knn_top1" in r]
    assert knn_steps == [0, 2, 3, 4, 6]  # init; steps 2 and 4; epoch end 3; final 6
