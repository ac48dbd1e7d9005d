"""Run folders: their names and files, atomic writes, the checkpoint, the crash-tolerant metrics log,
and the checks that decide whether a folder can take a new run or be resumed."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from mona_sfl.errors import CheckpointError, ConfigError
from mona_sfl.interrupt import pause_point, pause_wanted

if TYPE_CHECKING:
    from mona_sfl.config import Config

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
CONFIG = "config.toml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


#: Version of the training-state dict in ``checkpoint.pt`` (2: client state of the sharded runtime).
CHECKPOINT_VERSION = 2
#: Files whose presence marks a folder as (part of) a run.
RUN_FILES = (CONFIG, CHECKPOINT, PREVIOUS, METRICS, SUMMARY)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _atomic_write(path: Path, write: Callable[[BinaryIO], None], before_replace: Callable[[], None] | None = None) -> None:
    """``write`` into a temporary file in the same folder, fsync it, rename it over ``path``,
    fsync the folder. A crash at any point leaves ``path`` either old or new, never torn."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        cause = os_cause(e)
        if cause is not None and (cause is not e or not e.filename):  # e.g. torch.save's RuntimeError over ENOSPC
            raise OSError(cause.errno, cause.strerror, str(path)) from None
        raise
    _fsync_dir(path.parent)


