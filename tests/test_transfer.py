"""mona-sfl transfer: singular-value fine-tuning trains only the top singular values and the
head (U, V and everything else bit-identical), parameter counts, the labelled draw, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import tiny_overrides
from mona_sfl import build
from mona_sfl.cli import main
from mona_sfl.config import ConfigError, schema_config
from mona_sfl.engine import Trainer
from mona_sfl.eval.transfer import Backbone, SingularValues, adapt, fit, labelled_subset, make_svf, new_head

TINY = tiny_overrides("data.image_size=16")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread: None) -> None:
    return None


@pytest.fixture(scope="module")
def data():
    cfg = schema_config(TINY)
    train = build.load_data(cfg, "train")
    return cfg, train.subset(labelled_subset(train.labels, per_class=4)), build.load_data(cfg, "test")


def backbone(cfg) -> Backbone:
    front, server = build.build_models(cfg)
    return Backbone(front, server)


def test_svf_trains_only_the_top_singular_values_and_the_head(data) -> None:
    cfg, train, _ = data
    model = backbone(cfg)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x = build_x(train)
    with torch.no_grad():
        model.eval()
        out0 = model(x)
    svs = make_svf(model, 0.2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), out0, rtol=0, atol=1e-4)  # the SVD re-expresses the same weights
    frozen = {n: b.detach().clone() for n, b in model.named_buffers()}
    head = new_head(out0.shape[1], len(train.classes), 0, torch.device("cpu"))
    head_before = head.weight.detach().clone()
    tops_before = [sv.top.detach().clone() for sv in svs]
    grads: dict[str, bool] = {}
    fit(model, head, [sv.top for sv in svs], train, lr_backbone=0.1, lr_head=0.1, epochs=2, batch_size=8, seed=0, train_mode=False, device=torch.device("cpu"))
    # which tensors got a gradient in the last step
    for name, p in list(model.named_parameters()) + [("head." + n, p) for n, p in head.named_parameters()]:
        grads[name] = p.grad is not None
    trained = {n for n, g in grads.items() if g}
    assert trained == {n for n in grads if n.endswith(".top") or n.startswith("head.")}
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.endswith(".top"))
    # U, V, the other singular values and every stored weight, bias and norm parameter: bit-identical
    for n, b in model.named_buffers():
        assert torch.equal(b, frozen[n]), n
    originals = {n.replace(".parametrizations.weight.original", ".weight"): p for n, p in model.named_parameters() if n.endswith(".original")}
    assert len(originals) == len(svs)
    for n, p in model.named_parameters():
        key = n.replace(".parametrizations.weight.original", ".weight")
        if not n.endswith(".top"):
            assert torch.equal(p, before[key]), n
    assert all(not torch.equal(sv.top, t) for sv, t in zip(svs, tops_before))  # every layer's top values moved
    assert not torch.equal(head.weight, head_before)
    # each parametrization holds the SVD of its weight: sizes max(1, floor(0.2 * rank))
    assert [sv.top.numel() for sv in svs] == [max(1, math.floor(0.2 * r)) for r in matrix_ranks(cfg)]
    assert all(isinstance(sv, SingularValues) for sv in svs)


def build_x(train) -> torch.Tensor:
    from mona_sfl.data.views import normalize

    return normalize(train.images[:4], train.mean, train.std)


def matrix_ranks(cfg) -> list[int]:
    """Ranks of the backbone's conv weights, read off the modules independently of the SVF code."""
    model = backbone(cfg)
    return [min(m.weight.shape[0], m.weight[0].numel()) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("share", [0.1, 0.2, 0.4])
def test_svf_parameter_count_matches_the_formula(data, share: float) -> None:
    cfg, train, test = data
    row, model, head = adapt(lambda: backbone(cfg), "svf", train, test, share=share, epochs=1, batch_size=16)
    ranks = matrix_ranks(cfg)
    dim, classes = head.in_features, len(train.classes)
    want = sum(max(1, math.floor(share * r)) for r in ranks) + dim * classes + classes
    assert row.trainable == want
    assert row.backbone_params == sum(p.numel() for p in backbone(cfg).parameters())
    assert row.method == "svf" and row.share == share and 0 <= row.top1 <= 100


def test_linear_and_full_counts(data) -> None:
    cfg, train, test = data
    lin, model, head = adapt(lambda: backbone(cfg), "linear", train, test, epochs=1, batch_size=16)
    full, _, _ = adapt(lambda: backbone(cfg), "full", train, test, epochs=1, batch_size=16)
    h = head.in_features * len(train.classes) + len(train.classes)
    assert lin.trainable == h
    assert full.trainable == full.backbone_params + h
    # the linear probe leaves the backbone untouched
    ref = backbone(cfg).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_labelled_subset_is_stratified_and_seeded() -> None:
    labels = torch.tensor([0] * 10 + [1] * 6 + [2] * 2)
    idx = labelled_subset(labels, per_class=3, seed=1)
    assert [int((labels[idx] == c).sum()) for c in range(3)] == [3, 3, 2]
    assert list(idx) == sorted(idx) and list(idx) == list(labelled_subset(labels, per_class=3, seed=1))
    frac = labelled_subset(labels, fraction=0.5)
    assert [int((labels[frac] == c).sum()) for c in range(3)] == [5, 3, 1]
    with pytest.raises(ConfigError):
        labelled_subset(labels)
    with pytest.raises(ConfigError):
        labelled_subset(labels, per_class=2, fraction=0.1)


def test_cli_transfer_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    Trainer(schema_config(TINY + ["train.epochs=1"]), run, progress=False).run()
    code = main(["transfer", str(run), "--labels-per-class", "3", "--epochs", "1", "--shares", "0.1,0.4", "--batch-size", "16"])
    assert code == 0
    out = capsys.readouterr().out
    rows = json.loads((run / "transfer.json").read_text())["rows"]
    assert [(r["method"], r["share"]) for r in rows] == [("linear", None), ("svf", 0.1), ("svf", 0.4), ("full", None)]
    assert rows[0]["trainable"] < rows[1]["trainable"] < rows[2]["trainable"] < rows[3]["trainable"]
    for r in rows:
        assert f"{r['trainable']:,}" in out
    meta = json.loads((run / "transfer.json").read_text())
    assert meta["labelled"] == 3 * meta["classes"]
    # another target set through data.* keys; other keys are refused
    assert main(["transfer", str(run), "--set", "data.num_classes=4", "--labels-per-class", "2", "--epochs", "1", "--methods", "linear"]) == 0
    assert json.loads((run / "transfer.json").read_text())["classes"] == 4
    assert main(["transfer", str(run), "--set", "model.cut=3"]) == 2
    assert main(["transfer", str(run), "--shares", "1.5"]) == 2
    from mona_sfl.checkpoint import lock_run_dir

    with lock_run_dir(run, "a training"):  # another writer holds the run folder
        assert main(["transfer", str(run), "--labels-per-class", "2", "--epochs", "1", "--methods", "linear"]) == 2
    assert main(["transfer", str(tmp_path / "missing")]) == 2
