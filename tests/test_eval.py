"""Tests for mona_sfl.eval: feature extraction, weighted kNN, linear probe."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mona_sfl.eval.linear as linear_mod
from mona_sfl.eval import (
    ProbeResult,
    cosine_lr,
    extract_features,
    knn_accuracy,
    knn_predict,
    linear_probe,
)
from mona_sfl.eval.linear import _standardize

SQ3 = math.sqrt(3.0)


# ---------------------------------------------------------------- kNN


def _vote_bank() -> tuple[torch.Tensor, torch.Tensor]:
    """Bank around query (2, 0): cosine sims 1 (label 1), 0.5, 0.5 (label 0),
    0 and -1 (label 1). Norms differ on purpose (normalisation is internal)."""
    bank = torch.tensor(
        [[5.0, 0.0], [1.0, SQ3], [1.0, -SQ3], [0.0, 3.0], [-2.0, 0.0]],
        dtype=torch.float64,
    )
    labels = torch.tensor([1, 0, 0, 1, 1])
    return bank, labels


QUERY = torch.tensor([[2.0, 0.0]], dtype=torch.float64)


def _reference_knn(query, bank, labels, num_classes, k, t):
    """Literal per-query loop of score_c = sum_topk exp(sim/t) 1[label=c]."""
    q = F.normalize(query.double(), dim=1)
    b = F.normalize(bank.double(), dim=1)
    out = []
    for row in q:
        sim = b @ row
        order = sorted(range(len(sim)), key=lambda i: -float(sim[i]))[: min(k, len(sim))]
        scores = [0.0] * num_classes
        for i in order:
            scores[int(labels[i])] += math.exp(float(sim[i]) / t)
        out.append(max(range(num_classes), key=lambda c: (scores[c], -c)))
    return torch.tensor(out, dtype=torch.long)


def test_knn_weighting_overrides_majority() -> None:
    bank, labels = _vote_bank()
    # k=3 neighbours: one of label 1 at sim 1, two of label 0 at sim 0.5.
    # label 1 wins iff 1 > 2 exp(-0.5 / t), i.e. t < 0.5 / ln 2 = 0.7213.
    assert knn_predict(QUERY, bank, labels, 2, k=3, t=0.1).tolist() == [1]
    assert knn_predict(QUERY, bank, labels, 2, k=3, t=0.7).tolist() == [1]
    assert knn_predict(QUERY, bank, labels, 2, k=3, t=0.75).tolist() == [0]
    assert knn_predict(QUERY, bank, labels, 2, k=3, t=1e6).tolist() == [0]  # ~majority
    assert knn_predict(QUERY, bank, labels, 2, k=1, t=10.0).tolist() == [1]
    # k=5, t=10: label 1 = 1 + e^-0.1 + e^-0.2 = 2.72 > label 0 = 2 e^-0.05 = 1.90
    assert knn_predict(QUERY, bank, labels, 2, k=5, t=10.0).tolist() == [1]


def test_knn_k_larger_than_bank_is_clipped() -> None:
    bank, labels = _vote_bank()
    for t in (0.1, 10.0):
        full = knn_predict(QUERY, bank, labels, 2, k=5, t=t)
        assert torch.equal(knn_predict(QUERY, bank, labels, 2, k=200, t=t), full)
    assert knn_predict(QUERY, bank, labels, 2, k=200, t=10.0).tolist() == [1]


def test_knn_tie_goes_to_lowest_class() -> None:
    query = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[1.0, 1.0], [1.0, -1.0]])  # equal sims to the query
    assert knn_predict(query, bank, torch.tensor([2, 1]), 3, k=2).tolist() == [1]
    assert knn_predict(query, bank, torch.tensor([1, 2]), 3, k=2).tolist() == [1]
    assert knn_predict(query, bank, torch.tensor([2, 0]), 3, k=2).tolist() == [0]


def test_knn_small_t_does_not_overflow() -> None:
    bank, labels = _vote_bank()
    # exp(1 / 1e-3) overflows float32/64; the scores are shifted per query.
    pred = knn_predict(QUERY.float(), bank.float(), labels, 2, k=3, t=1e-3)
    assert pred.tolist() == [1]


def test_knn_matches_reference_and_chunking_is_invisible() -> None:
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(60, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (60,), generator=g)
    query = torch.randn(37, 6, generator=g, dtype=torch.float64)
    for k, t in ((7, 0.1), (15, 0.5), (200, 0.07)):
        ref = _reference_knn(query, bank, labels, 4, k, t)
        one = knn_predict(query, bank, labels, 4, k=k, t=t, chunk=1024)
        assert one.dtype == torch.long and one.shape == (37,)
        assert torch.equal(one, ref)
        for chunk in (1, 5, 36, 37):
            assert torch.equal(knn_predict(query, bank, labels, 4, k=k, t=t, chunk=chunk), one)


def test_knn_empty_query_and_int32_labels() -> None:
    bank, labels = _vote_bank()
    out = knn_predict(torch.zeros(0, 2), bank, labels.int(), 2, k=3)
    assert out.shape == (0,) and out.dtype == torch.long


def test_knn_accuracy_exact() -> None:
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    train_y = torch.tensor([0, 1, 2])
    test = torch.tensor([[2.0, 0.1], [0.1, 3.0], [-1.0, -0.2], [0.9, 0.1]])
    test_y = torch.tensor([0, 1, 2, 1])  # the last one is predicted 0
    acc = knn_accuracy(train, train_y, test, test_y, 3, k=1, t=0.1)
    assert isinstance(acc, float) and acc == 75.0
    assert knn_accuracy(train, train_y, test[:3], test_y[:3], 3, k=1) == 100.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "k must"),
        (dict(k=1.5), "k must"),
        (dict(t=0.0), "t must"),
        (dict(t=-1.0), "t must"),
        (dict(t=float("inf")), "t must"),
        (dict(chunk=0), "chunk must"),
    ],
)
def test_knn_bad_hyperparameters(kwargs, match) -> None:
    bank, labels = _vote_bank()
    with pytest.raises(ValueError, match=match):
        knn_predict(QUERY, bank, labels, 2, **kwargs)


def test_knn_bad_shapes_and_labels() -> None:
    bank, labels = _vote_bank()
    with pytest.raises(ValueError, match="feature dimension"):
        knn_predict(torch.zeros(1, 3), bank, labels, 2)
    with pytest.raises(ValueError, match=r"bank_labels must have shape \(5,\)"):
        knn_predict(QUERY, bank, labels[:4], 2)
    with pytest.raises(ValueError, match="query must have shape"):
        knn_predict(torch.zeros(2), bank, labels, 2)
    with pytest.raises(ValueError, match="integer"):
        knn_predict(QUERY, bank, labels.float(), 2)
    with pytest.raises(ValueError, match="must lie in"):
        knn_predict(QUERY, bank, labels, 1)
    with pytest.raises(ValueError, match="bank is empty"):
        knn_predict(QUERY, bank[:0], labels[:0], 2)
    with pytest.raises(ValueError, match="num_classes"):
        knn_predict(QUERY, bank, labels, 0)
    with pytest.raises(ValueError, match=r"test_labels must have shape \(2,\)"):
        knn_accuracy(bank, labels, bank[:2], labels[:3], 2)
    with pytest.raises(ValueError, match="empty"):
        knn_accuracy(bank, labels, bank[:0], labels[:0], 2)


# ------------------------------------------------------ extract_features

MEAN = (0.5, 0.2, 0.0)
STD = (0.25, 0.5, 1.0)


def _images(n: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, 2, 2), generator=g, dtype=torch.uint8)


def test_extract_features_exact_values() -> None:
    imgs = torch.zeros(1, 3, 1, 2, dtype=torch.uint8)
    imgs[0, 0, 0] = torch.tensor([255, 0])
    imgs[0, 1, 0] = torch.tensor([51, 255])
    imgs[0, 2, 0] = torch.tensor([0, 255])
    out = extract_features(lambda x: x.flatten(1), imgs, mean=MEAN, std=STD)
    # (255/255 - .5)/.25 = 2, (0 - .5)/.25 = -2, (51/255 - .2)/.5 = 0, (1 - .2)/.5 = 1.6
    expected = torch.tensor([[2.0, -2.0, 0.0, 1.6, 0.0, 1.0]])
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.equal(out, expected)


def test_extract_features_matches_direct_encoding_for_any_batch_size() -> None:
    imgs = _images(7)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    expected = ((imgs.float() / 255.0 - mean) / std).flatten(1)
    calls: list[int] = []

    def encode(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        assert x.dtype == torch.float32
        return x.flatten(1).double()  # dtype is cast back to float32

    for bs in (1, 3, 7, 100):
        calls.clear()
        out = extract_features(encode, imgs, mean=MEAN, std=STD, batch_size=bs)
        assert out.shape == (7, 12) and out.dtype == torch.float32
        assert torch.equal(out, expected)
        assert calls == [min(bs, 7 - s) for s in range(0, 7, bs)]


def test_extract_features_keeps_module_mode_and_no_grad() -> None:
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    net.train()
    out = extract_features(net, _images(5), mean=MEAN, std=STD, batch_size=2)
    assert net.training and not out.requires_grad and out.shape == (5, 4)
    net.eval()
    extract_features(net, _images(5), mean=MEAN, std=STD)
    assert not net.training


def test_extract_features_errors() -> None:
    imgs = _images(3)
    flat = lambda x: x.flatten(1)  # noqa: E731
    with pytest.raises(ValueError, match="uint8"):
        extract_features(flat, imgs.float(), mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        extract_features(flat, imgs[0], mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="empty"):
        extract_features(flat, imgs[:0], mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="one value per image channel"):
        extract_features(flat, imgs, mean=(0.5, 0.5), std=STD)
    with pytest.raises(ValueError, match="std must be > 0"):
        extract_features(flat, imgs, mean=MEAN, std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(flat, imgs, mean=MEAN, std=STD, batch_size=0)
    with pytest.raises(ValueError, match=r"shape \(B, D\)"):
        extract_features(lambda x: x, imgs, mean=MEAN, std=STD)


# ------------------------------------------------------------ linear probe


def _blobs(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well separated Gaussian blobs in 8-D with a large common offset."""
    g = torch.Generator().manual_seed(seed)
    centers = 4.0 * torch.eye(3, 8)
    y = torch.arange(3).repeat_interleave(n_per_class)
    x = centers[y] + 0.3 * torch.randn(len(y), 8, generator=g) + 100.0
    return x, y


