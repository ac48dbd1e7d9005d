"""Model-inversion attack: decoder shapes for every cut, metrics, grid PNG, disjoint sets, run folders, CLI."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_overrides
from mona_sfl import build
from mona_sfl.checkpoint import CheckpointError
from mona_sfl.config import ConfigError, load_config, schema_config
from mona_sfl.data import ImageData
from mona_sfl.engine import Trainer
from mona_sfl.eval.knn import stratified_subset
from mona_sfl.models import NUM_CUTS
from mona_sfl.models.split import cut_info
from mona_sfl.cli.attack import run as attack_main
from mona_sfl.privacy import Decoder, attack_config, attack_front, attack_run, aux_indices, upsampling_stages
from mona_sfl.privacy.attack import _image_hashes

TINY = tiny_overrides("train.epochs=1", "train.steps_per_epoch=2")
FAST = dict(aux_fraction=0.1, num_test=16, epochs=2, batch_size=8, decoder_width=8, decoder_blocks=1)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(*extra: str):
    return schema_config(TINY + list(extra))


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2"])
def test_decoder_output_shape_for_every_cut(arch: str) -> None:
    """Random activations of every cut's shape decode to (N, 3, 32, 32) in [0, 1] with log2(32/H) upsamplings."""
    torch.manual_seed(0)
    for cut in range(1, NUM_CUTS + 1):
        c, h, w = cut_info(arch, cut).activation_shape
        dec = Decoder(c, (h, w), 32, width=8, blocks=0)
        expected = int(round(math.log2(32 / h)))
        assert dec.stages == expected == upsampling_stages((h, w), 32), (arch, cut)
        assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in dec.modules()) == expected
        assert not dec.resize
        with torch.no_grad():
            out = dec(torch.randn(2, c, h, w))
        assert out.shape == (2, 3, 32, 32), (arch, cut)
        assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_upsampling_adapts_to_any_size() -> None:
    assert upsampling_stages(32, 32) == 0 and upsampling_stages(16, 32) == 1 and upsampling_stages(4, 32) == 3
    assert upsampling_stages(6, 32) == 3  # 48 px, then resized to 32
    assert upsampling_stages(64, 32) == 0  # larger than the image: only a resize
    for size, img in ((6, 32), (64, 32), (5, 96), (8, (24, 40))):
        dec = Decoder(4, size, img, width=4, blocks=0)
        out = dec(torch.randn(2, 4, size, size))
        hw = (img, img) if isinstance(img, int) else img
        assert out.shape == (2, 3, *hw)


def test_aux_and_held_out_sets_are_disjoint() -> None:
    cfg = tiny_cfg()
    train, test = build.load_data(cfg, "train"), build.load_data(cfg, "test")
    aux, held, dropped = aux_indices(train, test, aux_fraction=0.05, num_test=16, seed=3)
    assert len(aux) == 10 and dropped == 0
    assert np.array_equal(held, stratified_subset(test.labels, 16)) and len(set(held)) == 16
    assert np.array_equal(aux, aux_indices(train, test, aux_fraction=0.05, num_test=16, seed=3)[0])  # seeded
    assert not np.array_equal(aux, aux_indices(train, test, aux_fraction=0.05, num_test=16, seed=4)[0])
    assert np.array_equal(held, aux_indices(train, test, aux_fraction=0.05, num_test=16, seed=4)[1])  # one held-out set for every seed
    # one set for both: the held-out indices are never drawn
    aux_same, held_same, _ = aux_indices(test, test, aux_fraction=1.0, num_test=16, seed=0)
    assert not set(aux_same) & set(held_same) and len(aux_same) == len(test) - 16
    # a training set holding copies of held-out test images: the copies are dropped
    copies = test.images[torch.as_tensor(held[:5])]
    mixed = ImageData(torch.cat([copies, train.images]), torch.cat([test.labels[torch.as_tensor(held[:5])], train.labels]), train.classes, train.mean, train.std)
    aux_m, held_m, dropped_m = aux_indices(mixed, test, aux_fraction=1.0, num_test=16, seed=0)
    assert dropped_m == 5 and not set(range(5)) & set(aux_m)
    assert not set(_image_hashes(mixed.images[torch.as_tensor(aux_m)])) & set(_image_hashes(test.images[torch.as_tensor(held)]))
    with pytest.raises(ConfigError):
        aux_indices(train, test, aux_fraction=0.0)


