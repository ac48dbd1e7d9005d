"""Does the server tell a query's positive key by the front that made it? The key-source probe.

Under MocoSFL every client keeps its own momentum front, so the negatives in the server's
queue come from many fronts while a query's positive key comes from its own client's. If a
key carries a mark of its front, the online net can pick the positive by that mark rather
than by what the image shows, and the InfoNCE loss falls without the features improving.

The probe measures this on a checkpoint. For each probe client: queries from its online front
(view 1 of held-out images), positive keys from its momentum front (view 2), scored against
negatives made of *the same other images and views* passed once through the probe client's
own momentum front and once through the momentum fronts of the other clients (one each, in
turn). Images, views and server are the same; only the front that made the negatives differs.
A lower loss with the other fronts' negatives is the source cue. Where every client holds the
same momentum front (MonAcoSFL right after a sync) the two are equal to the bit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mona_sfl.checkpoint import CheckpointError, load_checkpoint, load_run_config, load_weights
from mona_sfl.config import ConfigError
from mona_sfl.core.moco import infonce

StateDict = Mapping[str, Tensor]


@dataclass
class KeySources:
    """Means over the probe clients of (queries: ``images`` held-out images; negatives: ``negatives``):

    - ``loss_own`` / ``loss_others``: InfoNCE (the run's temperature) against the negatives from
      the probe client's own momentum front / from the other clients' fronts;
    - ``loss_queue``: InfoNCE against the checkpoint's key queue (its K entries, as the server had them);
    - ``cos_pos``: mean query . positive key;
    - ``cos_own`` / ``cos_others``: mean query . negative for the two sets of negatives;
    - ``key_cos``: mean cosine between one negative's key from the own front and from the other
      front (1: the fronts give the same keys).
    """

    step: int
    clients: list[int]
    sources: int
    images: int
    negatives: int
    loss_own: float
    loss_others: float
    loss_queue: float
    cos_pos: float
    cos_own: float
    cos_others: float
    key_cos: float
    per_client: dict[int, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def _encode(front: nn.Module, server: nn.Module, state: StateDict, x: Tensor, device: torch.device, batch_size: int) -> Tensor:
    """L2-normalised ``server(front(x))`` with ``front`` loaded from ``state``, on the CPU."""
    front.load_state_dict(state)
    out = [F.normalize(server(front(x[i : i + batch_size].to(device))).float(), dim=1).cpu() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out)


@torch.no_grad()
def probe_key_sources(
    front: nn.Module,
    server_online: nn.Module,
    server_momentum: nn.Module,
    online: Mapping[int, StateDict],
    momentum: Mapping[int, StateDict],
    clients: list[int],
    sources: list[int],
    q_views: tuple[Tensor, Tensor],
    negatives: Tensor,
    queue: Tensor,
    T: float,
    *,
    device: torch.device | None = None,
    batch_size: int = 256,
    step: int = -1,
) -> KeySources:
    """The probe on given nets and fronts (all as they are: callers set eval mode).

    ``front`` is a scratch module shaped as the fronts (its weights are overwritten);
    ``online[c]`` / ``momentum[c]`` client c's fronts; ``clients`` the probe clients;
    ``sources`` the clients whose momentum fronts make the other-front negatives (negative j of
    probe client c comes from ``[s for s in sources if s != c][j % ...]``); ``q_views`` the
    query images' two views (n, 3, H, W); ``negatives`` the negative images' view (m, 3, H, W);
    ``queue`` (dim, K) the server's queue. Clients whose momentum fronts are the same object
    share one encoding (so where every client holds the last sync's front, the two sets of
    negatives are the same tensor).
    """
    device = device or torch.device("cpu")
    if not clients:
        raise ConfigError("the key-source probe needs at least one probe client")
    x1, x2 = q_views
    if x1.shape != x2.shape or x1.shape[0] < 1 or negatives.shape[0] < 1:
        raise ConfigError(f"the key-source probe needs queries with two views of one shape and negatives, got {tuple(x1.shape)}, "
                          f"{tuple(x2.shape)} and {tuple(negatives.shape)}")
    per: dict[int, dict[str, float]] = {}
    for c in clients:
        others = [s for s in sources if s != c]
        if not others:
            raise ConfigError(f"the key-source probe needs a client other than {c} to make negatives, got sources {sources}")
        q = _encode(front, server_online, online[c], x1, device, batch_size)
        k = _encode(front, server_momentum, momentum[c], x2, device, batch_size)
        own = _encode(front, server_momentum, momentum[c], negatives, device, batch_size)
        # negative j from others[j % len(others)]; clients holding the very same state (the last
        # sync's momentum front) share one pass, and the probe client's own front is not redone
        groups: dict[int, list[int]] = {}
        for j in range(negatives.shape[0]):
            groups.setdefault(id(momentum[others[j % len(others)]]), []).append(j)
        states = {id(momentum[s]): momentum[s] for s in others}
        other = torch.empty_like(own)
        for key, rows in groups.items():
            idx = torch.tensor(rows)
            other[idx] = own[idx] if states[key] is momentum[c] else _encode(front, server_momentum, states[key], negatives[idx], device, batch_size)
        per[c] = {
            "loss_own": float(infonce(q, k, own.T, T)),
            "loss_others": float(infonce(q, k, other.T, T)),
            "loss_queue": float(infonce(q, k, queue.float().cpu(), T)),
            "cos_pos": float((q * k).sum(1).mean()),
            "cos_own": float((q @ own.T).mean()),
            "cos_others": float((q @ other.T).mean()),
            "key_cos": float((own * other).sum(1).mean()),
        }
    mean = {key: sum(v[key] for v in per.values()) / len(per) for key in next(iter(per.values()))}
    return KeySources(step=step, clients=list(clients), sources=len(set(sources)), images=int(x1.shape[0]),
                      negatives=int(negatives.shape[0]), per_client=per, **mean)


def client_fronts(clients: Mapping[str, Any], num_clients: int) -> tuple[dict[int, StateDict], dict[int, StateDict]]:
    """Every client's (online, momentum) front from a checkpoint's ``clients`` state: its own
    record where it has one, the last sync's global fronts otherwise."""
    recs = {int(c): r for c, r in clients.get("records", {}).items()}
    online, momentum = {}, {}
    for c in range(num_clients):
        r = recs.get(c, {})
        online[c] = r.get("online") if r.get("online") is not None else clients["global_online"]
        momentum[c] = r.get("momentum") if r.get("momentum") is not None else clients["global_momentum"]
    return online, momentum


def state_after(run_dir: str | Path, steps: int) -> dict[str, Any]:
    """The state (as a checkpoint holds it) the run in ``run_dir`` reaches ``steps`` training steps
    after its checkpoint, computed on a temporary copy of the folder (the run itself is not touched).

    Checkpoints sit at epoch ends, right after a sync, where MocoSFL's clients have just been
    handed the same online front; ``steps`` into the next sync interval their fronts have moved
    apart again, as they are during most of training. Raises ConfigError when a sync falls
    within the ``steps`` (the probe would then see a synced state again)."""
    import shutil
    import tempfile

    from mona_sfl.engine import Trainer

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")

    class _Reached(Exception):
        pass

    with tempfile.TemporaryDirectory(prefix="mona-sfl-keys-") as tmp:
        copy_dir = Path(tmp) / "run"
        shutil.copytree(run_dir, copy_dir, ignore=shutil.ignore_patterns("*.tmp", "checkpoint.prev.pt", "tb", "events.*"))
        start = int(load_checkpoint(copy_dir).get("global_step", -1))
        target = start + steps
        trainer = Trainer.resume(copy_dir, progress=False, max_steps=max(target + 1, load_run_config(copy_dir).train.max_steps or 0))
        captured: dict[str, Any] = {}

        def on_step(tr: Any) -> None:
            if tr.syncs != syncs0:
                raise ConfigError(f"a sync falls within {steps} steps after step {start} of {run_dir} (fed.sync_every="
                                  f"{tr.cfg.fed.sync_every}): probe fewer steps after the checkpoint")
            if tr.global_step >= target:
                captured.update(tr.state_dict())
                raise _Reached

        syncs0 = trainer.syncs
        trainer.on_step = on_step
        try:
            trainer.run(resumed=True)
        except _Reached:
            pass
        finally:
            trainer.runtime.close()
        if not captured:
            raise ConfigError(f"the run in {run_dir} ended before {steps} more steps")
        return captured


def probe_run(
    run_dir: str | Path, *, num_test: int = 512, clients: int = 8, seed: int = 0, device: str | None = None, after: int = 0
) -> KeySources:
    """:func:`probe_key_sources` on a run folder's checkpoint: ``num_test`` test images drawn class
    by class (:func:`~mona_sfl.eval.knn.stratified_subset`), every other one a query, the rest
    negatives, views by the run's augmentation seeded with ``seed``; nets in eval mode. Sources:
    the clients taking part in the checkpoint's epoch (all clients when none is); probe clients:
    up to ``clients`` of them, evenly spaced. ``after`` > 0: probe the state :func:`state_after`
    that many steps past the checkpoint (fronts apart, as between syncs) instead of the checkpoint."""
    from mona_sfl import build
    from mona_sfl.eval.knn import stratified_subset

    for name, v, lo in (("num-test", num_test, 4), ("clients", clients, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    ckpt = state_after(run_dir, after) if after else load_checkpoint(run_dir)
    if "clients" not in ckpt or "server" not in ckpt:
        raise CheckpointError(f"the checkpoint in {run_dir} has no client or server state")
    online, momentum = client_fronts(ckpt["clients"], cfg.fed.num_clients)
    live = sorted(int(c) for c in ckpt["clients"].get("live", []))
    sources = live if len(live) >= 2 else sorted(online)
    if len(sources) < 2:
        raise ConfigError(f"the key-source probe needs at least two clients; {run_dir} has {len(sources)}")
    n = min(clients, len(sources))
    probe = [sources[(i * len(sources)) // n] for i in range(n)]
    test = build.load_data(cfg, "test")
    if len(test) < num_test:
        raise ConfigError(f"num-test {num_test} is more than the run's {len(test)} test images")
    dev = build.resolve_device(cfg.device if device is None else device)
    front, net = build.build_models(cfg)
    _, net_m = build.build_models(cfg)
    load_weights(net, ckpt["server"]["online"], "server")
    load_weights(net_m, ckpt["server"]["momentum"], "server momentum net")
    for m in (front, net, net_m):
        m.to(dev).eval()
    images = test.images[torch.as_tensor(stratified_subset(test.labels, num_test))]
    views = build.two_views(cfg, test)
    x1, x2 = views(images[0::2], seed)
    neg = views(images[1::2], seed + 1)[1]
    return probe_key_sources(front, net, net_m, online, momentum, probe, sources, (x1, x2), neg, ckpt["server"]["queue"]["queue"],
                             cfg.algo.T, device=dev, batch_size=cfg.eval.batch_size, step=int(ckpt.get("global_step", -1)))


__all__ = ["KeySources", "client_fronts", "probe_key_sources", "probe_run", "state_after"]
