"""Config <-> Flower ``run_config``.

``run_config`` carries the flat config keys unchanged (``model.cut``, ``algo.align_momentum``,
... exactly the keys of :func:`mona_sfl.config.to_flat`; Flower flattens nested TOML tables
with dots, so ``[tool.flwr.app.config]`` may hold ``model.cut = 2`` and ``flwr run . --run-config
'model.cut=4'`` overrides it). Kebab-case leaves (``fed.num-clients``) are accepted too.
A few keys are not part of the config: :data:`APP_KEYS`.
"""

from __future__ import annotations

from typing import Any

from mona_sfl.config import Config, ConfigError, from_flat, to_flat, toml_value

APP_KEYS = {
    "out": "",  # run folder ("" = runs/<time>-<arch>-cut<N>-<method>-flower)
    "progress": False,  # print progress lines from the ServerApp
    "probe_mb": 0.0,  # > 0: first round-trip this many MB through every node, write <out>/flower_probe.json
    "probe_only": False,  # true: stop after the probe (no training)
    "resume": False,  # true: continue the run in `out` from its checkpoint (train.max_steps, if set, extends it)
}


def _norm(key: str) -> str:
    return key.replace("-", "_")


def config_from_run_config(run_config: dict[str, Any]) -> Config:
    """The run's Config (runtime forced to 'flower'); app keys are skipped."""
    flat: dict[str, Any] = {}
    for k, v in run_config.items():
        if _norm(k) in APP_KEYS:
            continue
        flat[_norm(k)] = v
    flat["runtime"] = "flower"
    try:
        return from_flat(flat)
    except ConfigError as e:
        raise ConfigError(f"Flower run_config: {e}") from None


def config_to_run_config(cfg: Config, **app: Any) -> dict[str, Any]:
    """Flat config keys plus app keys (``out=...``)."""
    unknown = set(app) - set(APP_KEYS)
    if unknown:
        raise ValueError(f"unknown app keys: {sorted(unknown)}")
    return {**to_flat(cfg), "runtime": "flower", **{**APP_KEYS, **app}}


def app_config_toml(cfg: Config, **app: Any) -> str:
    """The ``[tool.flwr.app.config]`` table body for ``cfg`` (every key, so any can be overridden)."""
    rc = config_to_run_config(cfg, **app)
    return "\n".join(f"{k} = {toml_value(v)}" for k, v in rc.items()) + "\n"


def pyproject_snippet(cfg: Config, *, publisher: str = "mona-sfl", include_code: bool = True, **app: Any) -> str:
    """What ``pyproject.toml`` needs for ``flwr run .`` (components + the full run config).

    ``include_code``: ship the package in the FAB (the repository's pyproject); without it
    the FAB holds only pyproject.toml and every node imports the installed ``mona_sfl``.
    """
    include = 'fab-include = ["mona_sfl/**/*.py"]\n'  # the app's code; its config comes from run_config
    return (
        "[tool.flwr.app]\n"
        f'publisher = "{publisher}"\n'
        + (include if include_code else "")
        + "\n[tool.flwr.app.components]\n"
        'serverapp = "mona_sfl.runtime.flower.server_app:app"\n'
        'clientapp = "mona_sfl.runtime.flower.client_app:app"\n'
        "\n[tool.flwr.app.config]\n" + app_config_toml(cfg, **app)
    )


__all__ = ["APP_KEYS", "config_from_run_config", "config_to_run_config", "app_config_toml", "pyproject_snippet"]
