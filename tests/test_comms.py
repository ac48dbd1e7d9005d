"""Communication accounting: the reference calculator, analytic vs measured bytes, the cut table."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides, train
from mona_sfl import build
from mona_sfl.comms import (
    comm_costs,
    comm_table,
    front_state_bytes,
    reference_overhead,
    resolve_steps_per_epoch,
)
from mona_sfl.cli.comm import run as comm_main
from mona_sfl.config import schema_config
from mona_sfl.core.sync import fedavg

# steps per epoch from the data, the default epochs and sync cadence
TINY = tiny_overrides("fed.num_clients=3", "train.batch_size=4", drop=("fed.sync_every", "train.epochs", "train.steps_per_epoch"))

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(*extra: str):
    return schema_config(TINY + list(extra))


# --------------------------------------------------------------------------- reference formula

# algorithm.md 6.2, ResNet-18: cut -> (weights MB, latent MB, total if momentum also synced)
TABLE_6_2 = {
    1: (1.42, 5000.00, 5002.83),
    2: (57.86, 5000.00, 5115.72),
    3: (114.31, 5000.00, 5228.61),
    4: (289.89, 2500.00, 3079.79),
    5: (515.28, 2500.00, 3530.57),
    6: (1216.46, 1250.00, 3682.91),
    7: (2117.24, 1250.00, 5484.47),
    8: (4919.58, 625.00, 10464.16),
    9: (8521.14, 625.00, 17667.29),
}


def test_reference_calculator_reproduces_table_6_2() -> None:
    # MocoSFL Table 1: MocoSFL-1 = 1.4 + 5000 MB, MocoSFL-3 (cut 2) = 57.9 + 5000 MB
    r1, r2 = reference_overhead("resnet18", 1), reference_overhead("resnet18", 2)
    assert round(r1.weights_mb, 2) == 1.42 and round(r1.latent_mb, 2) == 5000.00 and round(r1.total_mb, 2) == 5001.42
    assert round(r2.weights_mb, 2) == 57.86 and round(r2.latent_mb, 2) == 5000.00 and round(r2.total_mb, 2) == 5057.86
    for cut, (w, lat, mom) in TABLE_6_2.items():
        r = reference_overhead("resnet18", cut)
        assert (round(r.weights_mb, 2), round(r.latent_mb, 2), round(r.total_mb_momentum_synced, 2)) == (w, lat, mom), cut
    best = min(range(1, 10), key=lambda c: reference_overhead("resnet18", c).total_mb)
    assert best == 6


# --------------------------------------------------------------------------- analytic vs measured


def _payload(t: torch.Tensor) -> int:
    """Bytes of a tensor as it is serialised for the wire (raw buffer)."""
    return len(t.detach().cpu().contiguous().numpy().tobytes())


def _state_payload(sd: dict[str, torch.Tensor]) -> int:
    return sum(_payload(v) for v in sd.values())


@pytest.mark.parametrize(
    "arch,norm,symmetric,align,cut",
    [
        ("resnet18", "group", "client", True, 2),
        ("resnet18", "group", "none", False, 4),
        ("mobilenetv2", "batch", "original", True, 3),  # BatchNorm: int64 num_batches_tracked in the state
        ("mobilenetv2", "group", "client", False, 9),
    ],
)
def test_analytic_bytes_equal_serialised_payloads(arch: str, norm: str, symmetric: str, align: bool, cut: int) -> None:
    """One real step of a ClientHost + Server and one sync: the payloads match comm_costs exactly."""
    cfg = tiny_cfg(f"model.arch={arch}", f"model.norm={norm}", f"algo.symmetric={symmetric}", f"algo.align_momentum={str(align).lower()}", f"model.cut={cut}")
    costs = comm_costs(cfg)
    ids = [0, 1, 2]
    train = build.load_data(cfg, "train")
    group = build.build_host(cfg, ids, train=train, device=torch.device("cpu"))
    server = build.build_server(cfg, torch.device("cpu"))
    group.begin_epoch(0, ids)
    acts = group.forward(ids)
    up = {c: _payload(a.a_q) + _payload(a.a_k) for c, a in acts.items()}
    res = server.step([acts[c] for c in ids])
    down = {c: _payload(g) for c, g in res.grads.items()}
    group.backward(res.grads)
    assert set(up.values()) == {costs.up_per_client_step}
    assert set(down.values()) == {costs.down_per_client_step}
    assert sum(up.values()) == costs.up_per_step and sum(down.values()) == costs.down_per_step
    assert sum(up.values()) + sum(down.values()) == costs.bytes_per_step
    # sync: every client uploads its online (MonAcoSFL: and momentum) front; downloads the average(s)
    fronts = group.fronts(ids)
    sent = sum(_state_payload(o) + (_state_payload(m) if align else 0) for o, m in fronts.values())
    avg_on, avg_mom = fedavg([o for o, _ in fronts.values()]), fedavg([m for _, m in fronts.values()])
    got = len(ids) * (_state_payload(avg_on) + (_state_payload(avg_mom) if align else 0))
    assert _state_payload(avg_on) == front_state_bytes(cfg)
    assert sent == costs.sync_up_per_client * len(ids) and got == costs.sync_down_per_client * len(ids)
    assert sent + got == costs.bytes_per_sync


def _engine_syncs(epochs: int, spe: int, every: int, max_steps: int) -> tuple[int, int]:
    """The engine's sync rule, step by step."""
    total = min(epochs * spe, max_steps) if max_steps else epochs * spe
    step = syncs = 0
    for _ in range(epochs):
        for s in range(spe):
            step += 1
            if s == spe - 1 or step >= total or (every > 0 and (s + 1) % every == 0):
                syncs += 1
            if step >= total:
                return step, syncs
    return step, syncs


