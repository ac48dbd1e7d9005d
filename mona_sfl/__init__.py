"""mona_sfl: split federated self-supervised learning (MonAcoSFL, MocoSFL).

The Python API (imported on first use, so that ``import mona_sfl`` stays cheap and imports no torch):

- :func:`train` — train a run, return its summary; :func:`train_seeds` — one run per seed (:mod:`mona_sfl.api`);
- :func:`load_config`, :func:`make_config`, :class:`Config` — configs (:mod:`mona_sfl.config`);
- :class:`Trainer` — the training loop, for step-level control (:mod:`mona_sfl.engine`);
- :func:`run_study` — the split-depth study (:mod:`mona_sfl.studies.split_depth`).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "train": "mona_sfl.api",
    "train_seeds": "mona_sfl.api",
    "make_config": "mona_sfl.api",
    "load_config": "mona_sfl.config",
    "Config": "mona_sfl.config",
    "Trainer": "mona_sfl.engine",
    "run_study": "mona_sfl.studies.split_depth",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mona_sfl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [*_EXPORTS, "__version__"]
