"""``mona-sfl config show | keys``: the resolved config of ``--config``/``--set``, and the key reference."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    from mona_sfl.cli import add_settings

    p = sub.add_parser(
        "config",
        help="print the resolved config (show) or the key reference (keys)",
        description="'show' prints the config a run with these --config/--set would use, as TOML "
        "(reusable with --config FILE); 'keys' prints every key with its default and meaning.",
    )
    what = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = what.add_parser("show", help="the resolved config as TOML", description="Print the resolved config as TOML.")
    add_settings(show)
    what.add_parser("keys", help="every config key, its default and meaning (Markdown)", description="Print the key reference.")


def run(args: argparse.Namespace) -> int:
    from mona_sfl.config import dumps_toml, key_table, load_config, resolve_config_path

    if args.action == "keys":
        print(key_table(), end="")
    else:
        print(dumps_toml(load_config(resolve_config_path(args.config), args.overrides)), end="")
    return 0
