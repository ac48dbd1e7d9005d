"""Bad input gets one clear message, exit code 2, no traceback, and nothing half-written.

Every case runs the real CLI entry (``mona_sfl.cli.main``) in-process inside its own folder,
which holds a copy of one tiny real run (trained once per module), an ``--out`` folder with an
unrelated file in it, and whatever the case prepares (configs, image trees, damaged files).
The whole folder is hashed before and after: a failing command must leave every byte as it
was and create nothing. A property test throws random overrides and files at the loader.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mona_sfl import config as cfgmod
from mona_sfl.cli import main
from mona_sfl.config import Config, ConfigError, dumps_toml, from_dict, from_flat, schema_config, to_dict, to_flat, validate

# The smallest real run: 40 synthetic images, 2 clients, 2 steps, no evaluation before the end.
from conftest import set_args as sets  # noqa: E402


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished tiny run (config.toml, checkpoints, metrics.jsonl, summary.json)."""
    run = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", "--quiet", "--out", str(run), *sets()]) == 0
    assert (run / "checkpoint.pt").is_file() and (run / "summary.json").is_file()
    return run


@dataclass
class Ctx:
    root: Path  # everything the case may touch lives here (hashed before and after)
    run: Path  # a copy of the tiny run, without summary.json: a run that was stopped early
    out: Path  # an existing folder with one unrelated file: a legal --out for a new run

    def write(self, name: str, data: str | bytes) -> Path:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            p.write_bytes(data)
        else:
            p.write_text(data, encoding="utf-8")
        return p


