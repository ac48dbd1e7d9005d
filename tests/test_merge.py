"""AXIS (fed.aggregation=axis): exact properties of the merge, the sync with base fronts, and
end-to-end runs (records, FedAvg parity when everything is kept, exact resume)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_same, crash_in_server_step, load_checkpoint, losses, step_records, tiny_overrides
from mona_sfl.config import ConfigError, schema_config
from mona_sfl.core import AGGREGATIONS
from mona_sfl.core.merge import Axis, axis_matrix, axis_merge, is_matrix, layer_k
from mona_sfl.core.sync import GlobalFronts, Merge, fedavg, sync_fronts
from mona_sfl.engine import Trainer
from mona_sfl.models.split import build_split

StateDict = dict[str, torch.Tensor]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread: None) -> None:
    return None


def front_state(arch: str, cut: int, norm: str = "group", seed: int = 0) -> StateDict:
    torch.manual_seed(seed)
    front, _ = build_split(arch, cut, width=0.125, norm=norm, proj_hidden=8, proj_dim=8)
    return {k: v.detach().clone() for k, v in front.state_dict().items()}


def perturbed(base: StateDict, n: int, scale: float = 0.05, seed: int = 1) -> list[StateDict]:
    """n sources: base plus seeded noise on every float tensor (integer buffers copied)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        sd = {}
        for k, v in base.items():
            if v.is_floating_point():
                sd[k] = v + scale * (i + 1) * torch.randn(v.shape, generator=g)
            else:
                sd[k] = v + i  # e.g. BatchNorm's num_batches_tracked
        out.append(sd)
    return out