def test_held_out_images_cover_every_class_of_a_class_sorted_test_set() -> None:
    """An image folder lists its test images class by class: the held-out draw takes every class in turn, not the first N."""
    cfg = tiny_cfg()
    train = build.load_data(cfg, "train")
    labels = torch.arange(10).repeat_interleave(20)  # 10 classes, 20 images each, class by class
    images = torch.arange(200, dtype=torch.uint8).view(200, 1, 1, 1).expand(200, 3, 4, 4).contiguous()
    test = ImageData(images, labels, [str(c) for c in range(10)], train.mean, train.std)
    _, held, _ = aux_indices(train, test, aux_fraction=0.05, num_test=30, seed=0)
    assert len(held) == 30 and np.array_equal(held, np.sort(held))
    assert np.bincount(labels[torch.as_tensor(held)].numpy(), minlength=10).tolist() == [3] * 10
    _, held_all, _ = aux_indices(train, test, aux_fraction=0.05, num_test=500, seed=0)
    assert np.array_equal(held_all, np.arange(200))  # more than the set: all of it


def test_attack_on_tiny_front(tmp_path: Path) -> None:
    cfg = tiny_cfg()
    front, _ = build.build_models(cfg)
    before = {k: v.clone() for k, v in front.state_dict().items()}
    train, test = build.load_data(cfg, "train"), build.load_data(cfg, "test")
    grid = tmp_path / "grid.png"
    res = attack_front(front, train, test, grid_path=grid, **FAST)
    assert front.training and all(torch.equal(before[k], v) for k, v in front.state_dict().items())  # untouched
    assert res.aux_size == 20 and res.num_test == 16 and res.epochs == 2 and not res.jpeg
    assert res.activation_shape == list(cut_info("resnet18", 2, width=0.125).activation_shape)
    for v in (res.mse, res.psnr, res.ssim, res.mse_mean_image, res.final_train_loss):
        assert math.isfinite(v)
    assert 0 < res.mse < 1 and 0 < res.psnr < 100 and -1 <= res.ssim <= 1
    assert abs(res.psnr - 10 * math.log10(1 / res.mse)) < 3  # mean per-image PSNR vs PSNR of the mean MSE
    with Image.open(grid) as im:
        im.load()
        assert im.format == "PNG" and im.size == (16 * 34 + 2, 2 * 34 + 2)
    again = attack_front(front, train, test, **FAST)  # same seed: same numbers
    assert (again.mse, again.ssim) == (res.mse, res.ssim)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("attack") / "run"
    t = Trainer(tiny_cfg(), run, progress=False)
    t.run()
    return run


def test_attack_run_writes_results(run_dir: Path) -> None:
    res = attack_run(run_dir, **FAST)
    data = json.loads((run_dir / "attack.json").read_text())
    assert data["mse"] == res.mse and data["ssim"] == res.ssim and data["psnr"] == res.psnr
    assert data["meta"]["checkpoint_step"] == 2 and data["meta"]["cut"] == 2 and not data["meta"]["untrained"]
    with Image.open(run_dir / "attack.png") as im:
        im.load()
    base = attack_run(run_dir, untrained=True, **FAST)
    assert (run_dir / "attack_untrained.json").is_file() and (run_dir / "attack_untrained.png").is_file()
    assert json.loads((run_dir / "attack_untrained.json").read_text())["meta"]["untrained"]
    assert base.mse != res.mse  # a trained front differs from the initial one
    with pytest.raises(CheckpointError):
        attack_run(run_dir.parent / "missing")


