"""The Python API: one call trains a run and returns its summary (for notebooks and scripts).

    import mona_sfl
    summary = mona_sfl.train("default", overrides={"model.cut": 4}, out="runs/cut4")

:func:`train` does what ``mona-sfl train`` does for a new run (same config resolution, same
run folder) and closes the runtime it started (Ray actors, Flower's simulation) however the
run ends. The command line is built on it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mona_sfl.config import Config, ConfigError, load_config, resolve_config_path, toml_value, with_overrides


def override_strings(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    """``{"model.cut": 4}`` or ``["model.cut=4"]`` as ``key=value`` strings (typed by the schema when loaded)."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        out = []
        for k, v in overrides.items():
            if not isinstance(k, str):
                raise ConfigError(f"override key {k!r} must be a dotted name such as 'model.cut'")
            if not isinstance(v, (bool, int, float, str)):
                raise ConfigError(f"override {k}={v!r}: values must be bool, int, float or str, got {type(v).__name__}")
            out.append(f"{k}={v if isinstance(v, str) else toml_value(v)}")
        return out
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a dict or a list of 'key=value' strings, got the string {overrides!r}")
    return [str(o) for o in overrides]


def make_config(config: str | Path | Config | None = None, overrides: Mapping[str, Any] | Sequence[str] | None = None) -> Config:
    """A validated Config: ``config`` is a file, a bundled config name (None: ``default``) or a Config."""
    if isinstance(config, Config):
        return with_overrides(config, override_strings(overrides))
    return load_config(resolve_config_path(config), override_strings(overrides))


def train(
    config: str | Path | Config | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    out: str | Path | None = None,
    *,
    progress: bool = False,
    report: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train a new run and return its summary (what ``summary.json`` holds).

    ``config``: a TOML/YAML file, a bundled config name (None: ``default``) or a Config;
    ``overrides``: ``{"model.cut": 4}`` or ``["model.cut=4"]``; ``out``: the run folder
    (default ``runs/<time>-<arch>-cut<N>-<method>``; it must not hold a run already);
    ``progress``: the progress bar; ``report``: receives a line describing the run.
    Raises :class:`mona_sfl.errors.UserError` (e.g. ConfigError) on bad input.
    """
    from mona_sfl.checkpoint import check_new_run_dir, default_run_dir, lock_run_dir

    cfg = make_config(config, overrides)
    run_dir = Path(out) if out is not None else default_run_dir(cfg)
    check_new_run_dir(run_dir)
    with lock_run_dir(run_dir, "training"):  # one writer per folder, held for the whole run
        check_new_run_dir(run_dir)  # again under the lock: a run started at the same moment has it now
        return _train_locked(cfg, run_dir, progress=progress, say=report or (lambda _line: None))


def _train_locked(cfg: Config, run_dir: Path, *, progress: bool, say: Callable[[str], None]) -> dict[str, Any]:
    what = f"training {cfg.model.arch} width {cfg.model.width} cut {cfg.model.cut} ({cfg.method}), {cfg.fed.num_clients} clients, seed {cfg.seed}, "
    if cfg.runtime == "flower":
        from mona_sfl.runtime.flower.launch import train_with_flower

        if cfg.data.name != "imagefolder":  # fail in seconds, not after starting Flower (decoding folders twice costs more)
            from mona_sfl import build

            data = build.load_data(cfg, "train")
            build.client_partition(cfg, data.labels, len(data.classes))
        say(f"{what}runtime flower (simulation engine, {cfg.num_nodes} SuperNodes), data {cfg.data.name}")
        return train_with_flower(cfg, run_dir, progress=progress)
    from mona_sfl.engine import Trainer

    with Trainer(cfg, run_dir, progress=progress) as trainer:
        say(f"{what}{trainer.total_steps} steps, runtime {cfg.runtime}, device {trainer.device}, data {cfg.data.name}")
        return trainer.run()


def train_seeds(
    config: str | Path | Config | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    out: str | Path | None = None,
    *,
    progress: bool = False,
    report: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One run per seed, in ``out/seed<N>``, one after the other; their summaries in seed order.

    The config's ``seed`` is replaced by each of ``seeds`` (so ``overrides`` may not set it).
    Every run folder is checked before the first run starts. Summarise them with
    :func:`mona_sfl.runs.mean_std`.
    """
    from mona_sfl.checkpoint import check_new_run_dir, default_run_dir

    if not seeds:
        raise ConfigError("give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds {list(seeds)} name a seed twice")
    if any(o.partition("=")[0].strip() == "seed" for o in override_strings(overrides)):
        raise ConfigError("the seeds replace the config key 'seed': do not set it as well")
    cfg = make_config(config, overrides)
    configs = [with_overrides(cfg, [f"seed={s}"]) for s in seeds]  # validates every seed first
    base = Path(out) if out is not None else default_run_dir(cfg)
    dirs = [base / f"seed{s}" for s in seeds]
    for d in dirs:
        check_new_run_dir(d)
    return [train(c, out=d, progress=progress, report=report) for c, d in zip(configs, dirs)]


__all__ = ["make_config", "override_strings", "train", "train_seeds"]
