"""Datasets, the synthetic generator, MoCo v2 views and client streams."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from mona_sfl.data import DATASETS, DataError, ImageData, load_dataset, make_synthetic
from mona_sfl.data.datasets import STATS, channel_stats
from mona_sfl.data.stream import ClientStream, batches
from mona_sfl.data.synthetic import SHAPES
from mona_sfl.data.views import TwoViews, normalize

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small() -> ImageData:
    return make_synthetic(64, seed=0)


# --------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_deterministic_and_seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    import mona_sfl.data.synthetic as syn

    a, b, c = make_synthetic(200, seed=3), make_synthetic(200, seed=3), make_synthetic(200, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    monkeypatch.setattr(syn, "_CHUNK", 7)  # compositing chunk size must not change the output
    assert torch.equal(make_synthetic(200, seed=3).images, a.images)
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.labels, c.labels)


def test_synthetic_shapes_dtypes_balance() -> None:
    d = make_synthetic(1003, seed=0)
    assert d.images.shape == (1003, 3, 32, 32) and d.images.dtype == torch.uint8
    assert d.labels.shape == (1003,) and d.labels.dtype == torch.int64
    assert d.classes == list(SHAPES[:10]) and d.num_classes == 10 and len(d) == 1003
    assert torch.bincount(d.labels, minlength=10).tolist() == [101, 101, 101] + [100] * 7
    # labels come from numpy only: pinned exactly
    assert make_synthetic(12, seed=0).labels.tolist() == [9, 2, 7, 4, 5, 1, 0, 3, 6, 0, 8, 1]
    # full use of the pixel range, roughly centred (colours are uniform in RGB)
    x = d.images.float() / 255
    assert d.images.min() == 0 and d.images.max() == 255
    assert abs(float(x.mean()) - 0.5) < 0.03


def test_synthetic_options_and_errors() -> None:
    d = make_synthetic(48, seed=1, num_classes=16, image_size=40)
    assert d.images.shape == (48, 3, 40, 40) and sorted(set(d.labels.tolist())) == list(range(16))
    assert d.classes == list(SHAPES)
    with pytest.raises(DataError, match="data.num_classes"):
        make_synthetic(10, seed=0, num_classes=len(SHAPES) + 1)
    with pytest.raises(DataError, match="data.num_classes"):
        make_synthetic(10, seed=0, num_classes=1)
    with pytest.raises(DataError, match="data.synthetic_size"):
        make_synthetic(0, seed=0)
    with pytest.raises(DataError, match="data.image_size"):
        make_synthetic(10, seed=0, image_size=4)


def test_synthetic_shape_not_colour_defines_class() -> None:
    # Mean colour carries no class signal: per-class mean RGB is near the global mean
    # (palette colours are extreme, so a class mean over 500 images varies by ~0.015).
    d = make_synthetic(5000, seed=0)
    x = d.images.float().mean(dim=(2, 3)) / 255  # (N, 3)
    per_class = torch.stack([x[d.labels == c].mean(0) for c in range(10)])
    assert float((per_class - x.mean(0)).abs().max()) < 0.05


def test_load_synthetic_splits() -> None:
    tr = load_dataset("synthetic", "train", seed=5, synthetic_size=100)
    te = load_dataset("synthetic", "test", seed=5, synthetic_size=100)
    assert len(tr) == 100 and len(te) == 20
    assert tr.mean == te.mean and tr.std == te.std
    # independent draws: no test image equals a train image
    flat_tr = {bytes(im.numpy().tobytes()) for im in tr.images}
    assert not any(bytes(im.numpy().tobytes()) in flat_tr for im in te.images)
    again = load_dataset("synthetic", "train", seed=5, synthetic_size=100)
    assert torch.equal(tr.images, again.images)
    assert not torch.equal(tr.images, load_dataset("synthetic", "train", seed=6, synthetic_size=100).images)


def test_synthetic_test_size_sets_the_test_split_only() -> None:
    """data.synthetic_test_size: N test images (0 = synthetic_size // 5); the train split and the first test images stay."""
    te20 = load_dataset("synthetic", "test", seed=5, synthetic_size=100)
    te = load_dataset("synthetic", "test", seed=5, synthetic_size=100, synthetic_test_size=70)
    tr = load_dataset("synthetic", "train", seed=5, synthetic_size=100, synthetic_test_size=70)
    assert len(te) == 70 and len(tr) == 100
    assert torch.equal(tr.images, load_dataset("synthetic", "train", seed=5, synthetic_size=100).images)
    assert len(load_dataset("synthetic", "test", seed=5, synthetic_size=100, synthetic_test_size=0)) == 20
    with pytest.raises(DataError, match="data.synthetic_test_size"):
        load_dataset("synthetic", "test", seed=5, synthetic_size=100, synthetic_test_size=-1)
    from mona_sfl.config import schema_config
    from mona_sfl.errors import ConfigError

    with pytest.raises(ConfigError, match="data.synthetic_test_size"):
        schema_config(["data.synthetic_test_size=-3"])
    assert te20.images.shape[1:] == te.images.shape[1:]


# --------------------------------------------------------------------------------------------
# ImageData and load_dataset argument checks


def test_imagedata_subset_and_validation(small: ImageData) -> None:
    s = small.subset(np.array([3, 1, 3]))
    assert torch.equal(s.images, small.images[[3, 1, 3]]) and s.labels.tolist() == small.labels[[3, 1, 3]].tolist()
    assert s.classes == small.classes and s.mean == small.mean
    mask = np.zeros(len(small), dtype=bool)
    mask[:5] = True
    assert len(small.subset(mask)) == 5 and len(small.subset(slice(2, 6))) == 4
    assert len(small.subset(torch.tensor([0, 1]))) == 2
    with pytest.raises(DataError, match="uint8"):
        ImageData(small.images.float(), small.labels, small.classes, MEAN, STD)
    with pytest.raises(DataError, match="int64"):
        ImageData(small.images, small.labels.int(), small.classes, MEAN, STD)
    with pytest.raises(DataError, match="labels must lie"):
        ImageData(small.images, small.labels, ["a"], MEAN, STD)
    with pytest.raises(DataError, match="positive"):
        ImageData(small.images, small.labels, small.classes, MEAN, (0.0, 1.0, 1.0))


def test_load_dataset_argument_errors(tmp_path: Path) -> None:
    assert DATASETS == ("synthetic", "cifar10", "cifar100", "svhn", "stl10", "imagefolder")
    with pytest.raises(DataError, match="data.name"):
        load_dataset("mnist", "train")
    with pytest.raises(DataError, match="split"):
        load_dataset("synthetic", "val")
    with pytest.raises(DataError, match="data.dir"):
        load_dataset("cifar10", "train")
    with pytest.raises(DataError, match="data.image_size"):
        load_dataset("synthetic", "train", image_size=0)


def test_channel_stats_exact() -> None:
    im = torch.tensor([0, 255, 0, 255], dtype=torch.uint8).view(1, 1, 2, 2).expand(1, 3, 2, 2).contiguous()
    im[:, 2] = 51
    mean, std = channel_stats(im)
    assert mean == (0.5, 0.5, 0.2) and std == (0.5, 0.5, 1e-6)


# --------------------------------------------------------------------------------------------
# torchvision datasets


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "stl10"])
def test_torchvision_missing_dir_without_download(tmp_path: Path, name: str) -> None:
    missing = tmp_path / "nothing_here"
    with pytest.raises(DataError, match="data.download=true") as exc:
        load_dataset(name, "train", root=str(missing))
    assert str(missing) in str(exc.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="missing or empty"):
        load_dataset(name, "test", root=str(tmp_path / "empty"))


