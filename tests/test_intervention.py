"""Mini-interventions (fed.interventions): identity at init, only the slice changes, the L1
objective decreases, and the end-of-training personalisation report with exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import assert_same, crash_in_server_step, load_checkpoint, tiny_overrides
from mona_sfl.config import ConfigError, schema_config
from mona_sfl.core.intervention import Intervention, fit_intervention
from mona_sfl.engine import Trainer


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread: None) -> None:
    return None


def test_identity_initialised_intervention_leaves_the_output_bit_identical() -> None:
    a = torch.randn(3, 16, 5, 5, generator=torch.Generator().manual_seed(0))
    for width, start in ((0, 0), (4, 0), (6, 10)):
        iv = Intervention(16, rank=2, width=width, start=start, seed=3)
        out = iv(a)
        assert out.dtype == a.dtype and torch.equal(out, a)
    assert Intervention(16, rank=2, width=4).extra_params() == 2 * 2 * 4 + 2


def test_the_slice_form_touches_only_its_channels() -> None:
    a = torch.randn(2, 12, 4, 4, generator=torch.Generator().manual_seed(1))
    iv = Intervention(12, rank=1, width=5, start=3, seed=0)
    with torch.no_grad():
        iv.b.fill_(0.7)  # no longer the identity
        iv.w1.add_(0.3)
    out = iv(a)
    assert torch.equal(out[:, :3], a[:, :3]) and torch.equal(out[:, 8:], a[:, 8:])
    assert (out[:, 3:8] - a[:, 3:8]).abs().min() > 0  # every position of the slice moved
    # the formula, per position: h + W2^T (W1 h + b - W2 h)
    h = a[0, 3:8, 1, 2]
    want = h + iv.w2.t() @ (iv.w1 @ h + iv.b - iv.w2 @ h)
    torch.testing.assert_close(out[0, 3:8, 1, 2], want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        Intervention(12, width=10, start=3)


def test_l1_decreases_on_a_tiny_problem() -> None:
    g = torch.Generator().manual_seed(2)
    merged = torch.nn.Conv2d(3, 6, 3, padding=1)
    own = torch.nn.Conv2d(3, 6, 3, padding=1)
    with torch.no_grad():
        own.weight.copy_(merged.weight)
        own.bias.copy_(merged.bias)
        own.bias[:2] += 0.5  # the own front differs in the first channels
    x = torch.randn(64, 3, 8, 8, generator=g)
    w_before = merged.weight.detach().clone()
    fit = fit_intervention(merged, own, x, rank=2, width=4, steps=150, lr=1e-2, batch_size=16, seed=0)
    assert fit.losses[-1] < 0.5 * fit.losses[0]
    assert torch.equal(merged.weight, w_before)  # the fronts are not trained
    assert fit.intervention.width == 4
    # a width above the channel count means all of them
    assert fit_intervention(merged, own, x, width=64, steps=1).intervention.width == 6


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="intervention_rank"):
        schema_config(["fed.intervention_rank=0"])
    with pytest.raises(ConfigError, match="intervention_steps"):
        schema_config(["fed.intervention_steps=0"])


TINY = tiny_overrides("fed.interventions=true", "fed.intervention_steps=5", "fed.intervention_channels=4", "data.image_size=16", "train.checkpoint_every=2")


def test_personalisation_report_and_exact_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = schema_config(TINY)
    full = tmp_path / "full"
    summary = Trainer(cfg, full, progress=False).run()
    rows = summary["personal"]
    assert [r["client"] for r in rows] == [0, 1]
    for r in rows:
        assert r["extra_params"] == 2 * 1 * 4 + 1 and r["front_params"] > r["extra_params"]
        assert r["test_images"] > 0 and all(0 <= r[k] <= 100 for k in ("knn_merged", "knn_intervened", "knn_own"))
    assert set(load_checkpoint(full)["interventions"]) == {0, 1}
    part = tmp_path / "part"
    with crash_in_server_step(monkeypatch, 6):
        Trainer(cfg, part, progress=False).run()
    t = Trainer.resume(part, progress=False)
    resumed = t.run(resumed=True)
    assert resumed["personal"] == rows
    a, b = load_checkpoint(full), load_checkpoint(part)
    assert_same(a["interventions"], b["interventions"], "interventions")
    assert_same(a["premerge"], b["premerge"], "premerge")


def test_train_prints_the_personalised_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mona_sfl.cli.train import print_summary

    summary = {"num_classes": 10, "knn_top1": 12.5, "steps": 6, "images_per_s": 1.0, "wall_s": 2.0,
               "personal": [{"client": 3, "knn_merged": 10.0, "knn_intervened": 12.5, "knn_own": 20.0, "extra_params": 129, "front_params": 1416}]}
    print_summary(summary, tmp_path)
    assert "client 3: 10.00% / 12.50% / 20.00%; +129 parameters on a 1,416-parameter front" in capsys.readouterr().out
