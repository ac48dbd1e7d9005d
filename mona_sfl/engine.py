"""The training loop: epochs, steps, syncs, evaluation, checkpoints, in one run folder.

The engine runs the schedule (:mod:`mona_sfl.core.schedule`); *what* happens is in
``mona_sfl.core`` (server step, sync) and *where* the clients run is the runtime's business
(:mod:`mona_sfl.runtime`). One step reads as the algorithm: the clients' forward, the
server's step, the clients' backward, and a sync when the schedule says so.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from mona_sfl import build
from mona_sfl.checkpoint import (
    CHECKPOINT_VERSION,
    CONFIG,
    CheckpointError,
    SUMMARY,
    atomic_write_text,
    damaged,
    prepare_resume,
    resume_state,
    save_checkpoint,
)
from mona_sfl.config import Config, dumps_toml, to_flat
from mona_sfl.core import AGGREGATIONS
from mona_sfl.core.sync import GlobalFronts, StateDict, sync_fronts
from mona_sfl.eval.monitor import Monitor
from mona_sfl.eval.personal import personalise, refit
from mona_sfl.interrupt import TrainingStopped, pause_point, rearm, set_active_run, stop_requested
from mona_sfl.logs import RunLog, check_available
from mona_sfl.runtime import RUNTIMES, AllClientsLost
from mona_sfl.runtime.sharded import ShardedRuntime
from mona_sfl.threads import threads

log = logging.getLogger("mona_sfl")

#: A runtime instance, or a function making one from the run's config (``Trainer.resume``).
RuntimeArg = Union[Any, Callable[[Config], Any], None]


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


class Progress:
    """The training bar (or plain lines): steps done, epoch, loss, images/s (see :class:`mona_sfl.progress.Meter`)."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        from mona_sfl.progress import Meter

        self.meter = Meter(total, "training", unit="steps", enabled=enabled)

    def update(self, step: int, loss: float, ips: float, epoch: int) -> None:
        self.meter.update(step, epoch=epoch, loss=f"{loss:.4f}", **{"img/s": f"{ips:.1f}"})

    def close(self) -> None:
        self.meter.close()