def test_torchvision_unreadable_dir(tmp_path: Path) -> None:
    (tmp_path / "junk.txt").write_text("not cifar")
    with pytest.raises(DataError, match="data.download=true"):
        load_dataset("cifar10", "train", root=str(tmp_path))


def _fake_cifar(root: Path, name: str, n: int) -> np.ndarray:
    """Write a tiny CIFAR-format folder (python pickles); returns the NHWC images."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
    if name == "cifar10":
        base, label_key, meta, meta_key = "cifar-10-batches-py", "labels", "batches.meta", "label_names"
        files, names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"], 10
    else:
        base, label_key, meta, meta_key = "cifar-100-python", "fine_labels", "meta", "fine_label_names"
        files, names = ["train"], 100
    d = root / base
    d.mkdir(parents=True)
    labels = (np.arange(n) % names).tolist()
    per = -(-n // len(files))
    test_file = "test_batch" if name == "cifar10" else "test"
    for k, f in enumerate(files + [test_file]):
        lo = 0 if f == test_file else k * per
        hi = n if f == test_file else min(n, (k + 1) * per)
        with open(d / f, "wb") as fh:
            pickle.dump({"data": data[lo:hi], label_key: labels[lo:hi]}, fh)
    with open(d / meta, "wb") as fh:
        pickle.dump({meta_key: [f"class{k}" for k in range(names)]}, fh)
    return data.reshape(n, 3, 32, 32)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_torchvision_cifar_from_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    import torchvision.datasets.cifar as tvc

    # The fake files cannot match the md5 sums of the real release.
    monkeypatch.setattr(tvc.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tvc, "check_integrity", lambda *a, **k: True)
    arr = _fake_cifar(tmp_path, name, 20)
    tr = load_dataset(name, "train", root=str(tmp_path))
    te = load_dataset(name, "test", root=str(tmp_path))
    assert tr.images.shape == (20, 3, 32, 32) and tr.images.dtype == torch.uint8 and len(te) == 20
    assert torch.equal(tr.images, torch.from_numpy(arr))
    assert tr.labels.tolist() == [k % (10 if name == "cifar10" else 100) for k in range(20)]
    assert tr.classes[:2] == ["class0", "class1"]
    assert (tr.mean, tr.std) == STATS[name]
    resized = load_dataset(name, "train", root=str(tmp_path), image_size=16)
    assert resized.images.shape == (20, 3, 16, 16)


def test_torchvision_stl10_from_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.stl10 as tvs

    monkeypatch.setattr(tvs.STL10, "_check_integrity", lambda self: True)  # md5 sums of the real files
    d = tmp_path / "stl10_binary"
    d.mkdir()
    hwc = np.random.default_rng(0).integers(0, 256, (6, 96, 96, 3), dtype=np.uint8)
    hwc[:, :, :48] = 0  # left half black: checks the column-major file layout survives
    for split in ("train", "test"):
        hwc.transpose(0, 3, 2, 1).tofile(d / f"{split}_X.bin")  # STL-10 stores C, W, H
        np.array([1, 2, 3, 4, 5, 10], dtype=np.uint8).tofile(d / f"{split}_y.bin")  # 1-based
    (d / "class_names.txt").write_text("\n".join(f"c{k}" for k in range(10)))
    native = load_dataset("stl10", "train", root=str(tmp_path), image_size=96)
    assert torch.equal(native.images, torch.from_numpy(hwc).permute(0, 3, 1, 2))
    assert native.labels.tolist() == [0, 1, 2, 3, 4, 9] and native.classes[9] == "c9"
    small = load_dataset("stl10", "test", root=str(tmp_path))  # default image_size=32: antialiased resize
    assert small.images.shape == (6, 3, 32, 32) and (small.mean, small.std) == STATS["stl10"]
    assert int(small.images[:, :, :, :15].max()) == 0 and int(small.images[:, :, :, 17:].min()) > 0


@pytest.mark.skipif(
    not os.environ.get("MONA_SFL_CIFAR10_DIR"),
    reason="set MONA_SFL_CIFAR10_DIR to a CIFAR-10 ImageFolder (train/, test/)",
)
def test_real_cifar10_imagefolder_test_split() -> None:
    d = load_dataset("imagefolder", "test", root=os.environ["MONA_SFL_CIFAR10_DIR"])
    assert d.images.shape == (10000, 3, 32, 32)
    assert d.classes[0] == "airplane" and d.classes[-1] == "truck"
    assert torch.bincount(d.labels).tolist() == [1000] * 10
    assert all(abs(m - r) < 0.01 for m, r in zip(d.mean, STATS["cifar10"][0]))


# --------------------------------------------------------------------------------------------
# image folders


def _write_folder(root: Path, classes: dict[str, int], size: int = 32, ext: str = ".png", seed: int = 0) -> dict:
    """Random RGB images as root/<class>/<k><ext>; returns {path: uint8 CHW array}."""
    rng = np.random.default_rng(seed)
    out = {}
    for c, count in classes.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            p = root / c / f"{k:03d}{ext}"
            Image.fromarray(arr).save(p, quality=95) if ext == ".jpg" else Image.fromarray(arr).save(p)
            out[p] = arr.transpose(2, 0, 1)
    return out


def test_imagefolder_split_folder_form(tmp_path: Path) -> None:
    written = _write_folder(tmp_path / "train", {"zebra": 3, "ant": 2})
    (tmp_path / "train" / "ant" / "notes.txt").write_text("ignored")
    d = load_dataset("imagefolder", "train", root=str(tmp_path / "train"))
    assert d.classes == ["ant", "zebra"] and d.labels.tolist() == [0, 0, 1, 1, 1]
    expected = [written[p] for p in sorted(written, key=lambda p: (p.parent.name, p.name))]
    assert np.array_equal(d.images.numpy(), np.stack(expected))  # PNG decode is exact
    mean, std = channel_stats(d.images)
    assert (d.mean, d.std) == (mean, std)
    # any split name reads the same folder in this form
    assert torch.equal(load_dataset("imagefolder", "test", root=str(tmp_path / "train")).images, d.images)


def test_imagefolder_parent_form_jpeg_resize_gray(tmp_path: Path) -> None:
    _write_folder(tmp_path / "train", {"a": 2, "b": 2}, ext=".jpg")
    _write_folder(tmp_path / "test", {"a": 1, "b": 1}, size=48, ext=".jpg")
    Image.fromarray(np.full((32, 32), 200, dtype=np.uint8), mode="L").save(tmp_path / "test" / "b" / "gray.png")
    tr = load_dataset("imagefolder", "train", root=str(tmp_path))
    te = load_dataset("imagefolder", "test", root=str(tmp_path))
    assert tr.images.shape == (4, 3, 32, 32) and te.images.shape == (3, 3, 32, 32)
    assert te.labels.tolist() == [0, 1, 1] and te.classes == ["a", "b"]
    assert torch.equal(te.images[2], torch.full((3, 32, 32), 200, dtype=torch.uint8))  # b/000.jpg, b/gray.png
    assert load_dataset("imagefolder", "train", root=str(tmp_path), image_size=16).images.shape == (4, 3, 16, 16)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a directory"):
        load_dataset("imagefolder", "train", root=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        load_dataset("imagefolder", "train", root=str(tmp_path / "empty"))
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no image files.*cat"):
        load_dataset("imagefolder", "train", root=str(tmp_path / "noimg"))
    _write_folder(tmp_path / "split" / "train", {"a": 1})
    with pytest.raises(DataError, match="no test/ folder"):
        load_dataset("imagefolder", "test", root=str(tmp_path / "split"))


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp"])
def test_imagefolder_corrupt_file_named(tmp_path: Path, ext: str) -> None:
    _write_folder(tmp_path, {"a": 2, "b": 1})
    bad = tmp_path / "b" / f"broken{ext}"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not an image")
    with pytest.raises(DataError, match="broken") as exc:
        load_dataset("imagefolder", "train", root=str(tmp_path))
    assert str(bad) in str(exc.value)


# --------------------------------------------------------------------------------------------
# views


def test_normalize_exact() -> None:
    im = torch.tensor([0, 51, 102, 255], dtype=torch.uint8).view(1, 1, 2, 2).repeat(1, 3, 1, 1)
    out = normalize(im, (0.2, 0.4, 0.0), (0.2, 0.2, 1.0))
    assert out.dtype == torch.float32 and out.shape == (1, 3, 2, 2)
    assert torch.allclose(out[0, 0].flatten(), torch.tensor([-1.0, 0.0, 1.0, 4.0]), atol=1e-6)
    assert torch.allclose(out[0, 1].flatten(), torch.tensor([-2.0, -1.0, 0.0, 3.0]), atol=1e-6)
    assert torch.allclose(out[0, 2].flatten(), torch.tensor([0.0, 0.2, 0.4, 1.0]), atol=1e-6)
    with pytest.raises(DataError, match="uint8"):
        normalize(im.float(), MEAN, STD)


def test_views_shape_determinism_global_rng(small: ImageData) -> None:
    tv = TwoViews(MEAN, STD)
    torch.manual_seed(123)
    np.random.seed(123)
    state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    v1, v2 = tv(small.images[:16], seed=7)
    assert torch.equal(torch.get_rng_state(), state) and np.array_equal(np.random.get_state()[1], np_state)
    assert v1.shape == v2.shape == (16, 3, 32, 32) and v1.dtype == v2.dtype == torch.float32
    w1, w2 = tv(small.images[:16], seed=7)
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    u1, _ = tv(small.images[:16], seed=8)
    assert not torch.equal(v1, u1)
    assert all(not torch.equal(v1[i], v2[i]) for i in range(16))  # the two views differ
    assert torch.isfinite(v1).all()
    assert float(v1.min()) >= (0 - 0.5) / 0.25 - 1e-5 and float(v1.max()) <= (1 - 0.5) / 0.25 + 1e-5
    assert TwoViews(MEAN, STD, size=24)(small.images[:4], seed=0)[0].shape == (4, 3, 24, 24)


def test_views_match_torchvision_per_sample(small: ImageData) -> None:
    """Replaying the sampled parameters with torchvision's functional ops gives the same views."""
    tv = TwoViews(small.mean, small.std)
    x = small.images[:48]
    out = tv.augment(x, seed=5)
    p = tv.sample_params(48, 32, 32, seed=5)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    factors = [p.brightness, p.contrast, p.saturation, p.hue]
    assert bool(p.jitter_on.any() and p.gray_on.any() and p.blur_on.any() and p.flip_on.any())
    for i in range(48):
        y = TF.resized_crop(x[i].float() / 255, int(p.top[i]), int(p.left[i]), int(p.height[i]), int(p.width[i]),
                            [32, 32], antialias=True)  # fmt: skip
        if p.jitter_on[i]:
            for op in p.order[i].tolist():
                y = fns[op](y, float(factors[op][i]))
        if p.gray_on[i]:
            y = TF.rgb_to_grayscale(y, num_output_channels=3)
        if p.blur_on[i]:
            y = TF.gaussian_blur(y, [13, 13], [float(p.sigma[i])] * 2)
        if p.flip_on[i]:
            y = TF.horizontal_flip(y)
        y = TF.normalize(y, list(small.mean), list(small.std))
        assert torch.allclose(out[i], y, atol=1e-4), i


