"""The Python API: ``mona_sfl.train`` and the lazy exports (the README's example runs)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import crash_in_server_step, tiny_overrides

import mona_sfl
from mona_sfl.config import ConfigError, dumps_toml, load_config, schema_config, resolve_config_path, to_flat
from mona_sfl.runtime.sharded import ShardedRuntime

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = tiny_overrides("eval.every=1")


def test_import_mona_sfl_imports_no_torch_and_exports_the_api() -> None:
    code = (
        "import sys, mona_sfl; print('TORCH', 'torch' in sys.modules); "
        "print(sorted(n for n in mona_sfl.__all__ if not n.startswith('_')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "TORCH False" in r.stdout
    for name in ("train", "train_seeds", "load_config", "make_config", "Trainer", "run_study", "Config"):
        assert name in r.stdout
        assert callable(getattr(mona_sfl, name))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mona_sfl.nope  # noqa: B018


def test_the_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    block = re.search(r"<!-- api-example[^>]*-->\n```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert block is not None, "the README's Python API example is missing"
    code = block.group(1)
    assert code.count('"default"') == 2
    tiny = tmp_path / "tiny.toml"  # the example's config, made tiny
    tiny.write_text(dumps_toml(schema_config(TINY)))
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(code.replace('"default"', f'"{tiny}"'), "README example", "exec"), scope)  # noqa: S102
    summary = scope["summary"]
    assert summary == json.loads((tmp_path / "runs/api-cut4/summary.json").read_text())
    assert summary["cut"] == 4 and summary["epochs"] == 1 and summary["steps"] == 3
    assert load_config(tmp_path / "runs/api-cut4/config.toml").model.cut == 4
    assert scope["moco"]["method"] == "MocoSFL" and (tmp_path / "runs/api-moco/summary.json").is_file()


def test_train_takes_a_config_object_and_a_list_and_refuses_bad_input(tmp_path: Path, one_thread: None) -> None:
    cfg = mona_sfl.make_config(None, TINY)
    assert to_flat(mona_sfl.make_config(cfg, {"model.cut": 3, "model.width": 0.25})) == to_flat(
        load_config(resolve_config_path(None), [*TINY, "model.cut=3", "model.width=0.25"])
    )
    summary = mona_sfl.train(cfg, ["train.epochs=1"], out=tmp_path / "a")
    assert summary["epochs"] == 1
    with pytest.raises(ConfigError, match="already holds a run"):
        mona_sfl.train(cfg, out=tmp_path / "a")
    with pytest.raises(ConfigError, match="did you mean 'model.cut'"):
        mona_sfl.train(cfg, {"model.cutt": 3}, out=tmp_path / "b")
    with pytest.raises(ConfigError, match="must be bool, int, float or str"):
        mona_sfl.make_config(cfg, {"model.cut": [3]})
    with pytest.raises(ConfigError, match="a dict or a list"):
        mona_sfl.make_config(cfg, "model.cut=3")
    assert not (tmp_path / "b").exists()


def test_train_closes_its_runtime_when_the_run_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    closed: list[ShardedRuntime] = []
    original = ShardedRuntime.close

    def close(self: ShardedRuntime) -> None:
        closed.append(self)
        original(self)

    monkeypatch.setattr(ShardedRuntime, "close", close)
    with crash_in_server_step(monkeypatch, 2):
        mona_sfl.train(None, TINY, out=tmp_path / "r")
    assert len(closed) == 1
    mona_sfl.train(None, [*TINY, "train.epochs=1"], out=tmp_path / "ok")
    assert len(closed) == 2
