"""Checks that the built-in synthetic dataset is a useful self-supervised benchmark.

Run: ``python bench/synthetic_check.py [--train 10000] [--seconds 60] [--grid /tmp/synthetic_grid.png]``

Prints:
  - generation time for the train split;
  - (a) kNN (k=20, cosine, majority vote) on raw normalised pixels -> expect low;
  - (b) a tiny CNN trained supervised for ~``--seconds`` -> expect high test accuracy
    (the classes are learnable from shape);
  - (c) kNN on global-pooled features of randomly initialised conv nets -> expect low
    (colour/position dominate untrained features), so SSL has something to add;
  - MoCo v2 augmentation throughput (TwoViews.augment, one view per image);
and writes a PNG grid with one row per class. On a busy machine, pass --threads 1.

Measured with ``--threads 1 --seconds 120`` on the 2-core dev box (quiet), palette colours
(the current generator), 10 classes, 10,000 train / 2,000 test, chance 10%:
(a) raw pixels 35.9%; (c) random-init torchvision resnet18 43.8%, CIFAR ResNet width 16
39.3%, small convnet (BatchNorm) 41.8% (means of 3 inits); (b) supervised small convnet
69.6% after 1 epoch, 95.2% after 4 epochs (120 s wall). The first generator (a unique RGB
pair per image) gave 24.6% / 30.1% / 21.9% / 21.5% here, but a short MoCo run could not beat
its colour shortcut (see ``mona_sfl/data/synthetic.py``).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from mona_sfl.data import load_dataset
from mona_sfl.data.views import TwoViews, normalize


def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, num_classes: int = 10) -> float:
    """Majority-vote kNN with cosine similarity; returns top-1 accuracy in %."""
    a = F.normalize(train_f.flatten(1).float(), dim=1)
    b = F.normalize(test_f.flatten(1).float(), dim=1)
    correct = 0
    for i in range(0, len(b), 1000):
        sim = b[i:i + 1000] @ a.T
        idx = sim.topk(k, dim=1).indices
        votes = F.one_hot(train_y[idx], num_classes).sum(1)
        correct += int((votes.argmax(1) == test_y[i:i + 1000]).sum())
    return 100.0 * correct / len(b)


@torch.no_grad()
def features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    net.eval()
    return torch.cat([net(x[i:i + 500]) for i in range(0, len(x), 500)])


def resnet18() -> nn.Module:
    """torchvision ResNet-18 (ImageNet stem), fc removed: 512-d pooled features."""
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    return net


def cifar_resnet(width: int = 16) -> nn.Module:
    """Small CIFAR-style ResNet (3x3 stem, stride 1; 3 stages x 2 BasicBlocks), pooled features."""
    from torchvision.models.resnet import BasicBlock

    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for k, stride in enumerate((1, 2, 2)):
        cout = width * 2**k
        down = None
        if stride != 1 or cin != cout:
            down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        layers += [BasicBlock(cin, cout, stride, down), BasicBlock(cout, cout)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def small_convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1, stride=2), nn.BatchNorm2d(128), nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )


def supervised(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor,
               num_classes: int, seconds: float, log: bool = False) -> tuple[float, int]:
    """Train small_convnet + linear head with Adam for ~``seconds``; test accuracy (%) and epochs."""
    torch.manual_seed(0)
    net = nn.Sequential(small_convnet(), nn.Linear(128, num_classes))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    start, epochs = time.time(), 0
    g = torch.Generator().manual_seed(0)
    while time.time() - start < seconds:
        net.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 128):
            j = perm[i:i + 128]
            x = xtr[j]
            flip = torch.rand(len(j), generator=g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            loss = F.cross_entropy(net(x), ytr[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
        epochs += 1
        if log:
            acc = 100.0 * float((features(net, xte).argmax(1) == yte).float().mean())
            print(f"    epoch {epochs}: {time.time() - start:.0f} s, test accuracy {acc:.1f}%", flush=True)
    logits = features(net, xte)
    return 100.0 * float((logits.argmax(1) == yte).float().mean()), epochs


def save_grid(images: torch.Tensor, labels: torch.Tensor, num_classes: int, path: str, per_row: int = 12) -> None:
    rows = [images[(labels == c).nonzero().flatten()[:per_row]] for c in range(num_classes)]
    grid = torchvision.utils.make_grid(torch.cat(rows).float() / 255, nrow=per_row, padding=2)
    grid = F.interpolate(grid[None], scale_factor=3, mode="nearest")[0]
    torchvision.utils.save_image(grid, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=10000, help="train split size (test = train // 5)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=60.0, help="supervised training budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", default="/tmp/synthetic_grid.png")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    t = time.perf_counter()
    train = load_dataset("synthetic", "train", seed=args.seed, synthetic_size=args.train, num_classes=args.classes)
    print(f"generated {len(train)} train images in {time.perf_counter() - t:.2f} s")
    test = load_dataset("synthetic", "test", seed=args.seed, synthetic_size=args.train, num_classes=args.classes)
    save_grid(train.images, train.labels, args.classes, args.grid)
    print(f"grid of examples -> {args.grid}")

    xtr, xte = normalize(train.images, train.mean, train.std), normalize(test.images, test.mean, test.std)
    ytr, yte = train.labels, test.labels
    chance = 100.0 / args.classes
    print(f"chance: {chance:.1f}%   (train {len(xtr)}, test {len(xte)})")
    print(f"(a) kNN k=20 cosine on raw normalised pixels: {knn_accuracy(xtr, ytr, xte, yte, 20, args.classes):.1f}%")
    for name, make in [("torchvision resnet18", resnet18),
                       ("CIFAR ResNet width 16", cifar_resnet),
                       ("small convnet (4 conv, BN)", small_convnet)]:
        accs = []
        for s in range(3):
            torch.manual_seed(s)
            net = make()
            accs.append(knn_accuracy(features(net, xtr), ytr, features(net, xte), yte, 20, args.classes))
        print(f"(c) kNN k=20 on random-init {name} pooled features: "
              f"{sum(accs) / len(accs):.1f}% (inits: {', '.join(f'{a:.1f}' for a in accs)})")
    cpu = time.process_time()
    acc, epochs = supervised(xtr, ytr, xte, yte, args.classes, args.seconds, log=True)
    print(f"(b) supervised small convnet, {args.seconds:.0f} s wall, {time.process_time() - cpu:.0f} s CPU "
          f"({epochs} epochs): test accuracy {acc:.1f}%")
    aug = TwoViews(train.mean, train.std)
    for b in (64, 256):
        x = train.images[:b]
        aug.augment(x, 0)
        t, reps = time.perf_counter(), 0
        while time.perf_counter() - t < 3.0:
            aug.augment(x, reps)
            reps += 1
        print(f"augmentation, batch {b}: {reps * b / (time.perf_counter() - t):.0f} images/s (single view, "
              f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