@pytest.mark.parametrize("src, out", [(96, 32), (32, 32), (40, 24)])
def test_crop_resize_matches_torchvision(src: int, out: int) -> None:
    """The batched crop+resize equals torchvision resized_crop(antialias=True), up- and downscaling."""
    from mona_sfl.data.views import _resize_weights

    x = make_synthetic(16, seed=2, image_size=src).images.float() / 255
    p = TwoViews(MEAN, STD, size=out).sample_params(16, src, src, seed=1)
    ry, rx = _resize_weights(p.top, p.height, src, out), _resize_weights(p.left, p.width, src, out)
    mine = ry.unsqueeze(1) @ x @ rx.unsqueeze(1).transpose(-1, -2)
    for i in range(16):
        ref = TF.resized_crop(x[i], int(p.top[i]), int(p.left[i]), int(p.height[i]), int(p.width[i]), [out, out],
                              antialias=True)  # fmt: skip
        assert torch.allclose(mine[i], ref, atol=1e-5)


def test_view_parameter_distribution() -> None:
    tv = TwoViews(MEAN, STD)
    p = tv.sample_params(20000, 32, 32, seed=0)
    rates = [float(t.float().mean()) for t in (p.jitter_on, p.gray_on, p.blur_on, p.flip_on)]
    assert all(abs(r - e) < 0.015 for r, e in zip(rates, [0.8, 0.2, 0.5, 0.5])), rates
    area = (p.height * p.width).float() / 1024
    assert float(area.min()) >= 0.05 and float(area.max()) <= 1.0 and 0.45 < float(area.mean()) < 0.6
    assert 0.6 <= float(p.brightness.min()) and float(p.brightness.max()) <= 1.4
    assert -0.1 <= float(p.hue.min()) and float(p.hue.max()) <= 0.1 and 0.1 <= float(p.sigma.min())
    assert float(p.sigma.max()) <= 2.0
    assert all(sorted(r) == [0, 1, 2, 3] for r in p.order[:50].tolist())
    assert (p.top + p.height <= 32).all() and (p.left + p.width <= 32).all() and (p.top >= 0).all()
    # options
    assert not TwoViews(MEAN, STD, blur=False).sample_params(100, 32, 32, 0).blur_on.any()
    q = TwoViews(MEAN, STD, crop_scale=(0.5, 0.5)).sample_params(2000, 32, 32, 0)
    assert abs(float((q.height * q.width).float().mean()) / 1024 - 0.5) < 0.02
    with pytest.raises(DataError, match="crop scale"):
        TwoViews(MEAN, STD, crop_scale=(0.0, 1.0))
    with pytest.raises(DataError, match="std"):
        TwoViews(MEAN, (1.0, 0.0, 1.0))