def _ns(**kw) -> argparse.Namespace:
    d = dict(run_dir=None, config=None, overrides=[], out=None, untrained=False, epochs=1, aux_fraction=0.1, num_test=8, batch_size=8, decoder_width=8, device="cpu", quiet=True)
    d.update(kw)
    return argparse.Namespace(**d)


def test_attack_cli(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert attack_main(_ns(run_dir=str(run_dir))) == 0
    out = capsys.readouterr().out
    assert "MSE" in out and "PSNR" in out and "SSIM" in out and "no JPEG" in out
    cfg_file = run_dir / "config.toml"
    assert attack_main(_ns(config=str(cfg_file), overrides=["model.cut=9"], out=str(tmp_path / "base"))) == 0
    data = json.loads((tmp_path / "base" / "attack.json").read_text())
    assert data["meta"]["untrained"] and data["meta"]["cut"] == 9 and data["upsampling_stages"] == 3
    assert "SSIM" in capsys.readouterr().out
    with pytest.raises(ConfigError):
        attack_main(_ns(run_dir=str(run_dir), config=str(cfg_file)))
    with pytest.raises(ConfigError):
        attack_main(_ns(config=str(cfg_file)))  # no --out
    with pytest.raises(ConfigError):
        attack_main(_ns())


def test_attack_config_direct(tmp_path: Path) -> None:
    res = attack_config(tiny_cfg("model.arch=mobilenetv2", "model.cut=5"), tmp_path / "mb", **FAST)
    assert res.upsampling_stages == 2 and (tmp_path / "mb" / "attack.png").is_file()


def test_attack_cli_device_from_the_config_and_progress_lines(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No --device: the run's (or --config/--set's) `device` key, auto by default, as in train; progress on stderr unless --quiet."""
    from mona_sfl.cli import main

    small = ["--epochs", "2", "--aux-fraction", "0.1", "--num-test", "8", "--batch-size", "8", "--decoder-width", "8"]
    assert main(["attack", str(run_dir), *small]) == 0
    err = capsys.readouterr().err
    data = json.loads((run_dir / "attack.json").read_text())
    assert load_config(run_dir / "config.toml").device == "cpu" == data["meta"]["device"]  # the run's device key
    lines = [line for line in err.splitlines() if line.startswith("attack: decoder ")]  # not a terminal: plain lines
    assert lines[-1].startswith("attack: decoder 2/2 epochs (100%) train_mse ")
    assert f"{float(lines[-1].split()[-1]):.5f}" == f"{data['final_train_loss']:.5f}"
    assert main(["attack", "--config", str(run_dir / "config.toml"), "--set", "device=auto", "--out", str(tmp_path / "b"), "--quiet", *small]) == 0
    assert "attack: decoder" not in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "attack.json").read_text())["meta"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_stored_attack_from_the_first_n_images_is_not_reused() -> None:
    """The study reuses a stored attack only if it was made with the same options, seed and
    held-out draw: results from before the class-stratified draw (no ``held_out_draw``) are redone."""
    from mona_sfl.privacy.attack import HELD_OUT_DRAW, AttackResult
    from mona_sfl.studies.split_depth import _same_attack

    kw = {"epochs": 2, "aux_fraction": 0.1, "num_test": 16, "decoder_width": 8, "decoder_blocks": 1}
    stored = AttackResult(mse=0.01, psnr=20.0, ssim=0.5, aux_size=20, seed=3, **kw).to_dict()
    assert stored["held_out_draw"] == HELD_OUT_DRAW == "class-stratified"
    assert _same_attack(stored, kw, 3)
    assert not _same_attack(stored, kw, 4) and not _same_attack(stored, {**kw, "epochs": 3}, 3)
    before_the_draw = {k: v for k, v in stored.items() if k != "held_out_draw"}
    assert not _same_attack(before_the_draw, kw, 3)
