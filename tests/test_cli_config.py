"""``mona-sfl config show | keys`` and the help path: answered without importing torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mona_sfl.cli import main
from mona_sfl.config import bundled_names, key_table, load_config, resolve_config_path, to_flat


def _imported_modules(*argv: str) -> tuple[int, str, set[str]]:
    """Run ``mona-sfl ARGV`` under ``-X importtime``; its exit code, stdout and the modules it imported."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mona_sfl", *argv], capture_output=True, text=True, timeout=60,
    )
    mods = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    return r.returncode, r.stdout, mods


def test_help_imports_no_torch_and_names_the_configs_and_the_key_reference() -> None:
    for argv in (["--help"], ["train", "--help"], ["config", "show", "--help"]):
        code, out, mods = _imported_modules(*argv)
        assert code == 0, argv
        assert "mona_sfl.cli" in mods  # the importtime listing is read correctly
        assert not {m for m in mods if m.split(".")[0] in ("torch", "numpy", "ray", "flwr", "matplotlib")}, argv
        names = " ".join(out.split())  # argparse wraps lines
        for name in bundled_names():
            assert name in names, (argv, name)
        assert "mona-sfl config keys" in names, argv


def test_config_show_prints_the_resolved_config(capsys, tmp_path: Path) -> None:
    assert main(["config", "show", "--set", "model.cut=4", "--set", "algo.align_momentum=false"]) == 0
    shown = tmp_path / "shown.toml"
    shown.write_text(capsys.readouterr().out)
    expected = load_config(resolve_config_path(None), ["model.cut=4", "algo.align_momentum=false"])
    assert to_flat(load_config(shown)) == to_flat(expected)
    assert main(["config", "show", "--config", "resnet18_5clients"]) == 0
    shown.write_text(capsys.readouterr().out)
    assert to_flat(load_config(shown)) == to_flat(load_config(resolve_config_path("resnet18_5clients")))


def test_config_show_refuses_a_bad_key_with_exit_2(capsys) -> None:
    assert main(["config", "show", "--set", "model.cutt=4"]) == 2
    err = capsys.readouterr()
    assert "model.cut" in err.err and err.out == ""


def test_config_keys_prints_the_key_reference(capsys) -> None:
    assert main(["config", "keys"]) == 0
    assert capsys.readouterr().out == key_table()
