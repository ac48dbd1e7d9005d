"""The training loop: epochs, client sampling, steps, syncs, evaluation, checkpoints.

The engine decides *when* things happen; *what* happens is in ``mona_sfl.core`` (client,
server, sync) and *where* clients run is the runtime's business. The engine computes no loss
and touches no client tensor except to average fronts at a sync.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mona_sfl import build
from mona_sfl.checkpoint import (
    CONFIG,
    METRICS,
    SUMMARY,
    MetricsLog,
    atomic_write_text,
    load_checkpoint,
    remove_stale_temps,
    save_checkpoint,
    truncate_metrics,
)
from mona_sfl.config import Config, dumps_toml, to_flat
from mona_sfl.core.client import Activations, StateDict, sample_clients
from mona_sfl.core.sync import divergence, fedavg
from mona_sfl.eval.knn import extract_features, knn_accuracy, stratified_subset
from mona_sfl.eval.linear import linear_probe
from mona_sfl.interrupt import TrainingStopped, pause_point, rearm, set_active_run, stop_requested
from mona_sfl.runtime.base import ClientRuntime, make_runtime

log = logging.getLogger("mona_sfl")
CHECKPOINT_VERSION = 1


class AllClientsLost(RuntimeError):
    """Every sampled client failed in a step; the last checkpoint is kept."""


@dataclass
class Timers:
    """Wall time per phase of the step (seconds), for the throughput benchmark."""

    client: float = 0.0
    server: float = 0.0
    sync: float = 0.0
    other: float = 0.0
    sync_cuda: bool = False

    def reset(self) -> None:
        self.client = self.server = self.sync = self.other = 0.0

    def now(self) -> float:
        if self.sync_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


@dataclass
class Progress:
    total: int
    enabled: bool = True
    _bar: Any = None
    _last: float = field(default_factory=time.perf_counter)
    _every: int = 1

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, unit="step", dynamic_ncols=True)
        self._every = max(1, self.total // 20)

    def update(self, step: int, loss: float, ips: float, epoch: int) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", img_s=f"{ips:.0f}", refresh=False)
            self._bar.refresh()
            return
        now = time.perf_counter()
        if step % self._every == 0 or step == self.total or now - self._last > 30:
            self._last = now
            print(f"step {step}/{self.total} epoch {epoch} loss {loss:.4f} {ips:.1f} img/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Trainer:
    """One run, in one run folder. ``Trainer(cfg, out).run()`` or ``Trainer.resume(out).run()``."""

    def __init__(self, cfg: Config, run_dir: str | Path, *, progress: bool = True, runtime: ClientRuntime | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress_enabled = progress
        self.device = build.resolve_device(cfg.device)
        self.timers = Timers(sync_cuda=self.device.type == "cuda")

        self.train_data = build.load_data(cfg, "train")
        self.test_data = build.load_data(cfg, "test")
        self.num_classes = len(self.train_data.classes)
        self.parts = build.client_partition(cfg, self.train_data.labels, self.num_classes)
        self.steps_per_epoch = build.steps_per_epoch(cfg, self.parts)
        self.server = build.build_server(cfg, self.device)
        front, _ = build.build_models(cfg)
        self.eval_front = front.to(self.device)
        self.global_online: StateDict = {k: v.detach().clone() for k, v in self.eval_front.state_dict().items()}
        self.runtime = runtime or make_runtime(cfg, train=self.train_data, parts=self.parts, device=self.device)

        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.images = 0
        self.train_time = 0.0
        self.knn_init: float | None = None
        self.last_knn: float | None = None
        self.last_loss = float("nan")
        self.syncs = 0
        self.lost_total: list[int] = []
        self._metrics: MetricsLog | None = None
        self._t_run_start = time.perf_counter()
        self._last_save = time.monotonic()  # for train.checkpoint_minutes
        self._running_since: float | None = None  # perf_counter at run() start (train_time of checkpoints taken meanwhile)
        self._last_eval_step = -1
        self.on_step: Any = None  # optional callback(trainer) after every step (benchmarks)

    # ------------------------------------------------------------------ run folder
    def _open_run_dir(self, resumed: bool) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not resumed:
            atomic_write_text(self.run_dir / CONFIG, dumps_toml(self.cfg))
        self._metrics = MetricsLog(self.run_dir / METRICS)

    def _log(self, record: dict[str, Any]) -> None:
        if self._metrics is not None:
            self._metrics.write(record)

    @property
    def total_steps(self) -> int:
        total = self.cfg.train.epochs * self.steps_per_epoch
        return min(total, self.cfg.train.max_steps) if self.cfg.train.max_steps else total

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "config": to_flat(self.cfg),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "images": self.images,
            "train_time": self.train_time + (time.perf_counter() - self._running_since if self._running_since is not None else 0.0),
            "knn_init": self.knn_init if self.knn_init is not None else -1.0,
            "last_knn": self.last_knn if self.last_knn is not None else -1.0,
            "syncs": self.syncs,
            "server": self.server.state_dict(),
            "clients": self.runtime.state_dict(),
            "global_online": self.global_online,
            "bytes": dict(self.runtime.bytes),
            "torch_rng": torch.get_rng_state(),
            # complete metrics.jsonl records that belong to this state (resume drops the rest)
            "metrics_records": self._metrics.count if self._metrics is not None else 0,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.images = int(state["images"])
        self.train_time = float(state["train_time"])
        self.knn_init = None if state["knn_init"] < 0 else float(state["knn_init"])
        self.last_knn = None if state["last_knn"] < 0 else float(state["last_knn"])
        self.syncs = int(state["syncs"])
        self.server.load_state_dict(state["server"])
        self.runtime.load_state_dict(state["clients"])
        self.global_online = {k: v.to(self.device) for k, v in state["global_online"].items()}
        self.runtime.bytes.update({k: int(v) for k, v in state["bytes"].items()})
        torch.set_rng_state(state["torch_rng"])

    def save(self, metrics_records: int | None = None) -> None:
        """Checkpoint now (atomically; the one it replaces stays as ``checkpoint.prev.pt``).

        Only call it where the state is consistent: no client forward pending. The metrics
        records it counts are flushed and fsynced first. ``metrics_records`` overrides the count
        (the final checkpoint excludes the final evaluation, which a resume recomputes).
        """
        if self._metrics is not None:
            self._metrics.sync()
        state = self.state_dict()
        if metrics_records is not None:
            state["metrics_records"] = metrics_records
        save_checkpoint(self.run_dir, state)
        self._last_save = time.monotonic()

    def _checkpoint_due(self) -> bool:
        t = self.cfg.train
        if t.checkpoint_every > 0 and self.global_step % t.checkpoint_every == 0:
            return True
        return t.checkpoint_minutes > 0 and time.monotonic() - self._last_save >= 60.0 * t.checkpoint_minutes

    def _stop(self, signum: int) -> TrainingStopped:
        log.info("stopped by signal %d at step %d; checkpoint in %s", signum, self.global_step, self.run_dir)
        return TrainingStopped(signum, self.global_step, self.run_dir)

    # ------------------------------------------------------------------ evaluation
    def _encoder(self, kind: str):  # noqa: ANN202 - a closure over the eval models
        front, server = self.eval_front, self.server.online

        def encode(x: torch.Tensor) -> torch.Tensor:
            a = front(x)
            return F.normalize(server(a), dim=1) if kind == "projector" else server.features(a)

        return encode

    def _eval_sets(self) -> tuple[Any, Any]:
        bank, test = self.train_data, self.test_data
        if self.cfg.data.bank_size and self.cfg.data.bank_size < len(bank):
            g = torch.Generator().manual_seed(self.cfg.seed + 7)
            bank = bank.subset(torch.randperm(len(bank), generator=g)[: self.cfg.data.bank_size].sort().values.numpy())
        if self.cfg.data.test_size and self.cfg.data.test_size < len(test):
            test = test.subset(stratified_subset(test.labels, self.cfg.data.test_size))
        return bank, test

    @torch.no_grad()
    def _features(self, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        self.eval_front.load_state_dict(self.global_online)
        was = self.server.online.training
        self.eval_front.eval()
        self.server.online.eval()
        try:
            bank, test = self._eval_sets()
            enc = self._encoder(kind)
            bs = self.cfg.eval.batch_size
            fb = extract_features(enc, bank.images, mean=bank.mean, std=bank.std, batch_size=bs, device=self.device)
            ft = extract_features(enc, test.images, mean=bank.mean, std=bank.std, batch_size=bs, device=self.device)
        finally:
            self.server.online.train(was)
        return fb, bank.labels, ft, test.labels

    def knn(self) -> float:
        fb, lb, ft, lt = self._features(self.cfg.eval.knn_features)
        return knn_accuracy(fb, lb, ft, lt, self.num_classes, k=self.cfg.eval.knn_k, t=self.cfg.eval.knn_t)

    def linear(self) -> float:
        fb, lb, ft, lt = self._features("backbone")
        res = linear_probe(
            fb, lb, ft, lt, self.num_classes, epochs=self.cfg.eval.linear_epochs, lr=self.cfg.eval.linear_lr, seed=self.cfg.seed, device=self.device
        )
        return res.top1

    # ------------------------------------------------------------------ sync
    def sync(self, pool: list[int]) -> dict[str, float]:
        fr = self.runtime.fronts(pool)
        pause_point("sync", self.global_step)
        ids = [c for c in pool if c in fr]
        onl = [fr[c][0] for c in ids]
        mom = [fr[c][1] for c in ids]
        avg_online = fedavg(onl)
        avg_momentum = fedavg(mom)
        stats = divergence(onl, mom, avg_online, avg_momentum)
        align = self.cfg.algo.align_momentum
        self.runtime.load_global(avg_online, avg_momentum if align else None)
        self.global_online = avg_online
        self.syncs += 1
        return stats

    # ------------------------------------------------------------------ main loop
    def _alive(self, pool: list[int]) -> list[int]:
        alive = [c for c in pool if c not in self.runtime.lost]
        if not alive:
            raise AllClientsLost(f"all sampled clients were lost at step {self.global_step}; the last checkpoint in {self.run_dir} is kept")
        return alive

    def run(self, resumed: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        self._open_run_dir(resumed)
        set_active_run(self.run_dir)
        rearm()  # the runtime may have replaced the SIGTERM handler (ray.init does)
        t_start = self._t_run_start = self._running_since = time.perf_counter()
        self._last_save = time.monotonic()
        total = self.total_steps
        progress = Progress(total, enabled=self.progress_enabled)
        try:
            if not resumed and self.knn_init is None and (cfg.eval.every > 0 or cfg.eval.every_steps > 0):
                self.knn_init = self.knn()
                self._log({"epoch": 0, "step": 0, "knn_top1": self.knn_init, "init": True})
            if not resumed:
                self.save()  # step 0: a run killed at any later moment can be resumed
            done = self.global_step >= total
            while not done and self.epoch < cfg.train.epochs:
                pool = sample_clients(cfg.seed, self.epoch, cfg.fed.num_clients, cfg.clients_per_epoch)
                if self.step_in_epoch == 0:
                    self.runtime.begin_epoch(self.epoch, pool)
                    self.server.set_epoch(self.epoch)
                done = self._run_epoch(pool, progress, total)
                if self.step_in_epoch == 0:  # the epoch ran to its end (not stopped by max_steps)
                    self.runtime.end_epoch()
                    self.epoch += 1
                every = cfg.eval.every
                if (not done and every and self.epoch % every == 0 and self.epoch < cfg.train.epochs  # the last is _finish's
                        and self._last_eval_step != self.global_step):
                    self._evaluate()
                if not done:
                    self.save()
                signum = stop_requested()
                if signum is not None:
                    if done:
                        self.save()  # training complete; a resume runs the final evaluation
                    raise self._stop(signum)
            self.train_time += time.perf_counter() - t_start
            self._running_since = None
            summary = self._finish()
        finally:
            self._running_since = None
            progress.close()
            if self._metrics is not None:
                self._metrics.close()
        return summary

    def _run_epoch(self, pool: list[int], progress: Progress, total: int) -> bool:
        cfg = self.cfg
        T = self.timers
        spe = self.steps_per_epoch
        acts: dict[int, Activations] | None = None
        for s in range(self.step_in_epoch, spe):
            t0 = T.now()
            alive = self._alive(pool)
            if acts is None:
                acts = self.runtime.forward(alive)
            t1 = T.now()
            alive = self._alive(pool)
            res = self.server.step([acts[c] for c in alive if c in acts])
            t2 = T.now()
            self.global_step += 1
            pause_point("step", self.global_step)
            self.step_in_epoch = s + 1
            last_of_epoch = s == spe - 1
            finished = self.global_step >= total
            sync_due = last_of_epoch or finished or (cfg.fed.sync_every > 0 and (s + 1) % cfg.fed.sync_every == 0)
            stopping = stop_requested() is not None
            # a checkpoint needs a consistent state: the clients' backward done, no forward pending
            ckpt_due = stopping or self._checkpoint_due()
            if sync_due or ckpt_due:
                self.runtime.backward(res.grads)
                acts = None
            else:
                acts = self.runtime.backward_forward(res.grads, self._alive(pool))
            t3 = T.now()
            T.client += (t1 - t0) + (t3 - t2)
            T.server += t2 - t1
            self.images += sum(g.shape[0] for g in res.grads.values()) // (2 if cfg.algo.symmetric == "client" else 1)
            self.last_loss = res.loss
            rec: dict[str, Any] = {"epoch": self.epoch, "step": self.global_step, "loss": res.loss, "clients": len(res.grads)}
            if sync_due:
                t4 = T.now()
                stats = self.sync(self._alive(pool))
                T.sync += T.now() - t4
                rec.update({"sync": True, **stats})
            self._log(rec)
            if cfg.eval.every_steps and self.global_step % cfg.eval.every_steps == 0 and not finished:
                self._evaluate()
            elapsed = self.train_time + (time.perf_counter() - self._t_run_start)
            progress.update(self.global_step, res.loss, self.images / max(elapsed, 1e-9), self.epoch)
            if self.on_step is not None:
                self.on_step(self)
            if last_of_epoch:
                self.step_in_epoch = 0
            if finished:
                return True
            signum = stop_requested()
            if not last_of_epoch and (ckpt_due or (signum is not None and acts is None)):
                self.save()
                if signum is not None:
                    raise self._stop(signum)
        return False

    def _evaluate(self) -> None:
        self._last_eval_step = self.global_step
        self.last_knn = self.knn()
        self._log({"epoch": self.epoch, "step": self.global_step, "knn_top1": self.last_knn})

    def _finish(self) -> dict[str, Any]:
        cfg = self.cfg
        trained = self._metrics.count if self._metrics is not None else 0  # records before the final evaluation
        knn = self.knn()
        self._log({"epoch": self.epoch, "step": self.global_step, "knn_top1": knn, "final": True})
        summary: dict[str, Any] = {
            "knn_top1": knn,
            "knn_top1_init": self.knn_init,
            "steps": self.global_step,
            "epochs": self.epoch,
            "syncs": self.syncs,
            "final_loss": self.last_loss,
            "images": self.images,
            "images_per_s": self.images / self.train_time if self.train_time else 0.0,
            "steps_per_s": self.global_step / self.train_time if self.train_time else 0.0,
            "wall_s": self.train_time,
            "runtime": cfg.runtime,
            "method": "MonAcoSFL" if cfg.algo.align_momentum else "MocoSFL",
            "arch": cfg.model.arch,
            "cut": cfg.model.cut,
            "bytes_up": self.runtime.bytes["up"],
            "bytes_down": self.runtime.bytes["down"],
            "bytes_sync": self.runtime.bytes["sync"],
        }
        if cfg.eval.linear:
            signum = stop_requested()
            if signum is not None:  # before the (long) linear probe
                self.save(metrics_records=trained)
                raise self._stop(signum)
            t0 = time.perf_counter()
            summary["linear_top1"] = self.linear()
            summary["linear_s"] = time.perf_counter() - t0
        self.save(metrics_records=trained)
        atomic_write_text(self.run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
        return summary

    # ------------------------------------------------------------------ resume
    @classmethod
    def resume(cls, run_dir: str | Path, *, progress: bool = True, max_steps: int | None = None) -> "Trainer":
        from mona_sfl.checkpoint import PREVIOUS, CheckpointError, load_run_config
        from mona_sfl.config import with_overrides

        run_dir = Path(run_dir)
        cfg = load_run_config(run_dir)
        state = load_checkpoint(run_dir)
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
            raise CheckpointError(f"the checkpoint in {run_dir} holds no mona_sfl training state: restore {PREVIOUS} or start a new run")
        if state.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"checkpoint in {run_dir} has version {state.get('version')!r}, expected {CHECKPOINT_VERSION}")
        diff = _config_diff(state.get("config", {}), cfg)
        if diff:
            raise CheckpointError(f"{run_dir / CONFIG} does not match the checkpoint (differs in: {', '.join(diff[:8])}): restore the original config")
        if max_steps is not None:
            cfg = with_overrides(cfg, [f"train.max_steps={max_steps}"])
        trainer = cls(cfg, run_dir, progress=progress)
        try:
            trainer.load_state_dict(state)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
            trainer.runtime.close()
            if type(e).__module__.startswith("mona_sfl"):  # a runtime fault or our own error, not a damaged file
                raise
            why = str(e).splitlines()[0][:200] if str(e) else ""
            raise CheckpointError(
                f"the checkpoint in {run_dir} is damaged or incomplete ({type(e).__name__}: {why}): restore {PREVIOUS} or start a new run"
            ) from None
        if max_steps is not None and 0 < max_steps < trainer.global_step:
            trainer.runtime.close()
            raise CheckpointError(
                f"--set train.max_steps={max_steps} is below the checkpoint's step {trainer.global_step}: pass a larger value, or 0 for no limit"
            )
        keep = state.get("metrics_records")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
            trainer.runtime.close()
            raise CheckpointError(f"the checkpoint in {run_dir} is damaged (metrics_records={keep!r}): restore {PREVIOUS} or start a new run")
        remove_stale_temps(run_dir)  # a checkpoint write that was killed
        truncate_metrics(run_dir / METRICS, trainer.global_step, keep=None if keep is None else int(keep))
        if max_steps is not None:
            atomic_write_text(run_dir / CONFIG, dumps_toml(cfg))
        return trainer


def _config_diff(saved: dict[str, Any], cfg: Config) -> list[str]:
    """Keys where a checkpoint's config and ``cfg`` differ. A key the checkpoint lacks (added to
    the schema after it was written) counts as equal when ``cfg`` has its default."""
    flat, defaults = to_flat(cfg), to_flat(Config())
    diff = [k for k, v in flat.items() if (saved[k] if k in saved else defaults.get(k)) != v]
    return sorted(diff + [k for k in saved if k not in flat])


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["Trainer", "AllClientsLost", "count_params"]
