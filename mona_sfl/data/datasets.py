"""Datasets as in-memory uint8 tensors, decoded once at load.

``load_dataset(name, split, ...)`` returns an :class:`ImageData`: all images of the split as
one ``uint8`` tensor ``(N, 3, H, W)`` plus ``int64`` labels, class names and the per-channel
mean/std to normalise with. Augmentation then runs on batches of these tensors
(:mod:`mona_sfl.data.views`), so no per-item decoding happens during training.

Sources (``DATASETS``):

- ``synthetic``: :func:`mona_sfl.data.synthetic.make_synthetic`. ``train`` has
  ``synthetic_size`` images, ``test`` has ``synthetic_test_size`` (0: ``synthetic_size // 5``); the two splits use
  different seeds derived from ``seed`` (``SeedSequence([seed, 0 or 1])``), so they are
  independent draws. No files, no ``root``.
- ``cifar10``, ``cifar100``, ``svhn``, ``stl10``: ``torchvision.datasets`` with
  ``root=root`` and ``download=download``. STL-10 uses its labelled ``train`` (5,000) and
  ``test`` (8,000) splits; SVHN needs ``scipy``. Images whose native size differs from
  ``image_size`` are resized with antialiasing: STL-10 is 96 px natively, so the default
  ``image_size=32`` downscales it; pass ``image_size=96`` to keep it. Mean/std are the
  fixed constants in ``STATS`` (the reference's for CIFAR).
- ``imagefolder``: ``root`` is either the split folder itself (``root/<class>/*.jpg``) or a
  folder holding ``train/`` and ``test/`` split folders (``root/<split>/<class>/*.jpg``);
  the second form is used whenever ``root/train`` or ``root/test`` exists. Labels follow
  the sorted class-folder names (as ``torchvision.datasets.ImageFolder``). Images that are
  not ``image_size`` square are resized (shorter side, antialiased) and centre-cropped;
  grayscale/RGBA files become RGB. Mean/std are computed from the loaded split itself (so
  a test split gets its own; normalise both splits with the train split's values).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mona_sfl.data import DATASETS, MIN_SYNTHETIC_SIZE
from mona_sfl.data.images import DataError, ImageData

SPLITS: tuple[str, ...] = ("train", "test")

#: Normalisation constants used by the reference code (CIFAR) and common values (SVHN, STL-10).
STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
}

#: File endings read by the ``imagefolder`` source (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


#: PIL's decompression-bomb limit (``data.max_image_pixels``): the most pixels one image file may hold.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

#: Threads decoding image files (file reads overlap; decoding itself mostly holds the GIL).
DECODE_THREADS = 2
#: A decoding thread reports its progress every this many images.
PROGRESS_CHUNK = 256


# --------------------------------------------------------------------------------------------
# Entry point


def load_dataset(
    name: str,
    split: str,
    *,
    root: str | None = None,
    download: bool = False,
    seed: int = 0,
    synthetic_size: int = 5000,
    synthetic_test_size: int = 0,
    num_classes: int = 10,
    image_size: int = 32,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    progress: bool = False,
) -> ImageData:
    """Load split ``split`` ('train' or 'test') of dataset ``name`` (one of ``DATASETS``).

    ``seed``, ``synthetic_size`` and ``num_classes`` only matter for ``synthetic``;
    ``root``/``download`` only for the file-backed sources; ``progress`` shows the decoding of
    an image folder. See the module docstring.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; set data.name to one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise DataError(f"data.image_size must be a positive integer, got {image_size!r}")

    return DATASETS.get(name)(
        name, split, root=root, download=bool(download), seed=int(seed), synthetic_size=synthetic_size,
        synthetic_test_size=synthetic_test_size,
        num_classes=num_classes, image_size=int(image_size), max_image_pixels=int(max_image_pixels),
        progress=bool(progress),
    )


def load_synthetic(
    name: str, split: str, *, seed: int, synthetic_size: int, num_classes: int, image_size: int, synthetic_test_size: int = 0, **_: Any
) -> ImageData:
    """``synthetic``: the built-in shape set, train and test from independent seeds."""
    from mona_sfl.data.synthetic import make_synthetic

    if not isinstance(synthetic_size, (int, np.integer)) or synthetic_size < MIN_SYNTHETIC_SIZE:
        raise DataError(
            f"data.synthetic_size must be an integer >= {MIN_SYNTHETIC_SIZE} (the test split has synthetic_size // 5 images), "
            f"got {synthetic_size!r}"
        )
    split_seed = int(np.random.SeedSequence([int(seed), SPLITS.index(split)]).generate_state(1)[0])
    if not isinstance(synthetic_test_size, (int, np.integer)) or synthetic_test_size < 0:
        raise DataError(f"data.synthetic_test_size must be an integer >= 0 (0 = synthetic_size // 5), got {synthetic_test_size!r}")
    if split == "train":
        n = int(synthetic_size)
    else:
        n = int(synthetic_test_size) or int(synthetic_size) // 5
    return make_synthetic(n, seed=split_seed, num_classes=num_classes, image_size=int(image_size))