def os_cause(e: BaseException) -> OSError | None:
    """The OSError behind ``e`` (itself, or one it was raised while handling), or None."""
    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 10:
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _keep_previous(ckpt: Path, prev: Path) -> None:
    """Make ``prev`` the current checkpoint while ``ckpt`` still exists (a hard link, renamed
    into place); where hard links are not supported, move it (``load_checkpoint`` then finds
    ``prev`` during the short moment without ``ckpt``)."""
    link = prev.with_name(f".{prev.name}.link.tmp")
    try:
        if link.exists():
            link.unlink()
        os.link(ckpt, link)
        os.replace(link, prev)
    except OSError:
        os.replace(ckpt, prev)


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Write ``checkpoint.pt`` atomically, keeping the one it replaces as ``checkpoint.prev.pt``.

    Order: the new checkpoint is written and fsynced under a temporary name; only then does
    the current one become ``checkpoint.prev.pt`` and the new one ``checkpoint.pt``; then the
    folder is fsynced. A kill at any moment leaves at least one complete checkpoint, and the
    newest complete one is what :func:`load_checkpoint` returns.
    """
    run_dir = Path(run_dir)
    ckpt, prev = run_dir / CHECKPOINT, run_dir / PREVIOUS
    step = int(state.get("global_step", -1))

    def swap_previous() -> None:
        pause_point("checkpoint_write", step)
        if ckpt.exists():
            _keep_previous(ckpt, prev)

    import torch

    _atomic_write(ckpt, lambda f: torch.save(state, f), before_replace=swap_previous)
    pause_point("checkpoint_renamed", step)


def remove_stale_temps(run_dir: Path) -> list[str]:
    """Delete temporary files a killed writer left in a run folder (``.NAME.*.tmp``); returns their names."""
    removed = []
    for name in (CHECKPOINT, PREVIOUS, CONFIG, METRICS, SUMMARY):
        for p in Path(run_dir).glob(f".{name}.*tmp"):
            try:
                p.unlink()
                removed.append(p.name)
            except OSError:
                pass
    return removed


def available_memory() -> int | None:
    """Bytes of memory the system can still give (``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory_for(path: Path) -> None:
    """CheckpointError, before reading, when the tensors of checkpoint ``path`` (the sizes in its
    zip directory: what ``torch.load`` allocates) exceed the memory available."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            claimed = sum(i.file_size for i in z.infolist())
    except (OSError, ValueError, zipfile.BadZipFile):
        return  # not a zip file: torch.load says what is wrong with it
    free = available_memory()
    if free is not None and claimed > free:
        raise CheckpointError(
            f"{path} holds {claimed:,} bytes of tensors, more than the {free:,} bytes of memory available: "
            f"it is not loaded; free memory (or use a larger machine), or delete it if it is not this run's checkpoint"
        )


_SMALL_BROADCAST = 1 << 20  # an expanded tensor claiming at most this many bytes is let through


def overclaiming_tensor(state: Any) -> str | None:
    """The first tensor in ``state`` that claims more elements than its storage holds (zero or
    overlapping strides, as a crafted file can declare: anything that copies it allocates all it
    claims, beyond 1 MiB), described; None when there is none. Our own states hold none."""
    import torch

    todo: list[tuple[str, Any]] = [("", state)]
    while todo:
        where, obj = todo.pop()
        if isinstance(obj, torch.Tensor):
            need = (obj.storage_offset() + obj.numel()) * obj.element_size()
            if need > max(obj.untyped_storage().nbytes(), _SMALL_BROADCAST):
                return (
                    f"tensor {where or '(top level)'} claims shape {tuple(obj.shape)} ({obj.numel():,} elements) over "
                    f"{obj.untyped_storage().nbytes():,} bytes of data: the file is damaged or crafted"
                )
        elif isinstance(obj, dict):
            todo += [(f"{where}.{k}" if where else str(k), v) for k, v in obj.items()]
        elif isinstance(obj, (list, tuple)):
            todo += [(f"{where}[{i}]", v) for i, v in enumerate(obj)]
    return None


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """Load without executing code (weights_only); fall back to the previous checkpoint."""
    run_dir = Path(run_dir)
    errors = []
    for name in (CHECKPOINT, PREVIOUS):
        p = run_dir / name
        if not p.exists():
            if name == CHECKPOINT and (run_dir / PREVIOUS).exists():
                errors.append(f"{name}: missing")
            continue
        check_memory_for(p)  # a checkpoint larger than the memory left is not read at all
        try:
            import torch

            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt, truncated or unreadable file
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        bad = overclaiming_tensor(state)
        if bad:  # a crafted or damaged file: using the tensor would allocate what it claims
            errors.append(f"{name}: {bad}")
            continue
        if errors:  # the newest checkpoint is lost: say so, and from where the run goes on
            step = state.get("global_step") if isinstance(state, dict) else None
            logging.getLogger("mona_sfl").warning(
                "%s is unusable (%s): falling back to %s (step %s); the steps after it are trained again",
                run_dir / CHECKPOINT, errors[0].partition(": ")[2], name, step,
            )
        return state
    if errors:
        raise CheckpointError(f"no readable checkpoint in {run_dir} ({'; '.join(errors)}): start a new run")
    raise CheckpointError(
        f"no checkpoint in {run_dir}: nothing to resume (was the run started with --out {run_dir}? A run stopped "
        f"during start-up, before its step-0 checkpoint, has none: delete the folder and start it again)"
    )


def synced_front(run_dir: Path) -> tuple[dict[str, Any], int]:
    """A run folder's synced client front (its checkpoint's ``global_online``) and the checkpoint's step."""
    ckpt = load_checkpoint(run_dir)
    if "global_online" not in ckpt:
        raise CheckpointError(f"the checkpoint in {run_dir} has no 'global_online' client front")
    return ckpt["global_online"], int(ckpt.get("global_step", -1))


def synced_encoder(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any], int]:
    """A run folder's synced client front, its server's online net and the checkpoint's step."""
    ckpt = load_checkpoint(run_dir)
    if "global_online" not in ckpt or "server" not in ckpt:
        raise CheckpointError(f"the checkpoint in {run_dir} has no client front or server")
    return ckpt["global_online"], ckpt["server"]["online"], int(ckpt.get("global_step", -1))