def test_cosine_lr_values() -> None:
    assert cosine_lr(0, 100, 0.2) == 0.2
    assert cosine_lr(50, 100, 0.2) == pytest.approx(0.1, abs=1e-15)
    assert cosine_lr(100, 100, 0.2) == 0.0
    assert cosine_lr(25, 100, 1.0) == pytest.approx((1 + math.sqrt(0.5)) / 2, abs=1e-15)


def test_standardize_uses_train_statistics_only() -> None:
    train = torch.tensor([[1.0, 10.0], [3.0, 10.0]])
    test = torch.tensor([[5.0, 12.0], [100.0, -100.0]])
    tr, te = _standardize(train, test)
    # mean (2, 10), biased std (1, 0 -> 1): constant dimension is only centred
    assert torch.equal(tr, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    assert torch.equal(te, torch.tensor([[3.0, 2.0], [98.0, -110.0]]))


def test_linear_probe_separable_and_deterministic() -> None:
    xtr, ytr = _blobs(50, seed=0)
    xte, yte = _blobs(20, seed=1)
    kw = dict(epochs=15, lr=0.05, batch_size=32, seed=3)
    rng_before = torch.get_rng_state()
    res = linear_probe(xtr, ytr, xte, yte, 3, **kw)
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    assert isinstance(res, ProbeResult)
    assert res.top1 == 100.0 and res.train_top1 == 100.0 and res.epochs == 15
    assert math.isfinite(res.final_loss) and res.final_loss < 0.1
    torch.manual_seed(12345)  # a different global RNG state changes nothing
    again = linear_probe(xtr, ytr, xte, yte, 3, **kw)
    assert again == res  # bit-identical, final_loss included
    other = linear_probe(xtr, ytr, xte, yte, 3, **{**kw, "seed": 4})
    assert other.final_loss != res.final_loss


def test_linear_probe_schedule_is_one_cosine_over_all_steps(monkeypatch) -> None:
    xtr, ytr = _blobs(10, seed=0)  # N = 30, batch 8 -> 4 steps per epoch
    seen: list[tuple[int, int, float]] = []
    real = linear_mod.cosine_lr

    def spy(step: int, total: int, base: float) -> float:
        seen.append((step, total, base))
        return real(step, total, base)

    monkeypatch.setattr(linear_mod, "cosine_lr", spy)
    res = linear_probe(xtr, ytr, xtr, ytr, 3, epochs=3, lr=0.01, batch_size=8)
    assert res.epochs == 3
    assert seen == [(s, 12, 0.01) for s in range(12)]


def test_linear_probe_errors() -> None:
    x, y = _blobs(4, seed=0)
    with pytest.raises(ValueError, match="epochs"):
        linear_probe(x, y, x, y, 3, epochs=0)
    with pytest.raises(ValueError, match="batch_size"):
        linear_probe(x, y, x, y, 3, batch_size=0)
    with pytest.raises(ValueError, match="lr must"):
        linear_probe(x, y, x, y, 3, lr=0.0)
    with pytest.raises(ValueError, match="weight_decay"):
        linear_probe(x, y, x, y, 3, weight_decay=-1.0)
    with pytest.raises(ValueError, match="feature dimension"):
        linear_probe(x, y, x[:, :5], y, 3)
    with pytest.raises(ValueError, match=r"train_labels must have shape \(12,\)"):
        linear_probe(x, y[:5], x, y, 3)
    with pytest.raises(ValueError, match=r"test_labels must have shape \(12,\)"):
        linear_probe(x, y, x, y[:5], 3)
    with pytest.raises(ValueError, match="must lie in"):
        linear_probe(x, y, x, y, 2)
    with pytest.raises(ValueError, match="empty"):
        linear_probe(x[:0], y[:0], x, y, 3)


def test_stratified_subset_is_balanced_fixed_and_sorted() -> None:
    from mona_sfl.eval.knn import stratified_subset

    labels = torch.arange(10).repeat_interleave(100)  # class-sorted, as an image folder lists them
    idx = stratified_subset(labels, 205)
    counts = torch.bincount(labels[torch.as_tensor(idx)], minlength=10)
    assert len(idx) == 205 and len(set(idx.tolist())) == 205 and list(idx) == sorted(idx)
    assert int(counts.max()) - int(counts.min()) <= 1  # not the first two classes only
    assert (stratified_subset(labels, 205) == idx).all()
    assert (stratified_subset(labels, 5000) == torch.arange(1000).numpy()).all()
