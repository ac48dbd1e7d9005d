"""Mini-interventions (fed.interventions): identity at init, only the slice changes, the L1
objective decreases, and the end-of-training personalisation report with exact resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from conftest import assert_same, crash_in_server_step, load_checkpoint, losses, step_records, tiny_overrides
from mona_sfl.config import ConfigError, schema_config
from mona_sfl.core.intervention import Intervention, fit_intervention
from mona_sfl.data.views import normalize
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
    with pytest.raises(ConfigError, match="intervention_every_sync=true needs fed.interventions=true"):
        schema_config(["fed.intervention_every_sync=true"])


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


def test_every_sync_with_a_single_sync_is_the_end_of_training_fit(tmp_path: Path) -> None:
    """One sync: fitting after it (seed + client + clients x 0, from the identity) is exactly the
    end-of-training fit, so the interventions and the personalised rows are the same."""
    one = ("train.epochs=1", "fed.sync_every=0")
    end = Trainer(schema_config(TINY + list(one)), tmp_path / "end", progress=False).run()
    cfg = schema_config(TINY + [*one, "fed.intervention_every_sync=true"])
    every = Trainer(cfg, tmp_path / "every", progress=False).run()
    assert every["personal"] == end["personal"] and every["syncs"] == 1
    a, b = load_checkpoint(tmp_path / "end"), load_checkpoint(tmp_path / "every")
    assert_same(a["interventions"], b["interventions"], "interventions")
    rec = [r for r in step_records(tmp_path / "every") if r.get("sync")]
    assert len(rec) == 1 and rec[0]["interv_l1_last"] == sum(r["l1_last"] for r in end["personal"]) / 2
    assert b["intervention_l1"] == {r["client"]: [r["l1_first"], r["l1_last"]] for r in end["personal"]}


def test_every_sync_warm_starts_leaves_training_alone_and_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one = ["train.server_threads=1"]  # the replay below runs on this module's one thread
    cfg = schema_config(TINY + [*one, "fed.intervention_every_sync=true"])
    seen: dict[int, dict] = {}

    def snapshot(t: Trainer) -> None:
        copy = lambda d: {c: {k: v.clone() for k, v in sd.items()} for c, sd in d.items()}  # noqa: E731
        seen[t.global_step] = {"iv": copy(t.interventions), "own": copy(t.premerge), "merged": {k: v.clone() for k, v in t.global_online.items()}, "syncs": t.syncs}

    t = Trainer(cfg, tmp_path / "full", progress=False)
    t.on_step = snapshot
    summary = t.run()
    # training does not see the interventions: the same losses and fronts as the end-of-training option
    Trainer(schema_config(TINY + one), tmp_path / "end", progress=False).run()
    assert losses(tmp_path / "full") == losses(tmp_path / "end")
    a, b = load_checkpoint(tmp_path / "end"), load_checkpoint(tmp_path / "full")
    for key in ("global_online", "global_momentum", "server", "premerge"):
        assert_same(a[key], b[key], key)
    syncs = [r for r in step_records(tmp_path / "full") if r.get("sync")]
    assert [r["step"] for r in syncs] == [2, 3, 5, 6] and all(r["interv_l1_first"] > 0 for r in syncs)
    # the last sync's fit, replayed: from the previous sync's interventions, seed + client + clients x 3
    last, before = seen[6], seen[5]
    assert last["syncs"] == 4
    front = t.monitor.front
    for c in (0, 1):
        merged, own = copy.deepcopy(front), copy.deepcopy(front)
        merged.load_state_dict(last["merged"])
        own.load_state_dict(last["own"][c])
        idx = torch.as_tensor(t.parts[c], dtype=torch.long)
        images = normalize(t.train_data.images[idx], t.train_data.mean, t.train_data.std)
        fit = fit_intervention(merged, own, images, rank=1, width=4, steps=5, lr=1e-3, batch_size=16, seed=cfg.seed + c + 2 * 3, init=before["iv"][c])
        assert_same({k: v.detach() for k, v in fit.intervention.state_dict().items()}, last["iv"][c], f"client {c}")
        assert not torch.equal(before["iv"][c]["w1"], last["iv"][c]["w1"])
    assert [[r["l1_first"], r["l1_last"]] for r in summary["personal"]] == [b["intervention_l1"][c] for c in (0, 1)]
    assert [r["client"] for r in summary["personal"]] == [0, 1]
    # kill and resume
    part = tmp_path / "part"
    with crash_in_server_step(monkeypatch, 6):
        Trainer(cfg, part, progress=False).run()
    resumed = Trainer.resume(part, progress=False).run(resumed=True)
    assert resumed["personal"] == summary["personal"] and losses(part) == losses(tmp_path / "full")
    c = load_checkpoint(part)
    for key in ("interventions", "intervention_l1", "premerge"):
        assert_same(b[key], c[key], key)
