"""The key-source probe: exact values against a direct computation, equal fronts give equal
losses, run folders (after a sync and between syncs), the untouched run folder, the CLI."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_overrides
from mona_sfl.checkpoint import load_checkpoint
from mona_sfl.cli import main
from mona_sfl.config import ConfigError, schema_config
from mona_sfl.core.moco import infonce
from mona_sfl.engine import Trainer
from mona_sfl.eval.keys import client_fronts, probe_key_sources, probe_run, state_after
from mona_sfl.models.split import build_split

pytestmark = pytest.mark.usefixtures("one_thread")


def _nets():
    torch.manual_seed(0)
    front, server = build_split("resnet18", 2, width=0.125, proj_hidden=32, proj_dim=16)
    server_m = copy.deepcopy(server)
    with torch.no_grad():
        for p in server_m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fronts = []
    for _ in range(4):  # four different fronts
        f = copy.deepcopy(front)
        with torch.no_grad():
            for p in f.parameters():
                p.add_(0.1 * torch.randn_like(p))
        fronts.append({k: v.clone() for k, v in f.state_dict().items()})
    return front.eval(), server.eval(), server_m.eval(), fronts


def _enc(front, server, state, x):  # one image at a time, as the probe with batch_size=1
    front.load_state_dict(state)
    with torch.no_grad():
        return torch.cat([F.normalize(server(front(x[i : i + 1])), dim=1) for i in range(x.shape[0])])


def test_probe_equals_a_direct_computation() -> None:
    front, server, server_m, fronts = _nets()
    g = torch.Generator().manual_seed(1)
    x1, x2, neg = (torch.randn(n, 3, 16, 16, generator=g) for n in (3, 3, 5))
    queue = F.normalize(torch.randn(16, 7, generator=g), dim=0)
    online = {0: fronts[0], 1: fronts[1], 2: fronts[1], 3: fronts[2]}
    momentum = {0: fronts[3], 1: fronts[2], 2: fronts[0], 3: fronts[1]}
    res = probe_key_sources(front, server, server_m, online, momentum, [0, 2], [0, 1, 2, 3], (x1, x2), neg, queue, 0.2, batch_size=1, step=9)
    assert (res.step, res.clients, res.sources, res.images, res.negatives) == (9, [0, 2], 4, 3, 5)
    for c, others in ((0, [1, 2, 3]), (2, [0, 1, 3])):
        q, k = _enc(front, server, online[c], x1), _enc(front, server_m, momentum[c], x2)
        own = _enc(front, server_m, momentum[c], neg)
        other = torch.cat([_enc(front, server_m, momentum[others[j % 3]], neg[j : j + 1]) for j in range(5)])
        want = {
            "loss_own": float(infonce(q, k, own.T, 0.2)), "loss_others": float(infonce(q, k, other.T, 0.2)),
            "loss_queue": float(infonce(q, k, queue, 0.2)), "cos_pos": float((q * k).sum(1).mean()),
            "cos_own": float((q @ own.T).mean()), "cos_others": float((q @ other.T).mean()), "key_cos": float((own * other).sum(1).mean()),
        }
        assert res.per_client[c] == want
    assert res.loss_others == (res.per_client[0]["loss_others"] + res.per_client[2]["loss_others"]) / 2
    assert res.loss_own != res.loss_others and res.key_cos < 0.999


def test_one_shared_momentum_front_gives_equal_losses() -> None:
    front, server, server_m, fronts = _nets()
    g = torch.Generator().manual_seed(2)
    x1, x2, neg = (torch.randn(n, 3, 16, 16, generator=g) for n in (4, 4, 6))
    shared = fronts[0]  # what every client holds right after a MonAcoSFL sync
    res = probe_key_sources(front, server, server_m, dict(enumerate(fronts[:3])), {c: shared for c in range(3)}, [0, 1], [0, 1, 2],
                            (x1, x2), neg, torch.eye(16)[:, :3], 0.1)
    assert res.loss_own == res.loss_others and res.cos_own == res.cos_others
    assert res.key_cos == pytest.approx(1.0, abs=1e-6)


def test_probe_refuses_a_probe_client_without_others() -> None:
    front, server, server_m, fronts = _nets()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ConfigError, match="needs a client other than 1"):
        probe_key_sources(front, server, server_m, {1: fronts[0]}, {1: fronts[1]}, [1], [1], (x, x), x, torch.eye(16), 0.1)
    with pytest.raises(ConfigError, match="at least one probe client"):
        probe_key_sources(front, server, server_m, {}, {}, [], [1, 2], (x, x), x, torch.eye(16), 0.1)


def test_client_fronts_fall_back_to_the_last_sync() -> None:
    go, gm, r1 = {"w": torch.zeros(1)}, {"w": torch.ones(1)}, {"w": torch.full((1,), 2.0)}
    online, momentum = client_fronts({"global_online": go, "global_momentum": gm,
                                      "records": {"1": {"online": None, "momentum": r1}, "2": {"online": r1, "momentum": None}}}, 3)
    assert online[0] is go and online[1] is go and online[2] is r1
    assert momentum[0] is gm and momentum[1] is r1 and momentum[2] is gm


def _run(root: Path, method: str) -> Path:
    run = root / method
    align = "true" if method == "mona" else "false"
    Trainer(schema_config(tiny_overrides(f"algo.align_momentum={align}", "fed.num_clients=3", "train.epochs=2", "train.steps_per_epoch=4",
                                         "train.max_steps=4")), run, progress=False).run()
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keys")
    return {m: _run(root, m) for m in ("mona", "moco")}


def _digest(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.iterdir()) if p.is_file()}


def test_after_a_monacosfl_sync_every_client_gives_the_same_keys(runs: dict[str, Path]) -> None:
    mona, moco = probe_run(runs["mona"], num_test=8, clients=2), probe_run(runs["moco"], num_test=8, clients=2)
    assert (mona.step, mona.sources, mona.clients, mona.images, mona.negatives) == (4, 3, [0, 1], 4, 4)
    assert mona.loss_own == mona.loss_others and mona.key_cos == pytest.approx(1.0, abs=1e-6)
    assert moco.loss_own != moco.loss_others and moco.key_cos < 0.99999  # MocoSFL's clients keep their own momentum fronts


def test_state_after_continues_a_copy_between_syncs(runs: dict[str, Path]) -> None:
    before = _digest(runs["moco"])
    state = state_after(runs["moco"], 1)
    assert state["global_step"] == 5 and state["step_in_epoch"] == 1 and state["syncs"] == load_checkpoint(runs["moco"])["syncs"]
    assert sorted(state["clients"]["live"]) == [0, 1, 2]
    assert all(state["clients"]["records"][str(c)]["online"] is not None for c in range(3))  # moved since the sync
    assert _digest(runs["moco"]) == before  # the run folder is not touched
    res = probe_run(runs["moco"], num_test=8, clients=3, after=1)
    assert res.step == 5 and res.sources == 3 and res.clients == [0, 1, 2]
    with pytest.raises(ConfigError, match="a sync falls within 2 steps after step 4"):
        state_after(runs["moco"], 2)  # fed.sync_every=2: the sync of step 6
    with pytest.raises(ConfigError, match="steps must be an integer >= 1"):
        state_after(runs["moco"], 0)
    assert _digest(runs["moco"]) == before


def test_front_cli_keys(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["front", str(runs["moco"]), "--num-test", "8", "--keys", "--probe-clients", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    res = probe_run(runs["moco"], num_test=8, clients=2)
    head = next(i for i, line in enumerate(out) if line.startswith("run ") and "loss own" in line)
    assert out[head + 2].split() == [str(runs["moco"]), "4", "2/3", *(f"{v:.3f}" for v in (
        res.loss_own, res.loss_others, res.loss_queue, res.cos_pos, res.cos_own, res.cos_others, res.key_cos))]
    assert out[head + 3].startswith("key-source probe:")
    assert main(["front", str(runs["moco"]), "--num-test", "8", "--keys", "--probe-clients", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["keys"] == json.loads(json.dumps(res.to_dict()))
    assert main(["front", str(runs["moco"]), "--num-test", "8", "--keys", "--after", "2"]) == 2
    assert "a sync falls within 2 steps" in capsys.readouterr().err
    assert main(["front", str(runs["moco"]), "--num-test", "8", "--after", "1"]) == 2
    assert "--after needs --keys" in capsys.readouterr().err