class Trainer:
    """One run, in one run folder. ``Trainer(cfg, out).run()`` or ``Trainer.resume(out).run()``;
    as a context manager (``with Trainer(cfg, out) as t: t.run()``) it closes its runtime on exit.

    ``runtime``: where the clients run; by default the runtime named by ``cfg.runtime``. Pass
    an instance, or a function of the config (a Flower ServerApp passes one over its Grid).
    """

    def __init__(self, cfg: Config, run_dir: str | Path, *, progress: bool = True, runtime: RuntimeArg = None) -> None:
        check_available(cfg)  # a missing logging package, before loading anything
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress_enabled = progress
        self.device = build.resolve_device(cfg.device)
        self.timers = Timers(sync_cuda=self.device.type == "cuda")

        self.train_data = build.load_data(cfg, "train", progress=progress)
        self.test_data = build.load_data(cfg, "test", progress=progress)
        self.num_classes = len(self.train_data.classes)
        self.parts = build.client_partition(cfg, self.train_data.labels, self.num_classes)
        self.schedule = build.schedule(cfg, self.parts)
        if note := self.schedule.sync_note():
            log.warning(note)
        self.steps_per_epoch = self.schedule.steps_per_epoch
        self.server = build.build_server(cfg, self.device)
        front, _ = build.build_models(cfg)
        self.global_online: StateDict = {k: v.detach().clone() for k, v in front.state_dict().items()}
        # the momentum fronts' last global (MonAcoSFL): the base AXIS merges momentum deltas from
        self.global_momentum: StateDict = {k: v.detach().clone() for k, v in front.state_dict().items()}
        # fed.interventions: the last sync's pre-merge online fronts, by client (personalised at the end)
        self.premerge: dict[int, StateDict] = {}
        self.interventions: dict[int, StateDict] = {}
        # fed.intervention_every_sync: the first and last L1 of each client's latest fit
        self.intervention_l1: dict[int, list[float]] = {}
        self.monitor = Monitor(cfg, self.train_data, self.test_data, front, self.device)
        self.aggregate = AGGREGATIONS.get(cfg.fed.aggregation)(cfg.fed)
        if runtime is None:  # the config's runtime; in-process hosts reuse the data loaded here
            runtime = RUNTIMES.get(cfg.runtime)(cfg, train=self.train_data, parts=self.parts, device=self.device)
        elif not isinstance(runtime, ShardedRuntime):
            runtime = runtime(cfg)
        self.runtime: ShardedRuntime = runtime

        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.images = 0
        self.train_time = 0.0
        self.knn_init: float | None = None
        self.last_knn: float | None = None
        self.last_loss = float("nan")
        self.syncs = 0
        self._metrics: RunLog | None = None  # metrics.jsonl and the log.backends
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
        self._metrics = RunLog(self.cfg, self.run_dir)

    def _log(self, record: dict[str, Any]) -> None:
        if self._metrics is not None:
            self._metrics.write(record)

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.runtime.close()  # Ray: the actors and the private Ray instance

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

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
            "global_momentum": self.global_momentum,
            **({"premerge": self.premerge, "interventions": self.interventions} if self.cfg.fed.interventions else {}),
            **({"intervention_l1": self.intervention_l1} if self.cfg.fed.intervention_every_sync else {}),
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
        # checkpoints written before the momentum base was kept: only AXIS reads it
        self.global_momentum = {k: v.to(self.device) for k, v in state.get("global_momentum", state["global_online"]).items()}
        if self.cfg.fed.interventions:
            self.premerge = {int(c): {k: v.to(self.device) for k, v in sd.items()} for c, sd in state["premerge"].items()}
            self.interventions = {int(c): dict(sd) for c, sd in state["interventions"].items()}
        if self.cfg.fed.intervention_every_sync:
            self.intervention_l1 = {int(c): list(v) for c, v in state["intervention_l1"].items()}
        self.runtime.bytes.update({k: int(v) for k, v in state["bytes"].items()})
        torch.set_rng_state(state["torch_rng"])

    def save(self, metrics_records: int | None = None) -> None:
        """Checkpoint now (atomically; the one it replaces stays as ``checkpoint.prev.pt``).

        Call it between steps (the runtime sends the clients' last backward first). The metrics
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
    def knn(self) -> float:
        with threads(self.cfg.train.server_threads):
            return self.monitor.knn(self.global_online, self.server.online)

    def linear(self) -> float:
        with threads(self.cfg.train.server_threads):
            return self.monitor.linear(self.global_online, self.server.online)

    # ------------------------------------------------------------------ sync
    def sync(self, pool: list[int]) -> dict[str, Any]:
        """The sampled clients' fronts merged (MonAcoSFL: momentum fronts aligned too) and loaded
        into every client; returns the step record's sync entries (divergence metrics, and what
        the aggregation reports: e.g. AXIS's kept energy, with its per-layer detail)."""
        fronts = self.runtime.fronts(pool)
        pause_point("sync", self.global_step)
        if self.cfg.fed.interventions:  # references into live clients: copies, before the merge is loaded
            self.premerge = {c: {k: v.detach().clone() for k, v in fronts[c][0].items()} for c in pool if c in fronts}
        result = sync_fronts(
            [fronts[c] for c in pool if c in fronts],
            align=self.cfg.algo.align_momentum,
            aggregate=self.aggregate,
            base=GlobalFronts(self.global_online, self.global_momentum),
        )
        self.runtime.load(result.fronts)
        self.global_online = result.fronts.online
        if result.fronts.momentum is not None:
            self.global_momentum = result.fronts.momentum
        record: dict[str, Any] = dict(result.stats)
        for name, layers in result.layers.items():
            record[f"layers_{name}"] = layers
        if self.cfg.fed.intervention_every_sync:  # the sync's clients refit theirs on the new merged front
            t0 = time.perf_counter()
            with threads(self.cfg.train.server_threads):
                self.interventions, l1, stats = refit(
                    self.cfg, self.monitor.front, self.global_online, self.premerge, self.train_data, self.parts, self.device,
                    self.interventions, self.syncs,
                )
            self.intervention_l1.update(l1)
            record.update(stats, interv_s=time.perf_counter() - t0)
        self.syncs += 1
        return record

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
        progress = Progress(self.total_steps, enabled=self.progress_enabled)
        try:
            if not resumed and self.knn_init is None and (cfg.eval.every > 0 or cfg.eval.every_steps > 0):
                self.knn_init = self.knn()
                self._log({"epoch": 0, "step": 0, "knn_top1": self.knn_init, "init": True})
            if not resumed:
                self.save()  # step 0: a run killed at any later moment can be resumed
            done = self.global_step >= self.total_steps
            while not done and self.epoch < cfg.train.epochs:
                pool = self.schedule.pool(self.epoch)
                if self.step_in_epoch == 0:
                    self.runtime.begin_epoch(self.epoch, pool)
                    self.server.set_epoch(self.epoch)
                done = self._run_epoch(pool, progress)
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
            progress.close()  # the bar's rate is training only: evaluation reports itself
            summary = self._finish(verbose=self.progress_enabled)
        finally:
            self._running_since = None
            progress.close()
            if self._metrics is not None:
                self._metrics.close()
        return summary

    def _run_epoch(self, pool: list[int], progress: Progress) -> bool:
        """The steps of one epoch from ``step_in_epoch``; True when the run's last step was made."""
        cfg, T, clients = self.cfg, self.timers, self.runtime
        for s in range(self.step_in_epoch, self.steps_per_epoch):
            t0 = T.now()
            acts = clients.forward(self._alive(pool))  # the clients' fronts (with the last step's backward)
            t1 = T.now()
            T.client += t1 - t0  # before the server step: timers read at a server step hold everything before it
            with threads(cfg.train.server_threads):  # InfoNCE, server backward and step, enqueue
                res = self.server.step([acts[c] for c in self._alive(pool) if c in acts])
            t2 = T.now()
            clients.backward(res.grads)  # the gradients go down (with the next request)
            self.global_step += 1
            pause_point("step", self.global_step)
            self.step_in_epoch = s + 1
            last_of_epoch = self.step_in_epoch == self.steps_per_epoch
            finished = self.global_step >= self.total_steps
            T.server += t2 - t1
            self.images += sum(g.shape[0] for g in res.grads.values()) * cfg.train.batch_size // cfg.rows_per_client
            self.last_loss = res.loss
            rec: dict[str, Any] = {
                "epoch": self.epoch, "step": self.global_step, "loss": res.loss, "clients": len(res.grads),
                "lr": self.schedule.server_lr(self.epoch),
            }
            if self.schedule.sync_due(self.step_in_epoch, self.global_step):
                t3 = T.now()
                clients.flush()  # the backward now, so that the sync times only the sync
                t4 = T.now()
                stats = self.sync(self._alive(pool))
                T.client += t4 - t3
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
            if not last_of_epoch and (signum is not None or self._checkpoint_due()):
                self.save()
                if signum is not None:
                    raise self._stop(signum)
        return False

    def _evaluate(self) -> None:
        self._last_eval_step = self.global_step
        self.last_knn = self.knn()
        self._log({"epoch": self.epoch, "step": self.global_step, "knn_top1": self.last_knn})

    def _finish(self, verbose: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        self.runtime.flush()
        trained = self._metrics.count if self._metrics is not None else 0  # records before the final evaluation
        say = (lambda text: print(text, file=sys.stderr, flush=True)) if verbose else (lambda text: None)
        say(f"training done: {self.global_step} steps in {self.train_time:.1f} s; final kNN evaluation ...")
        t0 = time.perf_counter()
        knn = self.knn()
        say(f"kNN top-1 {knn:.2f}% ({time.perf_counter() - t0:.1f} s)" + (f"; linear probe ({cfg.eval.linear_epochs} epochs) ..." if cfg.eval.linear else ""))
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
            "method": cfg.method,
            "arch": cfg.model.arch,
            "cut": cfg.model.cut,
            "num_classes": self.num_classes,
            "bytes_up": self.runtime.bytes["up"],
            "bytes_down": self.runtime.bytes["down"],
            "bytes_sync": self.runtime.bytes["sync"],
        }
        if cfg.fed.interventions and self.premerge:
            t0 = time.perf_counter()
            with threads(cfg.train.server_threads):
                if cfg.fed.intervention_every_sync:  # the last sync fitted them on this merged front
                    rows, _ = personalise(
                        cfg, self.monitor, self.server.online, self.global_online, self.premerge, self.train_data, self.parts,
                        fitted=self.interventions, fitted_l1=self.intervention_l1,
                    )
                else:
                    rows, self.interventions = personalise(
                        cfg, self.monitor, self.server.online, self.global_online, self.premerge, self.train_data, self.parts
                    )
            summary["personal"] = rows
            for key in ("knn_merged", "knn_intervened", "knn_own"):
                vals = [r[key] for r in rows if key in r]
                if vals:
                    summary[f"personal_{key}"] = sum(vals) / len(vals)
            summary["personal_s"] = time.perf_counter() - t0
        if cfg.eval.linear:
            signum = stop_requested()
            if signum is not None:  # before the (long) linear probe
                self.save(metrics_records=trained)
                raise self._stop(signum)
            t0 = time.perf_counter()
            summary["linear_top1"] = self.linear()
            summary["linear_s"] = time.perf_counter() - t0
            say(f"linear probe top-1 {summary['linear_top1']:.2f}% ({summary['linear_s']:.1f} s)")
        self.save(metrics_records=trained)
        atomic_write_text(self.run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
        return summary

    # ------------------------------------------------------------------ resume
    @classmethod
    def resume(cls, run_dir: str | Path, *, progress: bool = True, max_steps: int | None = None, runtime: RuntimeArg = None) -> "Trainer":
        """The trainer of the run in ``run_dir``, at its last checkpoint (``max_steps`` may extend it)."""
        run_dir = Path(run_dir)
        cfg, state = resume_state(run_dir, max_steps)
        trainer = cls(cfg, run_dir, progress=progress, runtime=runtime)
        try:
            trainer.load_state_dict(state)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
            trainer.runtime.close()
            if type(e).__module__.startswith("mona_sfl"):  # a runtime fault or our own error, not a damaged file
                raise
            raise damaged(run_dir, e) from None
        try:
            trainer._check_extension(state)
        except CheckpointError:
            trainer.runtime.close()
            raise
        prepare_resume(run_dir, state, cfg, max_steps=max_steps)
        return trainer

    def _check_extension(self, state: dict[str, Any]) -> None:
        """A run stopped by ``train.max_steps`` made a sync after its last step because it was the
        last; a longer run makes it only where its schedule says so. Continuing such a run past
        that step would not give the longer run's training: refuse it (CheckpointError)."""
        old = state.get("config", {}).get("train.max_steps")
        step, in_epoch = self.global_step, self.step_in_epoch
        if not isinstance(old, int) or not old or step < old or step >= self.total_steps or in_epoch == 0:
            return  # not stopped by max_steps, not extended, or at an epoch end (a sync in every schedule)
        if self.schedule.sync_due(in_epoch, step):
            return
        raise CheckpointError(
            f"the run in {self.run_dir} stopped at step {step} (train.max_steps={old}) with a final sync that a run of "
            f"{self.total_steps} steps does not make there (fed.sync_every={self.cfg.fed.sync_every}), so continuing it "
            f"would not reproduce the longer run: start a new run with --set train.max_steps={self.cfg.train.max_steps}"
        )


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["Trainer", "AllClientsLost", "count_params"]
