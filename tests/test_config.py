"""The typed config: files, overrides, refusals, and every shipped config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from mona_sfl.config import Config, ConfigError, dumps_toml, from_flat, load_config, schema_config, to_flat

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p for p in (ROOT / "configs").iterdir() if p.suffix in (".toml", ".yaml", ".yml"))


def test_defaults_follow_the_reference() -> None:
    cfg = Config()
    assert (cfg.algo.K, cfg.algo.dim, cfg.algo.T, cfg.algo.m) == (6000, 1024, 0.1, 0.99)
    assert cfg.algo.align_momentum is True and cfg.algo.symmetric == "client"
    assert cfg.model.norm == "group" and cfg.model.weight_std is True


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_loads_and_validates(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # the saved form reloads to the same config
    out = path.parent.parent / ".pytest_cache"  # not written: round trip in memory below
    assert from_flat(to_flat(cfg)) == cfg
    del out


def test_overrides_and_types(tmp_path: Path) -> None:
    cfg = schema_config(["model.cut=4", "algo.align_momentum=false", "train.lr=0.5", "data.name=cifar10", "seed=3"])
    assert cfg.model.cut == 4 and cfg.algo.align_momentum is False and cfg.train.lr == 0.5 and cfg.seed == 3
    assert cfg.data.name == "cifar10"
    saved = tmp_path / "c.toml"
    saved.write_text(dumps_toml(cfg))
    assert load_config(saved) == cfg
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  cut: 3\ntrain:\n  lr: 1\n")
    cfg = load_config(y)
    assert cfg.model.cut == 3 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.cutt=3"], "unknown config key 'model.cutt' (did you mean 'model.cut'?)"),
        (["nope.x=1"], "unknown config key 'nope.x'"),
        (["model=3"], "is a section"),
        (["model.cut=abc"], "model.cut=abc: value must be of type int"),
        (["model.cut=0"], "legal cut layers are 1..9"),
        (["model.cut=10"], "legal cut layers are 1..9"),
        (["model.arch=vgg"], "model.arch='vgg' is not supported"),
        (["train.lr=-1"], "train.lr must be > 0"),
        (["data.alpha=0"], "data.alpha"),
        (["algo.K=0"], "algo.K"),
        (["fed.sample_ratio=0.1", "fed.num_clients=5"], "samples zero clients"),
        (["algo.align_momentum=maybe"], "must be of type bool"),
        (["train.lr=nan"], "finite"),
        (["cut"], "expects key=value"),
    ],
)
def test_bad_overrides_are_refused_with_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        schema_config(overrides)
    assert message in str(e.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\ncut = 2")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[model]\ncut = 2.5\n")
    with pytest.raises(ConfigError, match="'model.cut' must be of type int"):
        load_config(wrong)
    ext = tmp_path / "c.json"
    ext.write_text("{}")
    with pytest.raises(ConfigError, match="unknown format"):
        load_config(ext)


def test_readme_key_table_is_the_schema() -> None:
    """The README's key reference is generated from the schema: every key, its default, its choices."""
    from pathlib import Path

    from mona_sfl.config import key_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    begin = "<!-- keys: generated from the schema by mona_sfl.config.key_table(); a test checks it -->\n"
    assert begin in readme and "\n<!-- keys: end -->" in readme
    table = readme.split(begin, 1)[1].split("\n<!-- keys: end -->", 1)[0]
    assert table == key_table(), "README 'Key reference' table is stale; replace it with mona_sfl.config.key_table()"
    for k in to_flat(Config()):
        assert f"| `{k}` |" in table


def test_load_config_without_a_file_is_the_cli_default_config() -> None:
    """One source of defaults: load_config(None) is what `mona-sfl train` / `config show` use without --config."""
    import os
    import subprocess
    import sys
    import tomllib

    from mona_sfl.config import from_dict, resolve_config_path

    default = load_config(None)
    assert default == load_config(resolve_config_path(None))
    assert default != Config() and default.model.width == 0.125  # the bundled default.toml, not the schema's
    assert schema_config() == Config()
    assert load_config(None, ["model.cut=5"]) == load_config(resolve_config_path(None), ["model.cut=5"])
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    shown = subprocess.run([sys.executable, "-m", "mona_sfl", "config", "show"], capture_output=True, text=True, env=env, cwd=root, check=True)
    assert from_dict(tomllib.loads(shown.stdout)) == default
