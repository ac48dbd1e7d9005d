"""The errors a user can fix, one family: the command line prints them and exits with code 2.

Library code raises these (never prints, never exits); :mod:`mona_sfl.cli` maps them to exit
codes. The owning modules re-export them (``mona_sfl.config.ConfigError``,
``mona_sfl.data.DataError``, ``mona_sfl.checkpoint.CheckpointError``).

This module imports nothing.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the input (config, data, run folder, checkpoint) that the user can fix."""


class ConfigError(UserError):
    """A configuration problem: an unknown key, a wrong type, a value out of range."""


class DataError(UserError):
    """A dataset, partition or data setting is unusable; the message says how to fix it."""


class CheckpointError(UserError):
    """A run folder or checkpoint that cannot be resumed (missing, corrupt, mismatched)."""


__all__ = ["UserError", "ConfigError", "DataError", "CheckpointError"]