def rank_one_delta(base: StateDict, seed: int = 3) -> StateDict:
    """base plus a rank-one delta on every matrix (and noise on the rest)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in base.items():
        if is_matrix(v):
            u = torch.randn(v.shape[0], 1, generator=g)
            w = torch.randn(1, int(np.prod(v.shape[1:])), generator=g)
            sd[k] = v + (0.1 * u @ w).reshape(v.shape)
        elif v.is_floating_point():
            sd[k] = v + 0.1 * torch.randn(v.shape, generator=g)
        else:
            sd[k] = v.clone()
    return sd


def close(a: StateDict, b: StateDict, atol: float = 2e-6) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- exact properties
@pytest.mark.parametrize(
    "arch,cut,norm",
    [("resnet18", 1, "group"), ("resnet18", 2, "batch"), ("resnet18", 4, "group"), ("mobilenetv2", 2, "group"), ("mobilenetv2", 5, "batch")],
)
def test_keeping_every_component_is_fedavg(arch: str, cut: int, norm: str) -> None:
    base = front_state(arch, cut, norm)
    srcs = perturbed(base, 3)
    merged = axis_merge(srcs, base, keep=3.0)  # keep >= n: all n * rank triplets
    close(merged.state, fedavg(srcs))
    assert set(merged.layers) == {k for k, v in base.items() if is_matrix(v)}
    assert all(math.isclose(e, 1.0, rel_tol=0, abs_tol=1e-12) for e in merged.layers.values())
    assert merged.stats["kept_energy"] == pytest.approx(1.0, abs=1e-12) and merged.stats["merge_s"] >= 0
    # not the identity by accident: a real merge moves the weights off every source
    assert not torch.allclose(merged.state["0.0.weight"], srcs[0]["0.0.weight"])


def test_one_client_returns_that_client() -> None:
    base = front_state("resnet18", 3)
    src = perturbed(base, 1)
    close(axis_merge(src, base, keep=1.0).state, src[0])  # one source, K = rank: all of it
    low = rank_one_delta(base)
    close(axis_merge([low], base, keep=0.01).state, low)  # K = 1 keeps a rank-one delta whole


def test_identical_clients_return_them_when_their_rank_fits() -> None:
    base = front_state("resnet18", 2)
    same = perturbed(base, 1)[0]
    close(axis_merge([same, same, same], base, keep=3.0).state, same)
    low = rank_one_delta(base)
    # every layer's K >= 3 (smallest rank 8 -> floor(0.4 * 8) = 3): the 3 copies of the one component
    assert min(layer_k(v.shape, 0.4, 3) for v in base.values() if is_matrix(v)) == 3
    close(axis_merge([low, low, low], base, keep=0.4).state, low)


def test_identical_clients_with_few_components_truncate_their_rank() -> None:
    """n identical sources and K = n*j: the merge is base + the best rank-j approximation of the delta."""
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(6, 4, 3, 3, generator=g)}
    same = {"w": base["w"] + torch.randn(6, 4, 3, 3, generator=g)}
    for j in (1, 2, 5):
        lm = axis_matrix([same["w"] - base["w"]] * 3, 3 * j)
        d = (same["w"] - base["w"]).reshape(6, -1).double().numpy()
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        want = (u[:, :j] * s[:j]) @ vt[:j]
        np.testing.assert_allclose(lm.delta.numpy(), want, rtol=0, atol=1e-12)
        assert lm.kept == 3 * j and lm.pooled == 18
        assert lm.energy == pytest.approx(float((s[:j] ** 2).sum() / (s**2).sum()), rel=1e-12)


@pytest.mark.parametrize("arch,cut", [("resnet18", 2), ("mobilenetv2", 3)])
def test_one_component_is_the_top_triplet_of_the_pooled_set(arch: str, cut: int) -> None:
    base = front_state(arch, cut)
    srcs = perturbed(base, 3)
    merged = axis_merge(srcs, base, keep=1e-6)  # K = 1 in every layer
    n = len(srcs)
    for key, b in base.items():
        if not is_matrix(b):
            continue
        best = (-1.0, None)
        for sd in srcs:  # independently: numpy's SVD of each source's delta, the largest sigma of all
            d = (sd[key].double() - b.double()).reshape(b.shape[0], -1).numpy()
            u, s, vt = np.linalg.svd(d, full_matrices=False)
            if s[0] > best[0]:
                best = (s[0], s[0] * np.outer(u[:, 0], vt[0]))
        want = (b.double().numpy().reshape(b.shape[0], -1) + best[1] / n).astype(np.float32).reshape(b.shape)
        np.testing.assert_allclose(merged.state[key].numpy(), want, rtol=0, atol=1e-6, err_msg=key)


def test_kept_energy_share_is_the_kept_share_of_pooled_squared_sigmas() -> None:
    base = front_state("resnet18", 2)
    srcs = perturbed(base, 4)
    keep = 0.25
    merged = axis_merge(srcs, base, keep)
    want = {}
    for key, b in base.items():
        if not is_matrix(b):
            continue
        sig = np.concatenate(
            [np.linalg.svd((sd[key].double() - b.double()).reshape(b.shape[0], -1).numpy(), compute_uv=False) for sd in srcs]
        )
        rank = min(b.shape[0], int(np.prod(b.shape[1:])))
        k = max(1, math.floor(keep * rank))
        top = np.sort(sig**2)[::-1][:k]
        want[key] = float(top.sum() / (sig**2).sum())
    assert set(merged.layers) == set(want)
    for key in want:
        assert merged.layers[key] == pytest.approx(want[key], rel=1e-10), key
    assert merged.stats["kept_energy"] == pytest.approx(sum(want.values()) / len(want), rel=1e-10)
    assert merged.stats["kept_energy_min"] == pytest.approx(min(want.values()), rel=1e-10)
    assert 0 < merged.stats["kept_energy_min"] < 1


def test_layer_k() -> None:
    assert layer_k((64, 64, 3, 3), 0.1, 5) == 6  # rank 64 -> floor(6.4)
    assert layer_k((8, 3, 3, 3), 0.1, 5) == 1  # at least one
    assert layer_k((8, 27), 1.0, 2) == 8
    assert layer_k((8, 27), 100.0, 2) == 16  # at most n * rank
    assert layer_k((768, 768), 0.1, 2) == 76  # the paper's K


def test_axis_is_deterministic_and_leaves_non_matrices_to_fedavg() -> None:
    base = front_state("mobilenetv2", 3, "batch")
    srcs = perturbed(base, 3)
    a, b = axis_merge(srcs, base, 0.1), axis_merge(srcs, base, 0.1)
    assert_same(a.state, b.state)
    avg = fedavg(srcs)
    for k, v in base.items():
        if not is_matrix(v):
            assert torch.equal(a.state[k], avg[k]), k  # biases, norms, buffers: FedAvg bit for bit
    assert any(not torch.allclose(a.state[k], avg[k], atol=1e-4) for k, v in base.items() if is_matrix(v))


def test_axis_needs_a_base_and_matching_keys() -> None:
    base = front_state("resnet18", 1)
    srcs = perturbed(base, 2)
    with pytest.raises(ValueError, match="base"):
        Axis(0.1)(srcs, None)
    with pytest.raises(ValueError, match="different keys"):
        axis_merge(srcs, {k: v for k, v in list(base.items())[1:]}, 0.1)
    with pytest.raises(ValueError, match="positive"):
        Axis(0.0)
    with pytest.raises(ConfigError, match="fed.axis_keep"):
        schema_config(["fed.axis_keep=0"])
    with pytest.raises(ConfigError, match="fed.aggregation"):
        schema_config(["fed.aggregation=axes"])


# ----------------------------------------------------------------------------- the sync
def test_sync_merges_online_and_momentum_against_their_own_bases() -> None:
    base_on = front_state("resnet18", 2, seed=0)
    base_mo = front_state("resnet18", 2, seed=7)
    on, mo = perturbed(base_on, 3, seed=1), perturbed(base_mo, 3, seed=2)
    agg = AGGREGATIONS.get("axis")(schema_config(["fed.aggregation=axis", "fed.axis_keep=0.2"]).fed)
    assert agg == Axis(0.2)
    res = sync_fronts(list(zip(on, mo)), align=True, aggregate=agg, base=GlobalFronts(base_on, base_mo))
    assert_same(res.fronts.online, axis_merge(on, base_on, 0.2).state)
    assert_same(res.fronts.momentum, axis_merge(mo, base_mo, 0.2).state)
    want_m = axis_merge(mo, base_mo, 0.2)
    assert res.stats["kept_energy_m"] == want_m.stats["kept_energy"]
    assert {"ol_og", "ol_ml", "ml_mg", "kept_energy", "kept_energy_min", "merge_s", "kept_energy_m", "kept_energy_min_m", "merge_s_m"} == set(res.stats)
    assert res.layers["momentum"] == want_m.layers and set(res.layers) == {"online", "momentum"}
    # the divergence metrics stay those of the plain means
    plain = sync_fronts(list(zip(on, mo)), align=True)
    assert {k: plain.stats[k] for k in ("ol_og", "ol_ml", "ml_mg")} == {k: res.stats[k] for k in ("ol_og", "ol_ml", "ml_mg")}
    # MocoSFL: the momentum fronts are not merged
    moco = sync_fronts(list(zip(on, mo)), align=False, aggregate=agg, base=GlobalFronts(base_on, base_mo))
    assert moco.fronts.momentum is None and "kept_energy_m" not in moco.stats


def test_fedavg_through_the_registry_is_unchanged() -> None:
    base = front_state("resnet18", 2)
    on, mo = perturbed(base, 3, seed=1), perturbed(base, 3, seed=2)
    agg = AGGREGATIONS.get("fedavg")(schema_config([]).fed)
    assert agg is fedavg
    res = sync_fronts(list(zip(on, mo)), align=True, aggregate=agg, base=GlobalFronts(base, base))
    assert_same(res.fronts.online, fedavg(on))
    assert_same(res.fronts.momentum, fedavg(mo))
    assert set(res.stats) == {"ol_og", "ol_ml", "ml_mg"} and res.layers == {}
    assert not isinstance(agg(on, base), Merge)


# ----------------------------------------------------------------------------- end to end
TINY = tiny_overrides("fed.aggregation=axis", "train.checkpoint_every=2", "data.image_size=16")


def tiny_cfg(*extra: str):
    return schema_config(TINY + list(extra))


@pytest.fixture(scope="module")
def axis_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run (MonAcoSFL, 2 clients, syncs at steps 2, 3, 5, 6) with AXIS at keep 0.1."""
    run = tmp_path_factory.mktemp("axis") / "run"
    Trainer(tiny_cfg(), run, progress=False).run()
    return run


