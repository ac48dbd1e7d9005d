"""Client-front statistics: exact values on made-up activations, a run folder against its untrained front, the CLI."""

from __future__ import annotations

import json
import shutil
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from mona_sfl import build
from mona_sfl.checkpoint import load_checkpoint, load_run_config
from mona_sfl.cli import main
from mona_sfl.config import ConfigError, schema_config
from mona_sfl.engine import Trainer
from mona_sfl.eval.front import activation_stats, encode_front, inspect_run, weight_norm_sq
from mona_sfl.eval.knn import stratified_subset
from mona_sfl.data.views import normalize

pytestmark = pytest.mark.usefixtures("one_thread")


def test_activation_stats_exact_values() -> None:
    a = torch.zeros(4, 3, 2, 2)  # channel 0: dead; channel 1: 2 for every image; channel 2: image i gives i
    a[:, 1] = 2.0
    for i in range(4):
        a[i, 2] = float(i)
    s = activation_stats(a, {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(7)})
    assert (s.images, s.channels, s.dead_channels) == (4, 3, 1)
    assert s.zero_fraction == 20 / 48 and s.mean_abs == 56 / 48
    assert s.effective_rank == pytest.approx(1.0, abs=1e-12) and s.top_share == pytest.approx(1.0, abs=1e-12)
    # channel 1: std 0; channel 2: means 0..3, sample std sqrt(5/3) over mean 1.5; the median of the two
    assert s.channel_cv == pytest.approx(math.sqrt(5 / 3) / 1.5 / 2, abs=1e-12)
    assert s.weight_sq == 5.0  # the integer counter is left out


def test_activation_stats_two_equal_directions_and_no_spread() -> None:
    a = torch.zeros(4, 2, 1, 3)
    a[0, 0], a[1, 0], a[2, 1], a[3, 1] = 1.0, -1.0, 1.0, -1.0  # two orthogonal directions, same variance
    s = activation_stats(a)
    assert s.effective_rank == pytest.approx(2.0, abs=1e-12) and s.top_share == pytest.approx(0.5, abs=1e-12)
    assert s.dead_channels == 0 and math.isnan(s.weight_sq)
    same = activation_stats(torch.ones(5, 2, 2, 2))
    assert (same.effective_rank, same.top_share, same.channel_cv, same.dead_channels) == (0.0, 0.0, 0.0, 0)
    dead = activation_stats(torch.zeros(3, 4, 2, 2))
    assert (dead.dead_channels, dead.zero_fraction, dead.channel_cv) == (4, 1.0, 0.0)


@pytest.mark.parametrize("shape", [(4, 3, 2), (1, 3, 2, 2)])
def test_activation_stats_refuses_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match="activation"):
        activation_stats(torch.ones(shape))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("front") / "run"
    Trainer(schema_config(tiny_overrides("train.epochs=1", "train.steps_per_epoch=2")), run, progress=False).run()
    return run


def test_inspect_run_measures_the_synced_and_the_untrained_front(run_dir: Path) -> None:
    res = inspect_run(run_dir, num_test=8)
    cfg, ckpt = load_run_config(run_dir), load_checkpoint(run_dir)
    test = build.load_data(cfg, "test")
    front, _ = build.build_models(cfg)
    front.eval()
    cpu = torch.device("cpu")
    images = test.images[torch.as_tensor(stratified_subset(test.labels, 8))]
    assert len(set(test.labels[torch.as_tensor(stratified_subset(test.labels, 8))].tolist())) == min(8, len(test.classes))  # not the first class alone
    assert res["untrained"] == activation_stats(encode_front(front, images, test.mean, test.std, cpu), front.state_dict())
    front.load_state_dict(ckpt["global_online"])
    assert res["trained"] == activation_stats(encode_front(front, images, test.mean, test.std, cpu), ckpt["global_online"])
    assert res["step"] == 2 and res["num_test"] == 8 and res["trained"].images == 8
    assert res["trained"].weight_sq == weight_norm_sq(ckpt["global_online"]) != res["untrained"].weight_sq


def test_front_knn_is_the_knn_of_the_fronts_own_activations(run_dir: Path) -> None:
    from mona_sfl.eval.knn import knn_accuracy
    from mona_sfl.eval.monitor import eval_sets

    res = inspect_run(run_dir, num_test=8, knn=True)
    cfg, ckpt = load_run_config(run_dir), load_checkpoint(run_dir)
    bank, test = eval_sets(cfg, build.load_data(cfg, "train"), build.load_data(cfg, "test"))
    front, _ = build.build_models(cfg)
    front.eval()
    cpu = torch.device("cpu")

    def feats(data):  # type: ignore[no-untyped-def]
        return torch.nn.functional.normalize(encode_front(front, data.images, data.mean, data.std, cpu).flatten(1), dim=1)

    untrained = knn_accuracy(feats(bank), bank.labels, feats(test), test.labels, len(bank.classes), k=cfg.eval.knn_k, t=cfg.eval.knn_t)
    front.load_state_dict(ckpt["global_online"])
    trained = knn_accuracy(feats(bank), bank.labels, feats(test), test.labels, len(bank.classes), k=cfg.eval.knn_k, t=cfg.eval.knn_t)
    assert res["knn"] == {"untrained": untrained, "trained": trained}
    assert res["trained"] == inspect_run(run_dir, num_test=8)["trained"] and "knn" not in inspect_run(run_dir, num_test=8)