def _files_root(name: str, root: str | None) -> Path:
    if root is None or str(root) == "":
        raise DataError(f"dataset {name!r} reads files: set data.dir to its directory")
    return Path(root)


def load_imagefolder(
    name: str, split: str, *, root: str | None, image_size: int, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    progress: bool = False, **_: Any,
) -> ImageData:
    """``imagefolder``: class folders of image files (see the module docstring)."""
    return _load_imagefolder(_files_root(name, root), split, int(image_size), int(max_image_pixels), progress=progress)


def load_torchvision(name: str, split: str, *, root: str | None, download: bool, image_size: int, **_: Any) -> ImageData:
    """CIFAR-10/100, SVHN, STL-10 through ``torchvision.datasets``."""
    return _load_torchvision(name, _files_root(name, root), split, bool(download), int(image_size))


# --------------------------------------------------------------------------------------------
# torchvision datasets


def _load_torchvision(name: str, root: Path, split: str, download: bool, image_size: int) -> ImageData:
    """CIFAR-10/100, SVHN, STL-10 through ``torchvision.datasets`` (arrays, no per-item PIL)."""
    import torchvision.datasets as tvd

    if not download and (not root.is_dir() or not any(root.iterdir())):
        raise DataError(
            f"{name}: data directory {str(root)!r} is missing or empty; set data.download=true to fetch "
            f"{name} into it, or point data.dir at a directory that already holds the torchvision files"
        )
    try:
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            ds = cls(str(root), train=split == "train", download=download)
            arr = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)  # NHWC -> NCHW
            labels, classes = ds.targets, list(ds.classes)
        elif name == "svhn":
            ds = tvd.SVHN(str(root), split=split, download=download)
            arr, labels = torch.from_numpy(np.ascontiguousarray(ds.data)), ds.labels
            classes = [str(k) for k in range(10)]
        else:  # stl10: labelled splits only
            ds = tvd.STL10(str(root), split=split, download=download)
            arr, labels = torch.from_numpy(np.ascontiguousarray(ds.data)), ds.labels
            classes = list(getattr(ds, "classes", [str(k) for k in range(10)]))
    except ImportError as exc:
        raise DataError(
            f"{name} needs an extra package to read its files ({exc}); install it (e.g. pip install scipy)"
        ) from exc
    except (RuntimeError, OSError) as exc:
        fix = (
            "the download failed: check the network, or put the torchvision files there by hand"
            if download
            else "set data.download=true to fetch it, or point data.dir at the directory holding the torchvision files"
        )
        raise DataError(f"{name}: could not read the {split} split from {str(root)!r} ({exc}); {fix}") from exc
    images = _resize_square(arr.contiguous(), image_size)
    mean, std = STATS[name]
    return ImageData(images, torch.as_tensor(np.asarray(labels), dtype=torch.int64), classes, mean, std)


# --------------------------------------------------------------------------------------------
# Image folders


def _split_dir(root: Path, split: str) -> Path:
    """Resolve ``root`` (split folder, or parent of ``train/``/``test/``) to the split folder."""
    if not root.is_dir():
        raise DataError(
            f"imagefolder: data.dir {str(root)!r} is not a directory; point it at a folder of class "
            f"subfolders (root/<class>/<image>) or at a folder with train/ and test/ split folders"
        )
    if (root / "train").is_dir() or (root / "test").is_dir():
        if not (root / split).is_dir():
            raise DataError(f"imagefolder: {str(root)!r} has split folders but no {split}/ folder; add {root / split}")
        if (root / "train").is_dir() and (root / "test").is_dir():
            train, test = set(_class_names(root / "train")), set(_class_names(root / "test"))
            if train != test:
                only_train = ", ".join(sorted(train - test)) or "-"
                only_test = ", ".join(sorted(test - train)) or "-"
                raise DataError(
                    f"imagefolder: train/ and test/ in {str(root)!r} have different class folders (only in train/: "
                    f"{only_train}; only in test/: {only_test}), so their labels would not match; give both splits "
                    f"the same class folders"
                )
        return root / split
    return root


def _class_names(folder: Path) -> list[str]:
    """Sorted names of the class subfolders (hidden folders are ignored)."""
    try:
        return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError as exc:
        raise DataError(f"imagefolder: cannot list folder {str(folder)!r} ({exc.strerror or exc}); fix its permissions") from None


