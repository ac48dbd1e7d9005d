"""Model-inversion attack (MIA) on the smashed activations of a client front.

Threat model (algorithm.md section 5): an honest-but-curious server has white-box access to
a trained client front (the synced global online front, in eval mode) and a small auxiliary
set of training images. It pushes the auxiliary images through the front to get (activation,
image) pairs, trains a decoder ``G: activation -> image`` on them, and then reconstructs
held-out images from their activations alone.

Protocol as implemented here:

* **Auxiliary set**: a seeded random ``aux_fraction`` (default 1%) of the training set, no
  augmentation (:func:`aux_indices`). It is disjoint from the held-out images: those come
  from the test split; if the same :class:`ImageData` is passed as both sets, the held-out
  indices are excluded from the draw; and auxiliary images whose pixels equal a held-out
  image's (duplicates across splits) are dropped.
* **Held-out set**: ``num_test`` (default 128) test images drawn class by class
  (:func:`~mona_sfl.eval.knn.stratified_subset`, the draw of the kNN test set; fixed, the same
  for every run). Image folders list their images class by class, so the first 128 would all
  be one class.
* **Decoder** (:class:`Decoder`): ResBlock(C -> w), ``blocks`` x ResBlock(w -> w),
  ``log2(out / H)`` upsampling stages ``ConvTranspose(stride 2) + BN + ReLU`` (0 when the
  activation already has the image's resolution), ResBlock(w -> w), conv3x3(w -> 3),
  sigmoid: output in [0, 1] pixel space. Pre-activation ResBlocks with BatchNorm, plain
  convolutions (as the reference attacker). ``w = 64``, ``blocks = 4`` by default.
* **Training**: Adam (lr 1e-3), batch 32, 50 epochs, MSE between ``G(front(x))`` and the
  image in [0, 1]; the decoder after the last epoch is used (the reference instead keeps the
  checkpoint with the lowest loss on a single validation batch; there is no validation
  split here).
* **Metrics** over the held-out images, all in [0, 1] pixel space with ``data_range=1``:
  MSE (mean over pixels and images), PSNR (``torchmetrics`` ``peak_signal_noise_ratio``,
  per image, then averaged) and SSIM (``torchmetrics``
  ``structural_similarity_index_measure``: 11x11 Gaussian window, sigma 1.5, averaged over
  images). **No JPEG round trip**: the reference writes images as JPEG and compares against
  the decoded JPEGs; here originals are the exact uint8 pixels / 255. ``mse_mean_image`` is
  the MSE of a "no information" guess (the mean auxiliary image), for scale.
  Lower MSE and higher PSNR/SSIM mean the server recovers more: less privacy.

Files: :func:`attack_run` writes ``attack.json`` and ``attack.png`` (originals in the top
row, reconstructions below) into the run folder; with ``untrained=True`` (the baseline: the
front at its initial weights) ``attack_untrained.json`` / ``attack_untrained.png``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mona_sfl.checkpoint import atomic_write_bytes, atomic_write_text, load_run_config, load_weights, synced_front
from mona_sfl.config import Config, ConfigError, to_flat
from mona_sfl.data.images import ImageData
from mona_sfl.eval.front import encode_front
from mona_sfl.eval.knn import stratified_subset

#: How the held-out images are drawn (recorded in every result: a cached result without it
#: was measured on the first ``num_test`` test images and is not reused).
HELD_OUT_DRAW = "class-stratified"
ATTACK_JSON = "attack.json"
ATTACK_PNG = "attack.png"
BASELINE_JSON = "attack_untrained.json"
BASELINE_PNG = "attack_untrained.png"

# Precompute the auxiliary activations when they fit in this many bytes; else recompute per batch.
_CACHE_BYTES = 1 << 30


# --------------------------------------------------------------------------- decoder


class ResBlock(nn.Module):
    """Pre-activation residual block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut.

    The shortcut is the identity when the channel count is kept, else conv1x1 + BN.
    Shape: (N, c_in, H, W) -> (N, c_out, H, W).
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(c_in),
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        )
        self.shortcut: nn.Module = (
            nn.Identity() if c_in == c_out else nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + self.shortcut(x)


def upsampling_stages(in_size: tuple[int, int] | int, out_size: tuple[int, int] | int) -> int:
    """Number of stride-2 upsampling stages from an activation of ``in_size`` to ``out_size``.

    ``ceil(log2(out / in))`` over the larger of the two ratios, at least 0 (e.g. 32 -> 32: 0,
    16 -> 32: 1, 4 -> 32: 3). When ``in * 2**stages`` is not exactly ``out`` the decoder ends
    with a bilinear resize to ``out``.
    """
    ih, iw = (in_size, in_size) if isinstance(in_size, int) else in_size
    oh, ow = (out_size, out_size) if isinstance(out_size, int) else out_size
    if min(ih, iw, oh, ow) < 1:
        raise ValueError(f"sizes must be positive, got activation {in_size} and image {out_size}")
    ratio = max(oh / ih, ow / iw)
    return max(0, math.ceil(math.log2(ratio) - 1e-9)) if ratio > 1 else 0


class Decoder(nn.Module):
    """Inverts a client front: activation (N, C, h, w) -> image (N, 3, H, W) in [0, 1].

    Args:
        in_channels: C of the activation.
        in_size: (h, w) of the activation.
        out_size: (H, W) of the images.
        width: channels inside the decoder (64 in the reference attacker).
        blocks: ResBlocks at the activation's resolution after the input block (4 in the reference).
    """

    def __init__(
        self,
        in_channels: int,
        in_size: tuple[int, int] | int,
        out_size: tuple[int, int] | int = 32,
        *,
        width: int = 64,
        blocks: int = 4,
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        if in_channels < 1 or width < 1 or blocks < 0:
            raise ValueError(f"Decoder needs in_channels >= 1, width >= 1, blocks >= 0; got {in_channels}, {width}, {blocks}")
        self.in_size = (in_size, in_size) if isinstance(in_size, int) else tuple(in_size)
        self.out_size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
        self.stages = upsampling_stages(self.in_size, self.out_size)
        layers: list[nn.Module] = [ResBlock(in_channels, width), nn.ReLU(inplace=True)]
        for _ in range(blocks):
            layers += [ResBlock(width, width), nn.ReLU(inplace=True)]
        for _ in range(self.stages):
            layers += [
                nn.ConvTranspose2d(width, width, 3, stride=2, padding=1, output_padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
        layers += [ResBlock(width, width), nn.ReLU(inplace=True), nn.Conv2d(width, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)
        size = (self.in_size[0] * 2**self.stages, self.in_size[1] * 2**self.stages)
        self.resize = size != self.out_size

    def forward(self, a: Tensor) -> Tensor:
        x = self.net(a)
        if self.resize:
            x = F.interpolate(x, size=self.out_size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


# --------------------------------------------------------------------------- data


def _image_hashes(images: Tensor) -> list[bytes]:
    arr = images.contiguous().numpy()
    return [hashlib.blake2b(arr[i].tobytes(), digest_size=16).digest() for i in range(arr.shape[0])]


def aux_indices(
    train: ImageData,
    test: ImageData,
    *,
    aux_fraction: float = 0.01,
    num_test: int = 128,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The attacker's auxiliary training indices and the held-out test indices.

    Returns ``(aux, held_out, dropped)``: ``aux`` is a sorted seeded draw of
    ``max(1, round(aux_fraction * len(train)))`` train indices; ``held_out`` is the
    sorted class-by-class draw of ``min(num_test, len(test))`` test indices
    (:func:`~mona_sfl.eval.knn.stratified_subset`: every class in turn, not the first
    ``num_test``, which in an image folder are one class). If ``train is test`` the held-out indices are
    not drawn; auxiliary images equal pixel for pixel to a held-out image are dropped
    (``dropped`` counts them), so the two sets never share an image.
    """
    if not 0 < aux_fraction <= 1:
        raise ConfigError(f"aux_fraction must be in (0, 1], got {aux_fraction}")
    if num_test < 1:
        raise ConfigError(f"num_test must be >= 1, got {num_test}")
    if len(test) == 0 or len(train) == 0:
        raise ConfigError("the attack needs a non-empty training set and test set")
    held = np.asarray(stratified_subset(test.labels, min(int(num_test), len(test))), dtype=np.int64)
    candidates = np.arange(len(train), dtype=np.int64)
    if train is test:
        candidates = np.setdiff1d(candidates, held)
        if candidates.size == 0:
            raise ConfigError(f"no auxiliary images left: the {len(held)} held-out images are the whole set")
    n_aux = min(candidates.size, max(1, int(round(aux_fraction * len(train)))))
    rng = np.random.default_rng([int(seed), 0xA77A])
    aux = np.sort(rng.choice(candidates, size=n_aux, replace=False))
    held_hashes = set(_image_hashes(test.images[torch.as_tensor(held)]))
    keep = np.array([h not in held_hashes for h in _image_hashes(train.images[torch.as_tensor(aux)])], dtype=bool)
    dropped = int((~keep).sum())
    aux = aux[keep]
    if aux.size == 0:
        raise ConfigError("every auxiliary image is also a held-out test image: the attack has nothing to train on")
    return aux, held, dropped


#: Devices the attack runs on (``auto``: CUDA when present).
ATTACK_DEVICES = ("cpu", "cuda", "auto")


def check_attack_options(device: Any = "cpu", **kw: Any) -> None:
    """ConfigError for attack settings that cannot work, before any data is loaded or decoder trained."""
    if isinstance(device, str) and device not in ATTACK_DEVICES:
        raise ConfigError(f"attack device must be one of {', '.join(ATTACK_DEVICES)}, got {device!r}")
    for name, low in (("epochs", 1), ("batch_size", 1), ("num_test", 1), ("decoder_width", 1), ("seed", 0)):
        v = kw.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise ConfigError(f"attack {name.replace('_', '-')} must be an integer >= {low}, got {v!r}")
    if kw.get("seed") is not None and kw["seed"] >= 2**63:
        raise ConfigError(f"attack seed must be below 2**63, got {kw['seed']}")
    if kw.get("decoder_width") is not None and kw["decoder_width"] > 4096:
        raise ConfigError(f"attack decoder-width must be at most 4096, got {kw['decoder_width']}")
    frac = kw.get("aux_fraction")
    if frac is not None and not (isinstance(frac, (int, float)) and 0 < frac <= 1):
        raise ConfigError(f"attack aux-fraction must be in (0, 1], got {frac!r}")


def _pixels(images: Tensor) -> Tensor:
    return images.to(torch.float32) / 255.0


# --------------------------------------------------------------------------- result


@dataclass
class AttackResult:
    """Attack metrics (held-out images, [0, 1] pixel space) and how they were obtained."""

    mse: float
    psnr: float
    ssim: float
    aux_size: int
    num_test: int
    mse_mean_image: float = float("nan")  # MSE of guessing the mean auxiliary image (no information)
    epochs: int = 0
    batch_size: int = 0
    lr: float = 0.0
    seed: int = 0
    aux_fraction: float = 0.0
    decoder_width: int = 0
    decoder_blocks: int = 0
    upsampling_stages: int = 0
    activation_shape: list[int] = field(default_factory=list)
    image_size: list[int] = field(default_factory=list)
    aux_dropped_duplicates: int = 0
    final_train_loss: float = float("nan")
    train_s: float = 0.0
    jpeg: bool = False  # no JPEG round trip (the reference compares against JPEG-decoded images)
    held_out_draw: str = HELD_OUT_DRAW  # which test images are reconstructed (aux_indices)
    grid_path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # run folder, cut, method, checkpoint step, ...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"MSE {self.mse:.5f}  PSNR {self.psnr:.2f} dB  SSIM {self.ssim:.4f}  "
            f"(mean-image MSE {self.mse_mean_image:.5f}; decoder trained {self.epochs} epochs on {self.aux_size} "
            f"auxiliary images, evaluated on {self.num_test} held-out test images; no JPEG round trip)"
        )


def _ssim_kernel(h: int, w: int) -> int:
    k = min(11, h, w)
    return k if k % 2 == 1 else k - 1


def _metrics(rec: Tensor, orig: Tensor) -> tuple[float, float, float]:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    rec = rec.clamp(0, 1).double()
    orig = orig.double()
    mse = float(F.mse_loss(rec, orig))
    # Per-image PSNR, averaged; a perfect reconstruction (MSE 0) would give inf: clamp at 100 dB.
    per_mse = (rec - orig).pow(2).flatten(1).mean(1)
    if bool((per_mse > 0).all()):
        psnr = float(peak_signal_noise_ratio(rec, orig, data_range=1.0, dim=(1, 2, 3)))
    else:
        psnr = float((10 * torch.log10(1.0 / per_mse.clamp_min(1e-10))).mean())
    ks = _ssim_kernel(rec.shape[-2], rec.shape[-1])
    ssim = float(structural_similarity_index_measure(rec, orig, data_range=1.0, kernel_size=ks))
    return mse, psnr, ssim


def _save_grid(path: Path, orig: Tensor, rec: Tensor, n: int = 16) -> None:
    from torchvision.utils import save_image

    n = min(n, orig.shape[0])
    grid = torch.cat([orig[:n], rec[:n].clamp(0, 1)]).float()
    buf = io.BytesIO()
    save_image(grid, buf, nrow=n, padding=2, pad_value=1.0, format="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- the attack


def attack_front(
    front: nn.Module,
    train: ImageData,
    test: ImageData,
    *,
    aux_fraction: float = 0.01,
    num_test: int = 128,
    epochs: int = 50,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    grid_path: str | Path | None = None,
    decoder_width: int = 64,
    decoder_blocks: int = 4,
    grid_images: int = 16,
    progress: bool = False,
) -> AttackResult:
    """Train a decoder on auxiliary (activation, image) pairs and reconstruct held-out images.

    ``front`` is not modified (a copy is put in eval mode on ``device``). ``train`` supplies
    the auxiliary set and the normalisation constants the client uses; ``test`` the held-out
    images (see :func:`aux_indices`). Deterministic for a given ``seed`` on the CPU.
    ``progress`` shows the decoder epochs and their training MSE (:class:`mona_sfl.progress.Meter`).
    """
    import copy

    from mona_sfl.progress import Meter

    check_attack_options(decoder_width=decoder_width, seed=seed)
    if epochs < 1:
        raise ConfigError(f"attack epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ConfigError(f"attack batch size must be >= 1, got {batch_size}")
    if not lr > 0:
        raise ConfigError(f"attack lr must be > 0, got {lr}")
    dev = torch.device(device)
    aux, held, dropped = aux_indices(train, test, aux_fraction=aux_fraction, num_test=num_test, seed=seed)
    aux_images = train.images[torch.as_tensor(aux)]
    test_images = test.images[torch.as_tensor(held)]
    out_size = (int(test_images.shape[-2]), int(test_images.shape[-1]))
    if tuple(aux_images.shape[-2:]) != out_size:
        raise ConfigError(f"train images are {tuple(aux_images.shape[-2:])} but test images are {out_size}")

    front = copy.deepcopy(front).to(dev).eval()
    for p in front.parameters():
        p.requires_grad_(False)
    mean, std = train.mean, train.std
    t0 = time.perf_counter()
    test_act = encode_front(front, test_images, mean, std, dev)
    act_shape = tuple(int(d) for d in test_act.shape[1:])
    cache = len(aux) * math.prod(act_shape) * 4 <= _CACHE_BYTES
    aux_act = encode_front(front, aux_images, mean, std, dev) if cache else None
    aux_pix = _pixels(aux_images)
    test_pix = _pixels(test_images)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dec = Decoder(act_shape[0], act_shape[1:], out_size, width=decoder_width, blocks=decoder_blocks).to(dev)
    opt = torch.optim.Adam(dec.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(int(seed) + 1)
    n = len(aux)
    last = float("nan")
    dec.train()
    meter = Meter(epochs, "attack: decoder", unit="epochs", enabled=progress)
    for ep in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            a = aux_act[idx] if aux_act is not None else encode_front(front, aux_images[idx], mean, std, dev)
            y = aux_pix[idx].to(dev)
            loss = F.mse_loss(dec(a.to(dev)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
            count += idx.numel()
        last = total / max(count, 1)
        meter.update(ep + 1, train_mse=f"{last:.5f}")
    meter.close()

    dec.eval()
    with torch.no_grad():
        rec = torch.cat([dec(test_act[i : i + 256].to(dev)).float().cpu() for i in range(0, test_act.shape[0], 256)])
    mse, psnr, ssim = _metrics(rec, test_pix)
    mean_img = aux_pix.mean(0, keepdim=True).expand_as(test_pix)
    mse_mean = float(F.mse_loss(mean_img.double(), test_pix.double()))
    train_s = time.perf_counter() - t0
    gp = None
    if grid_path is not None:
        _save_grid(Path(grid_path), test_pix, rec, grid_images)
        gp = str(grid_path)
    return AttackResult(
        mse=mse,
        psnr=psnr,
        ssim=ssim,
        aux_size=int(n),
        num_test=int(len(held)),
        mse_mean_image=mse_mean,
        epochs=int(epochs),
        batch_size=int(batch_size),
        lr=float(lr),
        seed=int(seed),
        aux_fraction=float(aux_fraction),
        decoder_width=int(decoder_width),
        decoder_blocks=int(decoder_blocks),
        upsampling_stages=dec.stages,
        activation_shape=list(act_shape),
        image_size=list(out_size),
        aux_dropped_duplicates=dropped,
        final_train_loss=last,
        train_s=train_s,
        grid_path=gp,
    )


def _resolve_device(device: str | torch.device | None) -> torch.device:
    from mona_sfl.build import resolve_device

    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    return resolve_device(device)


def _config_meta(cfg: Config) -> dict[str, Any]:
    return {
        "arch": cfg.model.arch,
        "cut": cfg.model.cut,
        "width": cfg.model.width,
        "method": cfg.method,
        "dataset": cfg.data.name,
        "config_seed": cfg.seed,
    }


def _attack_cfg(
    cfg: Config, state: dict[str, Tensor] | None, out_json: Path, out_png: Path, device: Any, meta: dict[str, Any],
    progress: bool = False, **kw: Any,
) -> AttackResult:
    from mona_sfl import build

    front, _ = build.build_models(cfg)
    if state is not None:
        load_weights(front, state, "client front")
    device = cfg.device if device is None else device  # None: the config's device key (auto: CUDA when present)
    train = build.load_data(cfg, "train", progress=progress)
    test = build.load_data(cfg, "test", progress=progress)
    dev = _resolve_device(device)
    res = attack_front(front, train, test, device=dev, grid_path=out_png, progress=progress, **kw)
    res.meta = {**_config_meta(cfg), **meta, "device": dev.type}
    atomic_write_text(out_json, json.dumps(res.to_dict(), indent=2) + "\n")
    return res


def attack_run(run_dir: str | Path, *, untrained: bool = False, device: Any = None, **kw: Any) -> AttackResult:
    """Attack the front of a run folder: ``config.toml`` + the checkpoint's ``global_online``.

    ``untrained=True`` attacks the run's initial front instead (the baseline; no checkpoint
    needed). Writes ``attack.json`` + ``attack.png`` (``attack_untrained.*`` for the baseline)
    into the run folder. ``device`` None is the run config's ``device`` (auto: CUDA when present);
    ``progress`` shows decoding and decoder training; ``kw`` goes to :func:`attack_front`.
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    meta: dict[str, Any] = {"run_dir": str(run_dir), "untrained": bool(untrained)}
    state = None
    if not untrained:
        state, meta["checkpoint_step"] = synced_front(run_dir)
    names = (BASELINE_JSON, BASELINE_PNG) if untrained else (ATTACK_JSON, ATTACK_PNG)
    return _attack_cfg(cfg, state, run_dir / names[0], run_dir / names[1], device, meta, **kw)


def attack_config(cfg: Config, out_dir: str | Path, *, device: Any = None, **kw: Any) -> AttackResult:
    """Attack the untrained front of ``cfg`` (no run folder); writes ``attack.json``/``attack.png`` into ``out_dir``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"run_dir": None, "untrained": True, "config": to_flat(cfg)}
    return _attack_cfg(cfg, None, out / ATTACK_JSON, out / ATTACK_PNG, device, meta, **kw)


__all__ = [
    "ATTACK_JSON",
    "ATTACK_PNG",
    "BASELINE_JSON",
    "BASELINE_PNG",
    "AttackResult",
    "Decoder",
    "ResBlock",
    "attack_config",
    "attack_front",
    "attack_run",
    "aux_indices",
    "upsampling_stages",
]