def load_weights(module: Any, state: dict[str, Any], what: str) -> None:
    """``module.load_state_dict(state)``; a mismatch is a CheckpointError naming ``what`` (e.g. "client front")."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"the checkpoint's {what} does not fit the run's model: {str(e).splitlines()[0]}") from None


def load_run_config(run_dir: Path) -> "Config":
    """The resolved config of a run folder; CheckpointError when the folder or its config is unusable."""
    run_dir = Path(run_dir)
    try:
        return _load_run_config(run_dir)
    except OSError as e:  # no search permission, a name too long, ...
        raise CheckpointError(f"cannot read run folder {run_dir}: {os_error_text(e)}") from None


def _load_run_config(run_dir: Path) -> "Config":
    from mona_sfl.config import load_config

    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist")
    if not (run_dir / CONFIG).is_file():
        raise CheckpointError(f"{run_dir} has no {CONFIG}: it is not a mona_sfl run folder")
    try:
        return load_config(run_dir / CONFIG)
    except ConfigError as e:
        raise CheckpointError(f"{run_dir / CONFIG} is not a valid config: {e}") from None


class MetricsLog:
    """Append-only JSON lines, one write and one flush per record: a crash loses at most a torn
    last line. ``count`` is the number of complete records in the file (checkpoints store it)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            if torn:  # a crash's torn last line: end it, so that it stays one (skipped) line
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write("\n")
        self.count = len(read_metrics(self.path))
        self._f = open(self.path, "a", buffering=1, encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        if "loss" in record and pause_wanted("metrics_write", int(record.get("step", -1))):
            half = len(line) // 2  # test hook: a torn line on disk while the process waits to be killed
            self._f.write(line[:half])
            self._f.flush()
            pause_point("metrics_write", int(record["step"]))
            line = line[half:]
        try:
            self._f.write(line)
            self._f.flush()
        except OSError as e:  # no space: name the file (the torn line is dropped on resume)
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        self.count += 1

    def sync(self) -> None:
        """Flush and fsync: the records a checkpoint counts are on disk before it is."""
        if not self._f.closed:
            try:
                self._f.flush()
                os.fsync(self._f.fileno())
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(self.path)) from None

    def close(self) -> None:
        if not self._f.closed:
            try:
                self._f.close()
            except OSError:
                pass  # a write that failed already raised; what it left is dropped on resume


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete records; a torn or garbled line (from a crash) is skipped."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):  # torn, garbled, a number of 5000 digits, nesting 100000 deep
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def truncate_metrics(path: Path, last_step: int, keep: int | None = None) -> None:
    """Drop what was logged after a checkpoint, rewriting atomically: keep the first ``keep``
    complete records (the count the checkpoint stored), or, for checkpoints without a count,
    the records up to ``last_step``. Torn lines go too."""
    recs = read_metrics(path)
    if keep is not None:
        recs = recs[: max(0, int(keep))]
    else:
        recs = [r for r in recs if int(r.get("step", 0)) <= last_step]
    atomic_write_text(Path(path), "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in recs))


# --------------------------------------------------------------------------- run folders


def default_run_dir(cfg: "Config", suffix: str = "") -> Path:
    """``runs/<time>-<arch>-cut<N>-<method>[-suffix]``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tail = f"-{suffix}" if suffix else ""
    return Path("runs") / f"{stamp}-{cfg.model.arch}-cut{cfg.model.cut}-{cfg.method_tag}{tail}"


def check_new_run_dir(out: Path) -> None:
    """Refuse an --out that cannot take a new run, before anything is written anywhere."""
    try:
        _check_new_run_dir(Path(out))
    except OSError as e:  # a name too long, a folder on the way without search permission, ...
        raise ConfigError(f"--out {out} cannot be used: {os_error_text(e)}; choose another --out") from None


def _check_new_run_dir(out: Path) -> None:
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"--out {out} is a broken symbolic link: remove it or choose another --out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder: choose another --out")
    if out.is_dir() and any((out / n).exists() for n in RUN_FILES):
        raise ConfigError(f"--out {out} already holds a run: continue it with `mona-sfl train --resume {out}` or choose another --out")
    base = out
    while not base.exists() and not base.is_symlink() and base != base.parent:
        base = base.parent  # the nearest existing folder, where the run folder will be created
    if not base.is_dir():
        raise ConfigError(f"--out {out} cannot be created: {base} is not a folder; choose another --out")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out} cannot be created: no permission to write in {base}; choose another --out")


def os_error_text(e: OSError) -> str:
    """One line for an OSError: its cause and the path it concerns."""
    where = f" ({e.filename})" if e.filename else ""
    return f"{e.strerror or e}{where}"


def _lock_holders(st: os.stat_result) -> list[int]:
    """Pids holding an flock on the file ``st`` describes (Linux ``/proc/locks``; empty elsewhere)."""
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    pids = []
    for line in lines:
        f = line.split()
        if len(f) >= 6 and f[1] == "FLOCK" and f[-3] == dev and f[-4].isdigit():
            pids.append(int(f[-4]))
    return pids


@contextmanager
def lock_run_dir(run_dir: Path, what: str = "the run") -> Iterator[Path]:
    """Hold an exclusive lock on the folder ``run_dir`` (created if missing) while ``what`` writes it.

    The lock is an ``flock`` on the folder itself, so it leaves no file behind: the kernel
    releases it when the holder ends in any way (even SIGKILL), so there are no stale locks. A
    second writer gets a CheckpointError naming the holder's pid, before it changes anything.
    The folder must be writable (checked with a temporary file, removed at once): a read-only
    folder is refused here, before any work. A folder this call created is removed again if
    ``what`` fails before writing anything into it.
    """
    import fcntl

    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise CheckpointError(f"cannot use run folder {run_dir}: {os_error_text(e)}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holders = [p for p in _lock_holders(os.fstat(fd)) if p != os.getpid()] or _lock_holders(os.fstat(fd))
            who = f"pid {', '.join(map(str, holders))}" if holders else "pid unknown"
            raise CheckpointError(
                f"run folder {run_dir} is in use by another mona-sfl process ({who}): wait until it ends "
                f"(or stop it), or choose another folder"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(run_dir))
        except OSError:
            same = False
        if not same:
            raise CheckpointError(f"run folder {run_dir} was removed or replaced while it was being locked: try again")
        try:
            probe_fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".write-test.", suffix=".tmp")
            os.close(probe_fd)
            os.unlink(probe)
        except OSError as e:
            raise CheckpointError(f"cannot write in run folder {run_dir} ({e.strerror or e}): {what} needs a writable folder") from None
        try:
            yield run_dir
        except BaseException:
            if created:
                try:
                    os.rmdir(run_dir)  # only if still empty: nothing of a run is lost
                except OSError:
                    pass
            raise
    finally:
        os.close(fd)  # releases the flock


def check_resumable(run_dir: Path, max_steps: int | None) -> "Config":
    """The run's config, unless the folder is no run or the run has finished (nothing would be trained)."""
    try:
        return _check_resumable(Path(run_dir), max_steps)
    except OSError as e:  # a name too long, a folder without search permission, ...
        raise CheckpointError(f"--resume {run_dir} cannot be used: {os_error_text(e)}") from None


def _check_resumable(run_dir: Path, max_steps: int | None) -> "Config":
    from mona_sfl.config import with_overrides

    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"--resume {run_dir} is a file, not a run folder: pass the folder given as --out")
    cfg = load_run_config(run_dir)  # CheckpointError when the folder or its config.toml is unusable
    for name in RUN_FILES:
        if (run_dir / name).exists() and not (run_dir / name).is_file():
            raise CheckpointError(f"{run_dir / name} is not a file: this run folder is damaged; restore the file or start a new run")
    if max_steps is not None:
        with_overrides(cfg, [f"train.max_steps={max_steps}"])  # ConfigError for a negative value
    try:
        done = json.loads((run_dir / SUMMARY).read_text(encoding="utf-8"))
        steps, epochs = int(done["steps"]), int(done["epochs"])
    except FileNotFoundError:
        return cfg  # no summary: the run has not finished
    except (OSError, ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
        raise CheckpointError(
            f"{run_dir / SUMMARY} is damaged ({type(e).__name__}), so whether the run has finished is unknown: delete it "
            f"to continue the run from its checkpoint, or restore it"
        ) from None
    limit = cfg.train.max_steps if max_steps is None else max_steps
    if epochs >= cfg.train.epochs:
        raise CheckpointError(
            f"the run in {run_dir} has finished (all {cfg.train.epochs} epochs; see {SUMMARY}): nothing to resume; "
            f"train.epochs cannot change on resume, so start a new run for more epochs"
        )
    if limit and steps >= limit:
        raise CheckpointError(
            f"the run in {run_dir} has finished ({steps} steps, train.max_steps={limit}; see {SUMMARY}): nothing to "
            f"resume; to train further pass --set train.max_steps=N with N > {steps}"
        )
    return cfg


def config_diff(saved: dict[str, Any], cfg: "Config") -> list[str]:
    """Keys where a checkpoint's config and ``cfg`` differ. A key the checkpoint lacks (added to
    the schema after it was written) counts as equal when ``cfg`` has its default."""
    from mona_sfl.config import Config, to_flat

    flat, defaults = to_flat(cfg), to_flat(Config())
    diff = [k for k, v in flat.items() if (saved[k] if k in saved else defaults.get(k)) != v]
    return sorted(diff + [k for k in saved if k not in flat])


def resume_state(run_dir: Path, max_steps: int | None = None) -> tuple["Config", dict[str, Any]]:
    """The config (with ``train.max_steps`` replaced when given) and the checkpoint of a run to resume,
    checked against each other; CheckpointError when they cannot continue the run."""
    from mona_sfl.config import with_overrides

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    state = load_checkpoint(run_dir)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise CheckpointError(f"the checkpoint in {run_dir} holds no mona_sfl training state: restore {PREVIOUS} or start a new run")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint in {run_dir} has version {state.get('version')!r}, expected {CHECKPOINT_VERSION} "
            f"(written by another version of mona_sfl): resume it with that version or start a new run"
        )
    # train.max_steps may change on resume: config.toml holds the newest value even when the resume
    # that wrote it stopped before its first checkpoint (a full disk, a kill)
    diff = [k for k in config_diff(state.get("config", {}), cfg) if k != "train.max_steps"]
    if diff:
        raise CheckpointError(f"{run_dir / CONFIG} does not match the checkpoint (differs in: {', '.join(diff[:8])}): restore the original config")
    keep = state.get("metrics_records")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
        raise CheckpointError(f"the checkpoint in {run_dir} is damaged (metrics_records={keep!r}): restore {PREVIOUS} or start a new run")
    if max_steps is not None:
        cfg = with_overrides(cfg, [f"train.max_steps={max_steps}"])
        step = state.get("global_step")
        if isinstance(step, int) and 0 < max_steps < step:
            raise CheckpointError(
                f"--set train.max_steps={max_steps} is below the checkpoint's step {step}: pass a larger value, or 0 for no limit"
            )
    return cfg, state


def damaged(run_dir: Path, e: BaseException) -> CheckpointError:
    """The error for a checkpoint whose state does not fit the run (missing keys, wrong shapes)."""
    why = str(e).splitlines()[0][:200] if str(e) else ""
    return CheckpointError(
        f"the checkpoint in {run_dir} is damaged or incomplete ({type(e).__name__}: {why}): restore {PREVIOUS} or start a new run"
    )


def prepare_resume(run_dir: Path, state: dict[str, Any], cfg: "Config", *, max_steps: int | None) -> None:
    """Make the folder continue from ``state``: drop a killed write's temporary files, the metrics
    logged after the checkpoint, and record a new ``train.max_steps``."""
    from mona_sfl.config import dumps_toml

    remove_stale_temps(run_dir)  # a checkpoint write that was killed
    keep = state.get("metrics_records")
    truncate_metrics(run_dir / METRICS, int(state.get("global_step", 0)), keep=None if keep is None else int(keep))
    if max_steps is not None:
        atomic_write_text(run_dir / CONFIG, dumps_toml(cfg))
