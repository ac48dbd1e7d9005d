"""Where a run's metrics records go: ``metrics.jsonl`` always, plus the ``log.backends`` ones
(``csv``: ``metrics.csv``; ``tensorboard``: event files in ``tensorboard/``; ``wandb``: a W&B
run, offline by default, files in ``wandb/``).

``metrics.jsonl`` (:class:`mona_sfl.checkpoint.MetricsLog`) is the record of truth: a resume
cuts it back to the checkpoint. Every other backend is rebuilt from it when the run folder is
opened (the records it holds are replayed first), so that all hold the same records.
TensorBoard and W&B get every number of a record (booleans such as ``sync`` are left out) at
the record's ``step``; the CSV holds every field, one column per field name.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import shutil
from pathlib import Path
from typing import Any, Protocol

from mona_sfl.checkpoint import METRICS, MetricsLog, atomic_write_text, read_metrics
from mona_sfl.config import Config, ConfigError, to_flat

CSV_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"

#: Backend -> the package it needs (pip name = import name).
NEEDS = {"tensorboard": "tensorboard", "wandb": "wandb"}


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def check_available(cfg: Config) -> None:
    """A ConfigError naming what to install when a backend of ``log.backends`` lacks its package."""
    for name in cfg.log.backend_names:
        package = NEEDS.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"log.backends includes '{name}' but the {package} package is not installed: "
                f"pip install {package} (or leave '{name}' out of log.backends)"
            )


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a record except ``step`` (booleans are flags, not values)."""
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class CsvLog:
    """``metrics.csv``: one row per record, one column per field name seen so far (a new
    name rewrites the file with the wider header; that happens in the first steps only)."""

    def __init__(self, path: Path, past: list[dict[str, Any]]) -> None:
        self.path = path
        self.records = list(past)
        self.columns: list[str] = list(dict.fromkeys(k for r in self.records for k in r))
        self._f: Any = None
        self._rewrite()

    def _rewrite(self) -> None:
        if self._f is not None:
            self._f.close()
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        w.writeheader()
        w.writerows(self.records)
        atomic_write_text(self.path, buf.getvalue())
        self._f = open(self.path, "a", buffering=1, newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._f, fieldnames=self.columns, lineterminator="\n")

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        new = [k for k in record if k not in self.columns]
        if new:
            self.columns += new
            self._rewrite()
        else:
            self._writer.writerow(record)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoardLog:
    """TensorBoard event files in ``tensorboard/`` (rebuilt on open), one scalar per number."""

    def __init__(self, logdir: Path, past: list[dict[str, Any]]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        shutil.rmtree(logdir, ignore_errors=True)
        self.writer = SummaryWriter(log_dir=str(logdir), flush_secs=30)
        for r in past:
            self.write(r)

    def write(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for k, v in numbers(record).items():
            self.writer.add_scalar(k, v, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLog:
    """A W&B run named after the run folder, its files in ``wandb/`` (offline unless
    ``log.wandb_mode=online``); the config goes along as the W&B config. A resumed run folder
    gets a new W&B run holding the whole history again."""

    def __init__(self, cfg: Config, run_dir: Path, past: list[dict[str, Any]]) -> None:
        import wandb

        (run_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.log.wandb_project, dir=str(run_dir), mode=cfg.log.wandb_mode, name=run_dir.name, config=to_flat(cfg),
        )
        for r in past:
            self.write(r)

    def write(self, record: dict[str, Any]) -> None:
        self.run.log(numbers(record), step=int(record.get("step", 0)))

    def flush(self) -> None:
        pass  # W&B writes in its own process

    def close(self) -> None:
        self.run.finish()


class RunLog:
    """``metrics.jsonl`` and the configured backends: every record goes to each."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        check_available(cfg)
        self.jsonl = MetricsLog(run_dir / METRICS)
        self.sinks: list[Sink] = []
        names = cfg.log.backend_names
        past = read_metrics(run_dir / METRICS) if len(names) > 1 else []
        try:
            if "csv" in names:
                self.sinks.append(CsvLog(run_dir / CSV_FILE, past))
            if "tensorboard" in names:
                self.sinks.append(TensorBoardLog(run_dir / TENSORBOARD_DIR, past))
            if "wandb" in names:
                self.sinks.append(WandbLog(cfg, run_dir, past))
        except BaseException:
            self.close()
            raise

    @property
    def count(self) -> int:
        """Complete records in metrics.jsonl (checkpoints store it)."""
        return self.jsonl.count

    def write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(record)
        for s in self.sinks:
            s.write(record)

    def sync(self) -> None:
        """metrics.jsonl on disk (before a checkpoint that counts its records); the rest flushed."""
        self.jsonl.sync()
        for s in self.sinks:
            s.flush()

    def close(self) -> None:
        self.jsonl.close()
        for s in self.sinks:
            s.close()


__all__ = ["CSV_FILE", "TENSORBOARD_DIR", "WANDB_DIR", "RunLog", "check_available", "numbers"]