def test_augment_many_equals_one_call_per_batch(small: ImageData) -> None:
    """Augmenting many batches in one pass gives each batch exactly (bitwise) its own views,
    whatever the batch sizes, the number of copies and the options."""
    for tv in (TwoViews(small.mean, small.std), TwoViews(MEAN, STD, blur=False, crop_scale=(0.3, 0.9), size=24)):
        sizes = [1, 3, 1, 2, 5, 1, 1, 4] * 4  # 32 batches: every op meets rows of many batches
        starts = np.cumsum([0, *sizes])
        imgs = [small.images[starts[k] % 60 : starts[k] % 60 + n] for k, n in enumerate(sizes)]
        seeds = [7919 * k + 3 for k in range(len(sizes))]
        for copies in (1, 2, 3):
            many = tv.augment_many(imgs, seeds, copies=copies)
            assert len(many) == len(imgs)
            for x, sd, got in zip(imgs, seeds, many):
                assert torch.equal(got, tv.augment(x, sd, copies=copies))
        pair = tv.augment_many(imgs[:3], seeds[:3])[1]
        assert all(torch.equal(u, v) for u, v in zip((pair[:3], pair[3:]), tv(imgs[1], seeds[1])))
    assert TwoViews(MEAN, STD).augment_many([], []) == []
    with pytest.raises(DataError, match="2 image batches but 1 seeds"):
        TwoViews(MEAN, STD).augment_many([small.images[:1], small.images[1:2]], [0])
    with pytest.raises(DataError, match="one size"):
        TwoViews(MEAN, STD).augment_many([small.images[:1], small.images[:1, :, :16, :16]], [0, 1])
    with pytest.raises(DataError, match="uint8"):
        TwoViews(MEAN, STD).augment_many([small.images[:1].float()], [0])