def test_depth_knn_ends_at_the_runs_own_knn(run_dir: Path) -> None:
    """kNN along the encoder: the projector's entry is the run's kNN (untrained: that of the initial encoder),
    the last unit's is the pooled-backbone kNN, the front's that of its position-averaged output."""
    from mona_sfl.eval.knn import knn_accuracy
    from mona_sfl.eval.monitor import eval_sets

    res = inspect_run(run_dir, num_test=8, depth=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = load_run_config(run_dir)
    assert cfg.eval.knn_features == "projector"
    units = [f"unit {i}" for i in range(cfg.model.cut, 9)]
    for which in ("untrained", "trained"):
        assert list(res["depth"][which]) == ["front", *units, "projector"]
    assert res["depth"]["trained"]["projector"] == summary["knn_top1"]
    front, server = build.build_models(cfg)
    front.eval(), server.eval()
    bank, test = eval_sets(cfg, build.load_data(cfg, "train"), build.load_data(cfg, "test"))
    assert cfg.model.cut == 2

    def knn(encode):  # type: ignore[no-untyped-def]
        fb = torch.nn.functional.normalize(encode(normalize(bank.images, bank.mean, bank.std)), dim=1)
        ft = torch.nn.functional.normalize(encode(normalize(test.images, bank.mean, bank.std)), dim=1)
        return knn_accuracy(fb, bank.labels, ft, test.labels, len(bank.classes), k=cfg.eval.knn_k, t=cfg.eval.knn_t)

    with torch.no_grad():
        assert res["depth"]["untrained"]["projector"] == knn(lambda x: server(front(x)))
        assert res["depth"]["untrained"]["unit 4"] == knn(lambda x: server.body[:3](front(x)).mean(dim=(2, 3)))
    ckpt = load_checkpoint(run_dir)
    front.load_state_dict(ckpt["global_online"])
    server.load_state_dict(ckpt["server"]["online"])
    with torch.no_grad():
        assert res["depth"]["trained"][units[-1]] == knn(lambda x: server.features(front(x)))
        assert res["depth"]["trained"]["front"] == knn(lambda x: front(x).mean(dim=(2, 3)))
    assert "depth" not in inspect_run(run_dir, num_test=8) and res["trained"] == inspect_run(run_dir, num_test=8)["trained"]


def test_front_cli(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["front", str(run_dir), "--num-test", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["run", "front", "dead"] and len(out) == 5
    assert " untrained " in out[2] and " step 2 " in out[3] and out[4].startswith("on 8 test images of each run drawn class by class")
    assert main(["front", str(run_dir), "--num-test", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["step"] == 2 and data["trained"] == inspect_run(run_dir, num_test=8)["trained"].to_dict() and "knn" not in data
    assert main(["front", str(run_dir), "--num-test", "8", "--knn"]) == 0
    out = capsys.readouterr().out.splitlines()
    knn = inspect_run(run_dir, num_test=8, knn=True)["knn"]
    assert out[0].rstrip().endswith("front kNN %") and out[2].endswith(f"{knn['untrained']:.2f}") and out[3].endswith(f"{knn['trained']:.2f}")
    assert main(["front", str(run_dir), "--num-test", "8", "--knn", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["knn"] == knn
    assert main(["front", str(run_dir), "--num-test", "8", "--depth"]) == 0
    out = capsys.readouterr().out.splitlines()
    depth = inspect_run(run_dir, num_test=8, depth=True)["depth"]
    assert out[6].split()[1:4] == ["features", "after", "untrained"] and len(out) == 8 + len(depth["trained"]) + 1
    assert out[-2].split()[-3:] == ["projector", f"{depth['untrained']['projector']:.2f}", f"{depth['trained']['projector']:.2f}"]
    assert main(["front", str(run_dir), "--num-test", "8", "--depth", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["depth"] == depth


@pytest.mark.parametrize(("args", "message"), [
    (["--num-test", "1"], "num-test must be an integer >= 2"),
    (["--num-test", "100000"], "more than the run's"),
])
def test_front_cli_refuses_bad_input(run_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    assert main(["front", str(run_dir), *args]) == 2
    assert message in capsys.readouterr().err


def test_front_cli_refuses_a_folder_without_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["front", str(tmp_path)]) == 2
    assert "mona-sfl: error:" in capsys.readouterr().err


def test_front_cli_refuses_a_checkpoint_that_does_not_fit(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "run"
    shutil.copytree(run_dir, other)
    cfg = (other / "config.toml").read_text()
    assert cfg.count("cut = 2\n") == 1
    (other / "config.toml").write_text(cfg.replace("cut = 2\n", "cut = 3\n"))  # the checkpoint holds a cut-2 front
    assert main(["front", str(other), "--num-test", "8"]) == 2
    assert "the checkpoint's client front does not fit the run's model" in capsys.readouterr().err