def snapshot(root: Path) -> dict[str, str]:
    """Every file (sha256), folder and link under ``root``."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = Path(dirpath, d)
            out[str(p.relative_to(root))] = "link" if p.is_symlink() else "dir"
        for f in filenames:
            p = Path(dirpath, f)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = f"link -> {os.readlink(p)}"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def images(root: Path, classes: tuple[str, ...] = ("a", "b"), n: int = 12, split: str = "") -> Path:
    """A tiny ImageFolder tree: ``root/[split/]<class>/<i>.png``, 8x8 RGB."""
    rng = np.random.default_rng(0)
    for c in classes:
        folder = root / split / c
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def imagefolder(ctx: Ctx, root: Path) -> list[str]:
    return ["train", "--quiet", "--out", str(ctx.out), *sets("data.name=imagefolder", f"data.dir={root}", "train.batch_size=2")]


def new_run(*overrides: str) -> Callable[[Ctx], list[str]]:
    """A new run into the existing *run* folder (config errors come first and must leave it intact)."""
    return lambda ctx: ["train", "--quiet", "--out", str(ctx.run), *sets(*overrides)]


def new_run_in_out(*overrides: str) -> Callable[[Ctx], list[str]]:
    """A new run into the legal --out folder (errors that need the data)."""
    return lambda ctx: ["train", "--quiet", "--out", str(ctx.out), *sets(*overrides)]


def with_file(name: str, text: str | bytes) -> Callable[[Ctx], list[str]]:
    return lambda ctx: ["train", "--quiet", "--config", str(ctx.write(name, text)), "--out", str(ctx.run)]


def resume(*extra: str) -> Callable[[Ctx], list[str]]:
    return lambda ctx: ["train", "--quiet", "--resume", str(ctx.run), *extra]


def edit_config(old: str, new: str) -> Callable[[Ctx], None]:
    def f(ctx: Ctx) -> None:
        p = ctx.run / "config.toml"
        text = p.read_text()
        assert old in text
        p.write_text(text.replace(old, new, 1))

    return f


def edit_checkpoint(change: Callable[[dict], object]) -> Callable[[Ctx], None]:
    """Rewrite checkpoint.pt through ``change(state)`` (its return value, when not None, is saved
    instead) and remove the previous checkpoint so that no fallback hides the damage."""

    def f(ctx: Ctx) -> None:
        state = torch.load(ctx.run / "checkpoint.pt", weights_only=True)
        new = change(state)
        torch.save(state if new is None else new, ctx.run / "checkpoint.pt")
        (ctx.run / "checkpoint.prev.pt").unlink(missing_ok=True)

    return f


def corrupt_checkpoints(ctx: Ctx) -> None:
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        p = ctx.run / name
        p.write_bytes(p.read_bytes()[:100] + b"\x00garbage")


def remove_checkpoints(ctx: Ctx) -> None:
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (ctx.run / name).unlink(missing_ok=True)


def restore_summary(base: Path) -> Callable[[Ctx], None]:
    return lambda ctx: shutil.copy2(base / "summary.json", ctx.run / "summary.json")


def mkdir(ctx: Ctx, name: str) -> Path:
    (ctx.root / name).mkdir()
    return ctx.root / name


def broken_link(ctx: Ctx) -> Path:
    root = images(ctx.root / "data")
    os.symlink(ctx.root / "nowhere.png", root / "a" / "gone.png")
    return root


@dataclass
class Case:
    id: str
    args: Callable[[Ctx], list[str]]
    phrase: str  # what stderr must say
    setup: Callable[[Ctx], None] | None = None
    needs_base: bool = False  # setup needs the finished base run (passed as ctx.root / "base")
    marks: list = field(default_factory=list)


CASES: list[Case] = [
    # ------------------------------------------------------------ overrides: keys, types, ranges
    Case("unknown-key", new_run("bogus=1"), "unknown config key 'bogus'"),
    Case("typo-key", new_run("model.cutt=3"), "unknown config key 'model.cutt' (did you mean 'model.cut'?)"),
    Case("section-as-key", new_run("model=3"), "config key 'model' is a section"),
    Case("leaf-as-section", new_run("seed.x=1"), "'seed' is not a section"),
    Case("not-key-value", lambda ctx: ["train", "--out", str(ctx.run), "--set", "model.cut"], "--set expects key=value"),
    Case("wrong-type-int", new_run("model.cut=two"), "--set model.cut=two: value must be of type int"),
    Case("wrong-type-bool", new_run("algo.align_momentum=maybe"), "value must be of type bool"),
    Case("wrong-type-float", new_run("train.lr=fast"), "--set train.lr=fast: value must be of type float"),
    Case("cut-beyond-arch", new_run("model.cut=10"), "model.cut=10 is out of range for resnet18: legal cut layers are 1..9"),
    Case("cut-zero", new_run("model.cut=0"), "legal cut layers are 1..9"),
    Case("zero-clients-sampled", new_run("fed.num_clients=5", "fed.sample_ratio=0.1"), "samples zero clients per epoch"),
    Case("negative-lr", new_run("train.lr=-0.1"), "train.lr must be > 0"),
    Case("alpha-zero", new_run("data.partition=dirichlet", "data.alpha=0"), "data.alpha (Dirichlet concentration) must be > 0"),
    Case("alpha-negative", new_run("data.alpha=-1"), "data.alpha (Dirichlet concentration) must be > 0"),
    Case("K-zero", new_run("algo.K=0"), "algo.K (queue length) must be positive"),
    Case("K-negative", new_run("algo.K=-5"), "algo.K (queue length) must be positive"),
    Case("not-finite", new_run("train.lr=nan"), "train.lr must be a finite number"),
    Case("int-over-64-bit", new_run(f"train.epochs={2**70}"), "does not fit in a 64-bit integer"),
    Case("bad-choice", new_run("data.partition=random"), "data.partition='random' is not supported: choose one of iid, noniid, dirichlet"),
    Case("nul-in-text", new_run("data.name=imagefolder", "data.dir=a\x00b"), "data.dir contains a NUL character"),
    # ------------------------------------------------------------ contradictory settings
    Case("dir-with-synthetic", new_run("data.dir=somewhere"), "data.name='synthetic' reads no files"),
    Case("download-imagefolder", new_run("data.name=imagefolder", "data.dir=x", "data.download=true"), "cannot fetch an imagefolder dataset"),
    # ------------------------------------------------------------ config files
    Case("config-missing", lambda ctx: ["train", "--config", str(ctx.root / "none.toml"), "--out", str(ctx.run)], "config file not found"),
    Case("config-is-directory", lambda ctx: ["train", "--config", str(ctx.out), "--out", str(ctx.run)], "is a directory: pass a .toml or .yaml file"),
    Case("bad-toml", with_file("c.toml", "[model\ncut = 2\n"), "is not valid TOML"),
    Case("bad-yaml", with_file("c.yaml", "model: [1,\n"), "is not valid YAML"),
    Case("yaml-not-mapping", with_file("c.yaml", "- model\n- cut\n"), "must hold a table of keys at the top level"),
    Case("yaml-section-not-mapping", with_file("c.yml", "model: 3\n"), "config section 'model' must be a table"),
    Case("yaml-int-key", with_file("c.yaml", "1: 2\n"), "keys must be names"),
    Case("toml-wrong-type", with_file("c.toml", "[model]\ncut = 2.5\n"), "config key 'model.cut' must be of type int"),
    Case("toml-unknown-key", with_file("c.toml", "[train]\nepoch = 3\n"), "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
    Case("config-unknown-format", with_file("c.json", "{}"), "unknown format '.json'"),
    Case("config-not-utf8", with_file("c.toml", b"seed = 1 # \xff\xfe\n"), "cannot read config file"),
    # ------------------------------------------------------------ needs the data: checked before anything is written
    Case("batch-larger-than-client", new_run_in_out("train.batch_size=30"), "train.batch_size=30 is larger than the smallest client's data (20 images"),
    Case("flower-batch-larger-than-client", new_run_in_out("runtime=flower", "train.batch_size=30"), "is larger than the smallest client's data"),
    Case("more-clients-than-data", new_run_in_out("fed.num_clients=50", "train.batch_size=1"), "fed.num_clients=50 exceeds the 40 training samples"),
    Case("tiny-proportion", new_run_in_out("data.proportion=0.05"), "is larger than the smallest client's data"),
    Case("cifar-without-dir", new_run_in_out("data.name=cifar10"), "data.name='cifar10' needs a data directory"),
    Case("cifar-empty-dir", lambda ctx: ["train", "--quiet", "--out", str(ctx.out), *sets("data.name=cifar10", f"data.dir={mkdir(ctx, 'cifar')}")], "is missing or empty"),
    Case("imagefolder-missing", lambda ctx: imagefolder(ctx, ctx.root / "nodata"), "is not a directory; point it at a folder of class subfolders"),
    Case("imagefolder-empty", lambda ctx: imagefolder(ctx, ctx.write("empty/.keep", "").parent), "has no class subfolders"),
    Case("imagefolder-no-class-folders", lambda ctx: imagefolder(ctx, ctx.write("flat/x.png", b"not used").parent), "has no class subfolders"),
    Case("imagefolder-train-without-test", lambda ctx: imagefolder(ctx, images(ctx.root / "data", split="train")), "has split folders but no test/ folder"),
    Case("imagefolder-empty-class", lambda ctx: imagefolder(ctx, (images(ctx.root / "data"), (ctx.root / "data" / "c").mkdir())[0]), "no image files"),
    Case("imagefolder-corrupt-image", lambda ctx: imagefolder(ctx, (images(ctx.root / "data"), ctx.write("data/b/bad.png", b"\x89PNG\r\n\x1a\nbroken"))[0]), "cannot decode image file"),
    Case("imagefolder-broken-link", lambda ctx: imagefolder(ctx, broken_link(ctx)), "cannot read image file"),
    Case("imagefolder-class-mismatch", lambda ctx: imagefolder(ctx, (images(ctx.root / "data", ("a", "b"), split="train"), images(ctx.root / "data", ("a", "c"), split="test"))[0]), "have different class folders (only in train/: b; only in test/: c)"),
    # ------------------------------------------------------------ --out
    Case("out-holds-a-run", lambda ctx: ["train", "--quiet", "--out", str(ctx.run), *sets()], "already holds a run: continue it with `mona-sfl train --resume"),
    Case("out-is-a-file", lambda ctx: ["train", "--quiet", "--out", str(ctx.out / "notes.txt"), *sets()], "exists and is not a folder"),
    Case("out-under-a-file", lambda ctx: ["train", "--quiet", "--out", str(ctx.out / "notes.txt" / "run"), *sets()], "is not a folder; choose another --out"),
    # ------------------------------------------------------------ --resume
    Case("resume-missing-folder", lambda ctx: ["train", "--resume", str(ctx.root / "nope")], "does not exist"),
    Case("resume-a-file", lambda ctx: ["train", "--resume", str(ctx.run / "config.toml")], "is a file, not a run folder"),
    Case("resume-not-a-run", lambda ctx: ["train", "--resume", str(ctx.out)], "has no config.toml: it is not a mona_sfl run folder"),
    Case("resume-no-checkpoint", resume(), "no checkpoint in", remove_checkpoints),
    Case("resume-corrupt-checkpoints", resume(), "no readable checkpoint in", corrupt_checkpoints),
    Case("resume-checkpoint-not-a-state", resume(), "holds no mona_sfl training state", edit_checkpoint(lambda s: [1, 2, 3])),
    Case("resume-checkpoint-other-version", resume(), "has version 'x', expected", edit_checkpoint(lambda s: s.update(version="x"))),
    Case("resume-checkpoint-incomplete", resume(), "is damaged or incomplete (KeyError", edit_checkpoint(lambda s: (s.pop("server"), None)[1])),
    Case("resume-checkpoint-wrong-weights", resume(), "is damaged or incomplete", edit_checkpoint(lambda s: s["server"].update(online={}))),
    Case("resume-config-other-cut", resume(), "does not match the checkpoint (differs in: model.cut)", edit_config("cut = 2", "cut = 3")),
    Case("resume-config-other-width", resume(), "does not match the checkpoint (differs in: model.width)", edit_config("width = 0.0625", "width = 0.125")),
    Case("resume-config-not-toml", resume(), "config.toml is not a valid config", edit_config("[model]", "[model")),
    Case("resume-config-unknown-key", resume(), "unknown config key 'model.depth'", edit_config("[model]", "[model]\ndepth = 3")),
    Case("resume-metrics-not-a-file", resume(), "metrics.jsonl is not a file", lambda ctx: ((ctx.run / "metrics.jsonl").unlink(), (ctx.run / "metrics.jsonl").mkdir())),
    Case("resume-torn-metrics-and-bad-config", resume(), "does not match the checkpoint",
         lambda ctx: (edit_config("seed = 0", "seed = 5")(ctx), (ctx.run / "metrics.jsonl").open("a").write('{"epoch":0,"step":3,"lo'))),
    Case("resume-set-other-key", resume("--set", "model.cut=3"), "--set model.cut cannot change a run being resumed"),
    Case("resume-max-steps-not-int", resume("--set", "train.max_steps=ten"), "--set train.max_steps=ten: value must be of type int"),
    Case("resume-max-steps-negative", resume("--set", "train.max_steps=-3"), "train.max_steps must be >= 0"),
    Case("resume-max-steps-below-checkpoint", resume("--set", "train.max_steps=1"), "train.max_steps=1 is below the checkpoint's step 2"),
    Case("resume-checkpoint-bad-record-count", resume(), "is damaged (metrics_records='x')", edit_checkpoint(lambda s: s.update(metrics_records="x"))),
    Case("resume-with-out", lambda ctx: ["train", "--resume", str(ctx.run), "--out", str(ctx.out)], "do not pass --config or --out with it"),
    Case("resume-finished-run", resume(), "has finished (2 steps, train.max_steps=2", needs_base=True),
    Case("resume-finished-run-not-extended", resume("--set", "train.max_steps=2"), "pass --set train.max_steps=N with N > 2", needs_base=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, base_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "case"
    run = root / "run"
    shutil.copytree(base_run, run)
    (run / "summary.json").unlink()  # a run stopped before its end, so resume checks are reached
    out = root / "out"
    out.mkdir()
    (out / "notes.txt").write_text("not a run\n")
    ctx = Ctx(root, run, out)
    if case.needs_base:
        shutil.copy2(base_run / "summary.json", run / "summary.json")
    if case.setup is not None:
        case.setup(ctx)
    args = case.args(ctx)
    before = snapshot(root)
    capsys.readouterr()
    rc = main(args)
    cap = capsys.readouterr()
    assert rc == 2, cap.err
    assert case.phrase in cap.err, cap.err
    assert cap.err.count("mona-sfl: error:") == 1, cap.err
    assert "Traceback" not in cap.err + cap.out
    after = snapshot(root)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)}


def test_there_are_at_least_30_cases() -> None:
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------- the loader, at random

LEAVES = sorted(to_flat(Config()))
SECTIONS = sorted({k.split(".")[0] for k in LEAVES if "." in k})
NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.-0123456789", min_size=0, max_size=12)
KEYS = st.one_of(
    st.sampled_from(LEAVES),
    st.sampled_from(SECTIONS),
    st.builds(lambda s, n: f"{s}.{n}", st.sampled_from(SECTIONS), NAMES),
    st.builds(lambda k, n: f"{k}.{n}", st.sampled_from(LEAVES), NAMES),
    NAMES,
    st.text(max_size=20),
)
SPECIAL = ["", " ", "nan", "-inf", "inf", "1e400", "-0", "0", "1", "-1", "true", "no", "0x10", "1_000", " 7 ", "'q'", '"q"',
           "resnet18", "cifar10", "dirichlet", "client", "auto", "cuda", "a\x00b", "a\nb", "\udcff", "9" * 5000, "2" * 30]
VALUES = st.one_of(
    st.sampled_from(SPECIAL),
    st.integers().map(str),
    st.integers(min_value=-3, max_value=12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(min_value=0, max_value=1).map(str),
    st.booleans().map(str),
    st.text(max_size=30),
)
CHOICES = dict(cfgmod.VOCABULARY)  # key -> its choices, from the modules that own them
TYPES = {k: type(v) for k, v in to_flat(Config()).items()}


def plausible(key: str) -> st.SearchStrategy[str]:
    """Values of the key's type in the range most keys accept (so that many lists load)."""
    tp = TYPES[key]
    if key in CHOICES:
        return st.sampled_from(CHOICES[key])
    if tp is bool:
        return st.sampled_from(["true", "false", "1", "off"])
    if tp is int:
        return st.integers(1, 9).map(str)
    if tp is float:
        return st.floats(0.05, 1.0).map(repr)
    return st.sampled_from(["", '""'])