# --------------------------------------------------------------------------------------------
# client streams


def _stream(data: ImageData, idx: np.ndarray, bs: int = 4, seed: int = 0, client: int = 0) -> ClientStream:
    return ClientStream(data, idx, bs, seed=seed, client_id=client, views=TwoViews(MEAN, STD))


def test_stream_passes_and_batch_sizes(small: ImageData) -> None:
    idx = np.arange(10, 20)
    s = _stream(small, idx, bs=4)
    assert s.batches_per_pass == 3 and len(s) == 10
    for p in range(3):
        batches = [s.batch_indices(p * 3 + j) for j in range(3)]
        assert [b.size for b in batches] == [4, 4, 2]
        assert sorted(np.concatenate(batches).tolist()) == list(range(10, 20))  # each index once per pass
    assert not np.array_equal(np.concatenate([s.batch_indices(j) for j in range(3)]),
                              np.concatenate([s.batch_indices(3 + j) for j in range(3)]))  # fmt: skip
    expected = idx[np.random.default_rng([0, 0, 1]).permutation(10)][4:8]
    assert np.array_equal(s.batch_indices(4), expected)  # pass 1, batch 1
    q, k = s.batch(2)
    assert q.shape == k.shape == (2, 3, 32, 32)


def test_stream_pure_and_resumable(small: ImageData) -> None:
    a, b = _stream(small, np.arange(30)), _stream(small, np.arange(30))
    first = [a.next() for _ in range(5)]
    assert a.draws == 5
    again = [b.batch(d) for d in range(5)]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(first, again))
    assert b.draws == 0
    assert torch.equal(b.batch(3)[0], b.batch(3)[0])
    state = a.state_dict()
    assert state == {"draws": 5, "seed": 0, "client_id": 0, "num_indices": 30, "batch_size": 4}
    c = _stream(small, np.arange(30))
    c.load_state_dict(state)
    n1, n2 = a.next(), c.next()
    assert torch.equal(n1[0], n2[0]) and torch.equal(n1[1], n2[1]) and a.draws == c.draws == 6
    other = _stream(small, np.arange(30), client=1)
    assert not np.array_equal(other.batch_indices(0), a.batch_indices(0))
    with pytest.raises(DataError, match="client_id"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="draws"):
        c.load_state_dict({"draws": -1})