def _walk_class(top: Path, tree: Path) -> list[Path]:
    """Image files below the class folder ``top`` (which may itself be a link). No symbolic link
    below it is followed: a link to a folder or file points either out of the image tree or back
    into it (where its images would count twice, or loop), so it is an error naming it; so is
    every entry that cannot be read."""
    found: list[Path] = []

    def failed(exc: OSError) -> None:
        raise DataError(
            f"imagefolder: cannot read folder {str(exc.filename or top)!r} ({exc.strerror or exc}); fix its permissions "
            f"or remove it"
        )

    def link_error(p: Path) -> DataError:
        target = os.path.realpath(p)
        inside = target == str(tree) or target.startswith(str(tree) + os.sep)
        where = "back into the image tree (its images would be counted twice, or loop)" if inside else "out of the image tree"
        return DataError(
            f"imagefolder: {str(p)!r} is a symbolic link pointing {where} ({target}); links inside class folders are not "
            f"followed: replace it with the file or folder itself"
        )

    for d, dirs, names in os.walk(top, onerror=failed, followlinks=False):
        for sub in dirs:
            if os.path.islink(os.path.join(d, sub)):
                raise link_error(Path(d, sub))
        for f in names:
            if os.path.splitext(f)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            p = Path(d, f)
            if p.is_symlink() and p.exists():  # a broken link is reported when it is read
                raise link_error(p)
            if not p.is_symlink() and not p.is_file():  # a FIFO would block the read for ever
                raise DataError(f"imagefolder: {str(p)!r} is not a regular file (a pipe, socket or device): remove it")
            found.append(p)
    return sorted(found)


def _list_images(folder: Path) -> tuple[list[str], list[Path], list[int]]:
    """Class names (sorted subfolders) and every image file with its label."""
    classes = _class_names(folder)
    if not classes:
        raise DataError(
            f"imagefolder: {str(folder)!r} has no class subfolders; the layout must be "
            f"<root>/<class>/<image> (or <root>/<split>/<class>/<image>)"
        )
    files: list[Path] = []
    labels: list[int] = []
    empty: list[str] = []
    tree = os.path.realpath(folder)
    real: dict[str, str] = {}
    for c in classes:  # class folders may be links, but to distinct folders, none inside another
        r = os.path.realpath(folder / c)
        for other, ro in real.items():
            if r == ro or r.startswith(ro + os.sep) or ro.startswith(r + os.sep):
                raise DataError(
                    f"imagefolder: class folders {str(folder / other)!r} and {str(folder / c)!r} are the same folder or one "
                    f"holds the other (through a symbolic link), so images would be counted twice with different labels"
                )
        real[c] = r
    for k, c in enumerate(classes):
        found = _walk_class(folder / c, Path(tree))
        if not found:
            empty.append(c)
        files += found
        labels += [k] * len(found)
    if empty:
        raise DataError(
            f"imagefolder: no image files ({', '.join(IMAGE_EXTENSIONS)}) in class folder(s) "
            f"{', '.join(repr(str(folder / c)) for c in empty)}; add images or remove the folder"
        )
    return classes, files, labels


