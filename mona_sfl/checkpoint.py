"""Run-folder files: atomic writes, the checkpoint, and the crash-tolerant metrics log."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
CONFIG = "config.toml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


class CheckpointError(ValueError):
    """A run folder or checkpoint that cannot be resumed (missing, corrupt, mismatched)."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Serialise to memory first, keep the previous good checkpoint, then swap atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    ckpt = Path(run_dir) / CHECKPOINT
    if ckpt.exists():
        os.replace(ckpt, Path(run_dir) / PREVIOUS)
    atomic_write_bytes(ckpt, buf.getvalue())


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """Load without executing code (weights_only); fall back to the previous checkpoint."""
    run_dir = Path(run_dir)
    errors = []
    for name in (CHECKPOINT, PREVIOUS):
        p = run_dir / name
        if not p.exists():
            continue
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt or truncated file
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if errors:
        raise CheckpointError(f"no readable checkpoint in {run_dir} ({'; '.join(errors)}): start a new run")
    raise CheckpointError(f"no checkpoint in {run_dir}: nothing to resume (was the run started with --out {run_dir}?)")


def load_run_config(run_dir: Path):  # -> mona_sfl.config.Config
    """The resolved config of a run folder; CheckpointError when the folder or its config is unusable."""
    from mona_sfl.config import ConfigError, load_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist")
    if not (run_dir / CONFIG).is_file():
        raise CheckpointError(f"{run_dir} has no {CONFIG}: it is not a mona_sfl run folder")
    try:
        return load_config(run_dir / CONFIG)
    except ConfigError as e:
        raise CheckpointError(f"{run_dir / CONFIG} is not a valid config: {e}") from None


class MetricsLog:
    """Append-only JSON lines, flushed per record so a crash loses at most a torn last line."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._f = open(self.path, "a", buffering=1, encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete records; a torn or garbled line (from a crash) is skipped."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only records up to ``last_step`` (the checkpoint's), rewriting atomically."""
    recs = [r for r in read_metrics(path) if int(r.get("step", 0)) <= last_step]
    atomic_write_text(Path(path), "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in recs))