def test_batches_equal_per_stream_batches(small: ImageData) -> None:
    """``batches`` returns each stream's ``batch(d)`` bitwise, augmenting the streams that share
    one TwoViews together, and leaves every stream's draw counter alone."""
    shared = TwoViews(MEAN, STD)
    streams: list[object] = [
        ClientStream(small, np.arange(c * 10, c * 10 + 7), 3, seed=5, client_id=c, views=shared) for c in range(5)
    ]
    streams.append(ClientStream(small, np.arange(50, 60), 2, seed=5, client_id=5, views=TwoViews(MEAN, STD, blur=False)))

    class Plain:  # any object with batch(d), as the host's tests use
        draws = 0

        def batch(self, d: int) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.full((1, 3, 2, 2), float(d)), torch.zeros(1, 3, 2, 2)

    streams.insert(2, Plain())
    draws = [0, 2, 9, 1, 7, 4, 3]  # draw 2 of a 7-image stream at batch 3 holds 1 image
    calls = []
    orig = TwoViews.augment_many
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TwoViews, "augment_many", lambda self, imgs, seeds, copies=2: calls.append(len(imgs)) or orig(self, imgs, seeds, copies))
        got = batches(streams, draws)
    assert sorted(calls) == [1, 5]  # one pass for the five streams sharing a TwoViews, one for the other
    for s, d, (x1, x2) in zip(streams, draws, got):
        e1, e2 = s.batch(d)  # type: ignore[attr-defined]
        assert torch.equal(x1, e1) and torch.equal(x2, e2)
        assert s.draws == 0  # type: ignore[attr-defined]
    assert got[1][0].shape[0] == 1 and got[0][0].shape[0] == 3
    assert batches([], []) == []
    with pytest.raises(DataError, match="2 streams but 1 draw"):
        batches(streams[:2], [0])