@pytest.mark.parametrize("epochs,spe,every,max_steps", [(3, 7, 0, 0), (3, 7, 2, 0), (3, 7, 3, 16), (2, 5, 9, 0), (4, 4, 2, 6), (2, 6, 3, 6)])
def test_steps_and_syncs_follow_the_engine(epochs: int, spe: int, every: int, max_steps: int) -> None:
    cfg = tiny_cfg(f"train.epochs={epochs}", f"train.steps_per_epoch={spe}", f"fed.sync_every={every}", f"train.max_steps={max_steps}")
    c = comm_costs(cfg)
    assert (c.total_steps, c.total_syncs) == _engine_syncs(epochs, spe, every, max_steps)
    assert c.latent_total == c.total_steps * c.bytes_per_step
    assert c.bytes_total == c.latent_total + c.total_syncs * c.bytes_per_sync  # every client in every epoch


def test_sync_interval_longer_than_an_epoch_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Epochs of 2 steps and fed.sync_every=3: the clients sync at every epoch end, and the run says so."""
    from mona_sfl.core.schedule import Schedule
    from mona_sfl.engine import Trainer

    cfg = schema_config(tiny_overrides("train.epochs=2", "train.steps_per_epoch=2", "fed.sync_every=3"))
    sched = Schedule.from_config(cfg, steps_per_epoch=2)
    assert sched.total_syncs == 2 and [sched.sync_due(k, k) for k in (1, 2)] == [False, True]
    assert sched.sync_note() == (
        "fed.sync_every=3 is longer than an epoch (2 steps): the clients sync at every epoch end, every 2 steps "
        "(more images per client, e.g. a larger data.proportion, make epochs longer)"
    )
    assert Schedule.from_config(cfg, steps_per_epoch=3).sync_note() is None
    with caplog.at_level("WARNING", logger="mona_sfl"):
        with Trainer(cfg, tmp_path / "run", progress=False):
            pass
    assert [r.getMessage() for r in caplog.records if r.name == "mona_sfl"] == [sched.sync_note()]


def test_steps_per_epoch_without_loading_images() -> None:
    cfg = tiny_cfg("data.proportion=0.7", "fed.num_clients=4", "train.batch_size=6")
    train = build.load_data(cfg, "train")
    parts = build.client_partition(cfg, train.labels, len(train.classes))
    assert resolve_steps_per_epoch(cfg) == build.steps_per_epoch(cfg, parts) == math.ceil(140 / 4 / 6)
    # CIFAR-10 without a data folder: the size is known, nothing is loaded
    c10 = schema_config(["data.name=cifar10", "fed.num_clients=5", "train.batch_size=20"])
    assert resolve_steps_per_epoch(c10) == 500
    assert resolve_steps_per_epoch(c10, steps_per_epoch=7) == 7
    assert resolve_steps_per_epoch(c10, num_train=1000) == 10


def test_mocosfl_and_monacosfl_differ_by_the_momentum_front() -> None:
    for arch in ("resnet18", "mobilenetv2"):
        for cut in (1, 5, 9):
            mona = comm_costs(tiny_cfg(f"model.arch={arch}", f"model.cut={cut}", "algo.align_momentum=true", "train.epochs=3"))
            moco = comm_costs(tiny_cfg(f"model.arch={arch}", f"model.cut={cut}", "algo.align_momentum=false", "train.epochs=3"))
            front = front_state_bytes(tiny_cfg(f"model.arch={arch}", f"model.cut={cut}"))
            assert mona.bytes_per_step == moco.bytes_per_step
            assert mona.sync_up_per_client - moco.sync_up_per_client == front
            assert mona.sync_down_per_client - moco.sync_down_per_client == front
            assert mona.bytes_per_sync - moco.bytes_per_sync == 2 * front * mona.clients_per_step
            assert mona.bytes_total - moco.bytes_total == 2 * front * mona.clients_per_step * mona.total_syncs
            assert moco.monitor_up_per_client == front and mona.monitor_up_per_client == 0


def test_table_has_a_row_per_cut(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_cfg("train.epochs=2")
    text = comm_table(cfg)
    lines = text.splitlines()
    sep = next(i for i, line in enumerate(lines) if set(line.replace(" ", "")) == {"-"})
    rows = lines[sep + 1 :]
    assert len(rows) == 9 and [int(r.split()[0]) for r in rows] == list(range(1, 10))
    assert "activation" in lines[sep - 1] and "total" in lines[sep - 1]
    assert sum(r.endswith("*") for r in rows) >= 1
    exact = comm_table(cfg, exact=True).splitlines()[sep + 1 :]
    c4 = comm_costs(tiny_cfg("train.epochs=2", "model.cut=4"))
    assert [t for t in exact[3].split() if t != "*"][-1] == str(c4.bytes_total)

    import argparse

    assert comm_main(argparse.Namespace(config=None, overrides=TINY, steps_per_epoch=None, exact=False, reference=True)) == 0
    out = capsys.readouterr().out
    assert "overhead_calculator" in out and "configured cut" in out


# --------------------------------------------------------------------------- measured by the Ray runtime


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_analytic_bytes_equal_ray_counters(tmp_path: Path) -> None:
    """runtime=ray counts the payloads it really ships; with client sampling (catch-up downloads), MocoSFL."""
    cfg = tiny_cfg(
        "runtime=ray", "ray.num_actors=1", "seed=1", "fed.sample_ratio=0.67", "train.epochs=4", "train.steps_per_epoch=2",
        "train.max_steps=7", "algo.align_momentum=false", "model.cut=3",
    )
    costs = comm_costs(cfg)
    assert costs.clients_per_step == 2 and costs.catchup_downloads == 2  # epochs [1,2] [0,2] [2,0] [2,1]
    _, s = train(cfg, tmp_path / "ray")
    assert (s["steps"], s["syncs"]) == (costs.total_steps, costs.total_syncs) == (7, 4)
    assert s["bytes_up"] == costs.counted_up_total
    assert s["bytes_down"] == costs.counted_down_total
    assert s["bytes_sync"] == costs.counted_sync_total
    assert costs.counted_sync_total - costs.weights_total == costs.total_syncs * 2 * costs.front_bytes