PLAUSIBLE = st.sampled_from(LEAVES).flatmap(lambda k: plausible(k).map(lambda v: f"{k}={v}"))
OVERRIDES = st.lists(
    st.one_of(PLAUSIBLE, PLAUSIBLE, PLAUSIBLE, PLAUSIBLE, st.builds(lambda k, v: f"{k}={v}", KEYS, VALUES), st.text(max_size=20)),
    max_size=6,
)


def _check_loaded(cfg: Config) -> None:
    validate(cfg)
    assert schema_config([f"{k}={v}" for k, v in to_flat(cfg).items() if not isinstance(v, str)]) is not None
    assert from_flat(to_flat(cfg)) == cfg
    assert from_dict(tomllib.loads(dumps_toml(cfg))) == cfg  # config.toml always reloads to the same config


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OVERRIDES)
def test_random_overrides_raise_only_config_error(overrides: list[str]) -> None:
    try:
        cfg = schema_config(overrides)
    except ConfigError:
        return
    _check_loaded(cfg)


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12),
    st.lists(st.integers(), max_size=2), st.dates(),
)


@st.composite
def file_tables(draw: st.DrawFn) -> dict:
    """What a TOML/YAML file may decode to: real and junk keys, scalars and tables of any type."""
    data: dict = {}
    for _ in range(draw(st.integers(0, 5))):
        key = draw(st.one_of(*[st.sampled_from(LEAVES)] * 6, st.sampled_from(SECTIONS), NAMES, st.integers(0, 3)))
        if isinstance(key, str) and "." in key:
            sec, leaf = key.split(".", 1)
            table = data.setdefault(sec, {})
            if isinstance(table, dict):
                if key in TYPES and draw(st.integers(0, 5)) > 0:  # a plausible value, parsed as a file would hold it
                    table[leaf] = tomllib.loads(f"v = {_toml_literal(TYPES[key], draw(plausible(key)))}")["v"]
                else:
                    table[leaf] = draw(SCALARS)
        else:
            data[key] = draw(st.one_of(SCALARS, st.dictionaries(NAMES, SCALARS, max_size=3)))
    return data


def _toml_literal(tp: type, text: str) -> str:
    if tp is bool:
        return "true" if text in ("true", "1") else "false"
    if tp is str:
        return '"' + text.strip('"') + '"'
    return text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(file_tables())
def test_random_file_content_raises_only_config_error(data: dict) -> None:
    try:
        cfg = from_dict(data)
    except ConfigError:
        return
    _check_loaded(cfg)
    assert to_dict(cfg) == to_dict(from_dict(to_dict(cfg)))