def test_stream_errors(small: ImageData) -> None:
    with pytest.raises(DataError, match="batch_size"):
        _stream(small, np.arange(4), bs=0)
    with pytest.raises(DataError, match="indices"):
        _stream(small, np.array([0, 64]))
    with pytest.raises(DataError, match="indices"):
        _stream(small, np.array([], dtype=np.int64))
    with pytest.raises(DataError, match="draw index"):
        _stream(small, np.arange(4)).batch(-1)



def test_data_seed_fixes_the_data_across_run_seeds() -> None:
    """``data.seed`` keeps the synthetic images, the data.proportion subset and the kNN bank
    the same whatever the run's seed; -1 (the schema's default) lets them follow the seed."""
    from mona_sfl import build
    from mona_sfl.config import ConfigError, schema_config
    from mona_sfl.eval.monitor import eval_sets

    def data(*sets: str) -> tuple[ImageData, ImageData, ImageData]:
        cfg = schema_config(["data.synthetic_size=60", "data.proportion=0.5", "data.bank_size=10", *sets])
        train, test = build.load_data(cfg, "train"), build.load_data(cfg, "test")
        return (train, test, eval_sets(cfg, train, test)[0])

    def same(a: tuple, b: tuple) -> list[bool]:
        return [torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels) for x, y in zip(a, b)]

    fixed = [data(f"seed={s}", "data.seed=3") for s in (0, 1)]
    assert same(*fixed) == [True, True, True]
    assert same(fixed[0], data("seed=3")) == [True, True, True]  # data.seed=3 is the data of run seed 3
    assert same(data("seed=0"), data("seed=1")) == [False, False, False]
    assert same(data("seed=2"), data("seed=2", "data.seed=-1")) == [True, True, True]
    assert schema_config([]).data.seed == -1
    with pytest.raises(ConfigError, match=r"data.seed must be -1 \(the run's seed\) or in \[0, 2\^63\), got -2"):
        schema_config(["data.seed=-2"])