def test_tiny_run_with_axis_logs_the_merge(axis_run: Path) -> None:
    syncs = [r for r in step_records(axis_run) if r.get("sync")]
    assert [r["step"] for r in syncs] == [2, 3, 5, 6]
    for r in syncs:  # MonAcoSFL (the default): online and momentum merges
        assert 0 < r["kept_energy_min"] <= r["kept_energy"] < 1 and r["merge_s"] >= 0 and r["merge_s_m"] >= 0
        assert 0 < r["kept_energy_m"] < 1
        assert set(r["layers_online"]) == set(r["layers_momentum"]) and "0.0.weight" in r["layers_online"]
        assert min(r["layers_online"].values()) == r["kept_energy_min"]
    # the momentum base is checkpointed: the last sync's merged momentum front
    ckpt = load_checkpoint(axis_run)
    assert set(ckpt["global_momentum"]) == set(ckpt["global_online"])
    assert not torch.equal(ckpt["global_momentum"]["0.0.weight"], ckpt["global_online"]["0.0.weight"])


def test_axis_keeping_everything_trains_like_fedavg_and_keep_changes_it(tmp_path: Path, axis_run: Path) -> None:
    fed = tmp_path / "fedavg"
    Trainer(tiny_cfg("fed.aggregation=fedavg"), fed, progress=False).run()
    assert "kept_energy" not in step_records(fed)[1]  # fedavg's records are unchanged
    allk = tmp_path / "all"
    Trainer(tiny_cfg("fed.axis_keep=2"), allk, progress=False).run()  # 2 clients: keep 2 = every triplet
    lf, la, lk = losses(fed), losses(allk), losses(axis_run)
    assert [s for s, _ in la] == [s for s, _ in lf] == [1, 2, 3, 4, 5, 6]
    for (_, a), (_, b) in zip(la, lf):
        assert a == pytest.approx(b, rel=1e-4)
    assert all(r["kept_energy"] == pytest.approx(1.0, abs=1e-9) for r in step_records(allk) if r.get("sync"))
    assert lk[:2] == lf[:2]  # the first sync is at step 2: losses up to it do not depend on the merge
    assert lk[2][1] != pytest.approx(lf[2][1], rel=1e-6)


def test_resume_with_axis_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, axis_run: Path) -> None:
    """Crash in step 6, resume from step 4: the sync at step 5 merges against the momentum base
    of the sync at step 3, which only the checkpoint holds."""
    part = tmp_path / "part"
    with crash_in_server_step(monkeypatch, 6):  # dies in step 6, after the checkpoint at step 4
        Trainer(tiny_cfg(), part, progress=False).run()
    trainer = Trainer.resume(part, progress=False)
    assert trainer.global_step == 4
    trainer.run(resumed=True)
    assert losses(part) == losses(axis_run)
    drop = ("merge_s", "merge_s_m")
    strip = lambda recs: [{k: v for k, v in r.items() if k not in drop} for r in recs]  # noqa: E731
    assert strip(step_records(part)) == strip(step_records(axis_run))
    a, b = load_checkpoint(axis_run), load_checkpoint(part)
    for key in ("global_online", "global_momentum"):
        assert_same(a[key], b[key], key)
    assert_same(a["server"]["online"], b["server"]["online"], "server.online")
