"""Named choices with lazily imported implementations.

A :class:`Registry` maps the names a config key accepts (``model.arch``, ``data.name``,
``runtime``, ...) to ``"module:attribute"`` targets. Each owner declares its registry once
(``mona_sfl.models.BACKBONES``, ``mona_sfl.data.DATASETS``, ...); the config validates against
it, and :meth:`Registry.get` imports the implementation only when it is used, so reading
and checking a config never imports torch, Ray or Flower.

This module imports nothing but the standard library and :mod:`mona_sfl.errors`.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from mona_sfl.errors import ConfigError


def suggest(value: object, options: list[str], prefix: str = "") -> str:
    """`` (did you mean 'x'?)`` for the closest option, or an empty string."""
    close = difflib.get_close_matches(str(value), options, n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


class Choices(tuple):
    """The legal values of one config key, in order (a tuple of names that knows its key);
    ``check`` raises a ConfigError naming them."""

    key: str

    def __new__(cls, key: str, names: tuple[str, ...] | list[str]) -> "Choices":
        obj = super().__new__(cls, tuple(names))
        obj.key = key
        return obj

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key!r}, {list(self)})"

    def check(self, value: object) -> None:
        if value not in self:
            raise ConfigError(
                f"{self.key}={value!r} is not supported: choose one of {', '.join(self)}{suggest(value, list(self))}"
            )


class Registry(Choices):
    """Choices whose names stand for implementations (``"module:attr"``), imported on first use.

    ``needs`` maps a name to the pip requirement of an optional dependency; a missing one
    becomes a RuntimeError that says what to install.
    """

    targets: dict[str, str]
    needs: dict[str, str]

    def __new__(cls, key: str, targets: Mapping[str, str], needs: Mapping[str, str] | None = None) -> "Registry":
        obj = super().__new__(cls, key, tuple(targets))
        obj.targets = dict(targets)
        obj.needs = dict(needs or {})
        return obj

    def get(self, name: str) -> Any:
        """The implementation registered under ``name``."""
        self.check(name)
        module, _, attr = self.targets[name].partition(":")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            if name in self.needs and top and not top.startswith("mona_sfl"):
                raise RuntimeError(f"{self.key}='{name}' needs the '{top}' package: pip install '{self.needs[name]}'") from None
            raise
        return getattr(mod, attr)




def lazy_exports(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A package's ``__getattr__`` that imports ``package.<names[attr]>`` on first use of ``attr``,
    so that importing the package (for its vocabulary) stays cheap."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


__all__ = ["Choices", "Registry", "lazy_exports", "suggest"]