def _pil_rgb(im: Any) -> np.ndarray:
    """uint8 RGB pixels of a PIL image of any mode: 16- and 32-bit integer images are scaled
    from their full range (PIL's own convert would clip them to 255), float images are taken
    as 0..1 (TIFF float convention) and clipped."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.float64)
        a = np.rint(np.clip(a, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    if mode == "F":
        a = np.rint(np.clip(np.nan_to_num(np.asarray(im, dtype=np.float64)), 0.0, 1.0) * 255.0).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA").convert("RGB")  # alpha dropped, colours kept
    return np.asarray(im.convert("RGB"))


def _to_uint8(img: torch.Tensor) -> torch.Tensor:
    """A decoded image tensor in uint8: 16-bit values scaled from 0..65535 (rounded), not truncated."""
    if img.dtype == torch.uint8:
        return img
    if img.dtype == torch.uint16:
        return ((img.to(torch.int64) * 255 + 32767) // 65535).to(torch.uint8)
    raise DataError(f"unsupported decoded image type {img.dtype}")


def _decode_pil(path: Path, data: bytes) -> torch.Tensor:
    """PIL fallback (BMP, TIFF, 16-bit, ...); DataError naming the file if it cannot be decoded."""
    from io import BytesIO

    from PIL import Image

    try:
        with Image.open(BytesIO(data)) as im:
            return torch.from_numpy(np.array(_pil_rgb(im))).permute(2, 0, 1)  # a writable copy
    except Exception as exc:  # PIL raises many types for broken files
        raise DataError(f"imagefolder: cannot decode image file {str(path)!r} ({exc}); delete or replace it") from exc


def max_file_bytes(max_pixels: int) -> int:
    """The largest image file read: 8 bytes per pixel (16-bit RGBA, uncompressed) of ``max_pixels``
    pixels, plus 16 MiB of metadata. A larger file is refused before it is read into memory."""
    return 8 * int(max_pixels) + (16 << 20)


def _read_image_file(path: Path, max_pixels: int) -> bytes:
    """The bytes of one image file, DataError (before reading) when it is larger than any image of
    ``max_pixels`` pixels can be; at most that many bytes are read even if the file grows meanwhile."""
    limit = max_file_bytes(max_pixels)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        size = max(size, len(data))
        raise DataError(
            f"imagefolder: image file {str(path)!r} is too large ({size:,} bytes; data.max_image_pixels={max_pixels} allows "
            f"files of at most {limit:,} bytes): shrink or delete it, or raise data.max_image_pixels if you trust it"
        )
    return data


def _check_pixels(path: Path, data: bytes, max_pixels: int) -> None:
    """DataError before decoding an image of more than ``max_pixels`` pixels (a decompression bomb)."""
    from io import BytesIO

    from PIL import Image

    try:
        with Image.open(BytesIO(data)) as im:  # reads the header only
            w, h = im.size
    except Image.DecompressionBombError:
        w = h = None
    except Exception as exc:
        raise DataError(f"imagefolder: cannot decode image file {str(path)!r} ({exc}); delete or replace it") from exc
    if w is None or w * h > max_pixels:
        size = "" if w is None else f"{w}x{h} = {w * h} pixels, "
        raise DataError(
            f"imagefolder: image file {str(path)!r} is too large ({size}limit data.max_image_pixels={max_pixels}); it may "
            f"be a decompression bomb: shrink or delete it, or raise data.max_image_pixels if you trust it"
        )


def _load_imagefolder(
    root: Path, split: str, image_size: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, *, progress: bool = False
) -> ImageData:
    """Decode every image of the split once, straight into one tensor, on a small thread pool
    (``progress``: a bar or periodic lines counting the decoded images)."""
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image

    from mona_sfl.progress import Meter

    # PIL's own bomb check (it raises at twice its limit) must not be below ours
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels

    folder = _split_dir(root, split)
    classes, files, labels = _list_images(folder)
    images = torch.empty(len(files), 3, image_size, image_size, dtype=torch.uint8)
    fast = (".jpg", ".jpeg", ".png")  # libjpeg-turbo / libpng through torchvision
    rgb = ImageReadMode.RGB

    def work(rows: range) -> None:
        for k in rows:
            path = files[k]
            try:
                data = _read_image_file(path, max_pixels)
            except OSError as exc:  # a broken link, no permission, a vanished file
                raise DataError(
                    f"imagefolder: cannot read image file {str(path)!r} ({exc.strerror or exc}); "
                    f"fix or delete it (or the broken link)"
                ) from None
            _check_pixels(path, data, max_pixels)
            img = None
            if path.suffix.lower() in fast:
                try:
                    img = _to_uint8(decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=rgb))
                except (RuntimeError, ValueError, DataError):
                    pass  # PIL gets a go, and reports the error if it fails too
            if img is None:
                img = _decode_pil(path, data)
            if img.shape[-2:] != images.shape[-2:]:
                img = _resize_square(img.unsqueeze(0), image_size)[0]
            images[k] = img
            if (k // workers + 1) % PROGRESS_CHUNK == 0:
                meter.advance(PROGRESS_CHUNK)

    workers = max(1, min(DECODE_THREADS, os.cpu_count() or 1, len(files)))
    with Meter(len(files), f"decoding {split} images", unit="images", enabled=progress) as meter:
        with ThreadPoolExecutor(workers) as ex:
            list(ex.map(work, [range(i, len(files), workers) for i in range(workers)]))  # list(): re-raise errors
        meter.update(len(files))
    mean, std = channel_stats(images)
    return ImageData(images, torch.tensor(labels, dtype=torch.int64), classes, mean, std)


# --------------------------------------------------------------------------------------------
# Helpers


def _resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N,3,H,W) -> (N,3,size,size): resize the shorter side (antialiased), centre-crop."""
    if images.shape[-2:] == (size, size):
        return images
    from torchvision.transforms.v2 import functional as TF

    out = []
    for chunk in images.split(1024):
        out.append(TF.center_crop(TF.resize(chunk, size, antialias=True), [size, size]))
    return torch.cat(out)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std of uint8 images (N,3,H,W), as fractions of 255 (exact, via histograms)."""
    if len(images) == 0:
        raise DataError("cannot compute mean/std of an empty image set")
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(3):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        count = hist.sum()
        mean = (hist * values).sum() / count
        var = (hist * (values - mean) ** 2).sum() / count
        means.append(round(float(mean) / 255.0, 6))
        stds.append(max(round(float(var.sqrt()) / 255.0, 6), 1e-6))
    return tuple(means), tuple(stds)  # type: ignore[return-value]
