"""Nothing lost, nothing trusted: run-folder locks, safe deployment values, image folders that
cannot loop or lie, resource bounds, and OS errors as one clear line.

Every case runs the real code (the CLI entry in-process, or a real subprocess where a second
process is the point) on tiny inputs; each takes seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mona_sfl.checkpoint import read_metrics
from mona_sfl.cli import main
from mona_sfl.config import ConfigError, load_config, schema_config
from mona_sfl.data.datasets import load_dataset
from mona_sfl.errors import CheckpointError, DataError

from conftest import SMALLEST_RUN as TINY  # noqa: E402
from conftest import set_args as sets  # noqa: E402


def tree(root: Path) -> dict[str, bytes | str]:
    """Every file (its bytes) and folder under ``root``."""
    out: dict[str, bytes | str] = {}
    for d, dirs, files in os.walk(root):
        for x in dirs:
            out[os.path.relpath(os.path.join(d, x), root)] = "dir"
        for f in files:
            out[os.path.relpath(os.path.join(d, f), root)] = Path(d, f).read_bytes()
    return out


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run that stopped at step 2 of an epoch of 5 (summary.json removed: a resume continues
    it); it syncs every 2 steps, so its last step's sync is one a longer run makes too."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    assert main(["train", "--quiet", "--out", str(run), *sets("fed.sync_every=2")]) == 0
    (run / "summary.json").unlink()
    return run


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- run-folder locks
HOLD = (
    "import sys; from pathlib import Path; from mona_sfl.checkpoint import lock_run_dir\n"
    "with lock_run_dir(Path(sys.argv[1])):\n"
    "    print('locked', flush=True); sys.stdin.read()\n"
)


def hold_lock(folder: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


def test_a_second_writer_is_refused_naming_the_holder_and_changes_nothing(stopped_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(stopped_run, tmp_path / "run")
    (run / ".checkpoint.pt.abc.tmp").write_bytes(b"a live writer's temporary checkpoint")
    holder = hold_lock(run)
    try:
        before = tree(run)
        capsys.readouterr()
        assert main(["train", "--quiet", "--resume", str(run), "--set", "train.max_steps=3"]) == 2
        err = capsys.readouterr().err
        assert f"run folder {run} is in use by another mona-sfl process (pid {holder.pid})" in err
        assert main(["train", "--quiet", "--out", str(run), *sets()]) == 2  # a new run: refused (it holds a run anyway)
        assert main(["attack", str(run), "--epochs", "1", "--num-test", "4"]) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
        assert tree(run) == before  # the live writer's temporary file is still there
    finally:
        holder.kill()
        holder.wait()
    # the holder died (SIGKILL): its lock is gone with it, and the resume runs
    assert main(["train", "--quiet", "--resume", str(run), "--set", "train.max_steps=3"]) == 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3]


def test_two_new_runs_into_one_folder_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "new"
    holder = hold_lock(out)  # as if another `train --out new` had just started
    try:
        assert main(["train", "--quiet", "--out", str(out), *sets()]) == 2
        assert f"(pid {holder.pid})" in capsys.readouterr().err
        assert os.listdir(out) == []
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_leaves_no_file_and_a_failed_new_run_leaves_no_folder(tmp_path: Path) -> None:
    from mona_sfl.checkpoint import lock_run_dir

    with lock_run_dir(tmp_path / "a" / "b"):
        assert os.listdir(tmp_path / "a" / "b") == []
    assert os.listdir(tmp_path / "a" / "b") == []
    with pytest.raises(DataError):
        with lock_run_dir(tmp_path / "c"):
            raise DataError("the run failed before writing anything")
    assert not (tmp_path / "c").exists()


def test_in_process_second_lock_is_refused(tmp_path: Path) -> None:
    from mona_sfl.checkpoint import lock_run_dir

    with lock_run_dir(tmp_path):
        with pytest.raises(CheckpointError, match=f"pid {os.getpid()}"):
            with lock_run_dir(tmp_path):
                pass
    with lock_run_dir(tmp_path):  # released
        pass


# ----------------------------------------------------------------------------- image folders
def class_tree(root: Path, n: int = 3, classes: tuple[str, ...] = ("a", "b")) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def load(root: Path, **kw: int) -> torch.Tensor:
    return load_dataset("imagefolder", "train", root=str(root), image_size=8, **kw)


def test_a_symlink_loop_in_a_class_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    root = class_tree(tmp_path / "data")
    os.symlink(root / "a", root / "a" / "loop")  # back into the tree: a loop
    with pytest.raises(DataError, match=r"loop'.* is a symbolic link pointing back into the image tree"):
        load(root)


def test_links_out_of_or_back_into_the_tree_are_not_followed(tmp_path: Path) -> None:
    root = class_tree(tmp_path / "data")
    outside = class_tree(tmp_path / "elsewhere", classes=("x",))
    os.symlink(outside / "x", root / "a" / "more")
    with pytest.raises(DataError, match="pointing out of the image tree"):
        load(root)
    os.unlink(root / "a" / "more")
    os.symlink(root / "b" / "0.png", root / "a" / "copy.png")  # b's image again, labelled a
    with pytest.raises(DataError, match=r"copy.png' is a symbolic link pointing back into the image tree"):
        load(root)
    os.unlink(root / "a" / "copy.png")
    os.symlink(root / "a", root / "c")  # a class folder that is another class folder
    with pytest.raises(DataError, match="are the same folder or one holds the other"):
        load(root)
    os.unlink(root / "c")
    os.symlink(outside / "x", root / "c")  # a class folder linked from elsewhere: allowed
    data = load(root)
    assert data.classes == ["a", "b", "c"] and data.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_a_pipe_named_like_an_image_is_an_error_not_a_hang(tmp_path: Path) -> None:
    root = class_tree(tmp_path / "data")
    os.mkfifo(root / "b" / "pipe.png")
    with pytest.raises(DataError, match=r"pipe.png' is not a regular file"):
        load(root)


def test_sixteen_bit_and_every_pil_mode_load_with_correct_values(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "g").mkdir(parents=True)
    (root / "h").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(root / "g" / "grey16.png")  # 50% grey
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(root / "g" / "white16.tif")
    Image.fromarray(np.full((8, 8), 0.25, dtype=np.float32)).save(root / "g" / "float.tif")
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    Image.fromarray(rgba, "RGBA").save(root / "h" / "rgba.png")
    Image.fromarray(np.full((8, 8), 77, dtype=np.uint8), "L").convert("P").save(root / "h" / "pal.gif")
    Image.new("1", (8, 8), 1).save(root / "h" / "bits.bmp")
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(root / "h" / "cmyk.tif")
    d = load(root)
    px = {p: d.images[i, :, 0, 0].tolist() for i, p in enumerate(["float", "grey16", "white16", "bits", "cmyk", "pal", "rgba"])}
    assert px == {
        "float": [64, 64, 64], "grey16": [128, 128, 128], "white16": [255, 255, 255], "bits": [255, 255, 255],
        "cmyk": [255, 255, 255], "pal": [77, 77, 77], "rgba": [200, 0, 0],
    }


def test_the_decompression_bomb_limit_applies_and_a_key_raises_it(tmp_path: Path) -> None:
    root = class_tree(tmp_path / "data")
    Image.new("L", (300, 200)).save(root / "a" / "big.png")
    with pytest.raises(DataError, match=r"big.png' is too large \(300x200 = 60000 pixels, limit data.max_image_pixels=50000\)"):
        load(root, max_image_pixels=50_000)
    assert len(load(root, max_image_pixels=60_000)) == 7
    # the default applies PIL's limit to the fast PNG path too: 20000 x 20000 in a small file
    Image.new("1", (20000, 20000)).save(root / "a" / "big.png")
    assert (root / "a" / "big.png").stat().st_size < 2_000_000
    with pytest.raises(DataError, match="is too large .*data.max_image_pixels=89478485"):
        load(root)
    cfg = schema_config(["data.max_image_pixels=400000000"])
    assert cfg.data.max_image_pixels == 400_000_000
    with pytest.raises(ConfigError, match="data.max_image_pixels must be >= 1"):
        schema_config(["data.max_image_pixels=0"])


# ----------------------------------------------------------------------------- damaged run files
@pytest.mark.parametrize(
    "content",
    ['{"steps": 1e999, "epochs": 1}', "[" * 100000 + "]" * 100000, '{"steps": ' + "9" * 5000 + ', "epochs": 0}'],
    ids=["huge-float", "deep-nesting", "huge-int"],
)
def test_a_damaged_summary_is_one_clear_error(stopped_run: Path, tmp_path: Path, content: str, capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(stopped_run, tmp_path / "run")
    (run / "summary.json").write_text(content)
    before = tree(run)
    assert main(["train", "--quiet", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'summary.json'} is damaged" in err and "Traceback" not in err
    assert tree(run) == before


def test_damaged_metrics_lines_are_skipped_and_the_resume_is_exact(stopped_run: Path, tmp_path: Path) -> None:
    run = copy_run(stopped_run, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": ' + "9" * 5000 + "}\n" + "[" * 100000 + "]" * 100000 + "\n")
    assert read_metrics(run / "metrics.jsonl") == read_metrics(stopped_run / "metrics.jsonl")
    assert main(["train", "--quiet", "--resume", str(run), "--set", "train.max_steps=3"]) == 0
    assert "9" * 5000 not in (run / "metrics.jsonl").read_text()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3]


def test_a_fallback_to_the_previous_checkpoint_says_so_and_why(stopped_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = copy_run(stopped_run, tmp_path / "run")
    prev_step = torch.load(run / "checkpoint.prev.pt", weights_only=True)["global_step"]
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:200])  # truncated
    with caplog.at_level("WARNING", logger="mona_sfl"):
        assert main(["train", "--quiet", "--resume", str(run), "--set", "train.max_steps=3"]) == 0
    msg = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert len(msg) == 1
    assert msg[0].startswith(f"{run / 'checkpoint.pt'} is unusable (")
    assert msg[0].endswith(f"falling back to checkpoint.prev.pt (step {prev_step}); the steps after it are trained again")


# ----------------------------------------------------------------------------- paths and permissions
def test_a_name_too_long_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    long = tmp_path / ("x" * 300) / "run"
    assert main(["train", "--quiet", "--out", str(long), *sets()]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mona-sfl: error: --out {long} cannot be used: File name too long") and err.count("\n") == 1
    assert main(["train", "--quiet", "--resume", str(long)]) == 2
    assert "File name too long" in capsys.readouterr().err
    assert main(["attack", str(long)]) == 2
    assert "File name too long" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def without_root_powers(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the CLI without the powers that let root read and search every folder (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH dropped from the bounding set before exec), so permissions apply to it."""
    import ctypes

    def drop() -> None:
        if os.getuid() == 0:
            libc = ctypes.CDLL(None, use_errno=True)
            for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
                if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                    os._exit(77)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "mona_sfl", *args], cwd=cwd, env=env, capture_output=True, text=True, preexec_fn=drop, timeout=300)
    if r.returncode == 77:
        pytest.skip("cannot drop root's file capabilities here")
    return r


def test_an_unreadable_subfolder_and_a_folder_without_search_permission(tmp_path: Path) -> None:
    shared_dir = tmp_path
    root = class_tree(shared_dir / "data")
    (root / "a" / "more").mkdir()
    class_tree(root / "a" / "more", classes=("deep",))
    (root / "a" / "more").chmod(0o300)  # no read: its images cannot be listed
    out = shared_dir / "out"
    r = without_root_powers(["train", "--quiet", "--out", str(out), *sets("data.name=imagefolder", f"data.dir={root}", "train.batch_size=2")], shared_dir)
    assert r.returncode == 2, r.stderr
    assert f"cannot read folder '{root / 'a' / 'more'}' (Permission denied)" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    locked = shared_dir / "locked"
    locked.mkdir(mode=0o700)
    locked.chmod(0o600)  # no search permission
    try:
        _search_checks(shared_dir, locked)
    finally:
        locked.chmod(0o700)
        (root / "a" / "more").chmod(0o700)


def _search_checks(shared_dir: Path, locked: Path) -> None:
    r = without_root_powers(["train", "--quiet", "--out", str(locked / "run"), *sets()], shared_dir)
    assert r.returncode == 2 and f"--out {locked / 'run'} cannot be used: Permission denied" in r.stderr, r.stderr
    r = without_root_powers(["train", "--quiet", "--resume", str(locked / "run")], shared_dir)
    assert r.returncode == 2 and "Permission denied" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ----------------------------------------------------------------------------- deployment values
def test_the_deployed_app_carries_any_folder_name_as_one_value(tmp_path: Path) -> None:
    from mona_sfl.runtime.flower.deploy import write_app
    from mona_sfl.runtime.flower.run_config import config_from_run_config

    cfg = schema_config([*TINY, "device=cpu"])
    odd = tmp_path / 'run" device="cuda\' \\ x\ny'
    write_app(tmp_path / "app", cfg, odd, probe_mb=2.0, probe_only=True)
    table = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
    assert table["out"] == str(odd) and table["device"] == "cpu" and table["probe_mb"] == 2.0 and table["probe_only"] is True
    assert config_from_run_config(table).device == "cpu"


def test_deploy_local_refuses_bad_out_folders_before_starting_anything(stopped_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(stopped_run, tmp_path / "run")
    before = tree(tmp_path)
    assert main(["deploy-local", "--out", str(run), *sets()]) == 2
    assert "already holds a run" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["deploy-local", "--out", str(tmp_path / "file"), *sets()]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    undecodable = os.fsdecode(bytes(tmp_path) + b"/bad\xff")
    assert main(["deploy-local", "--out", undecodable, *sets()]) == 2
    assert "holds bytes that are not UTF-8" in capsys.readouterr().err
    assert tree(tmp_path) == {**before, "file": b"x"}


def test_the_server_app_never_starts_a_run_over_another(stopped_run: Path, tmp_path: Path) -> None:
    from mona_sfl.runtime.flower.server_app import run_trainer

    run = copy_run(stopped_run, tmp_path / "run")
    before = tree(run)
    with pytest.raises(ConfigError, match="already holds a run"):
        run_trainer(None, schema_config(TINY), run)  # type: ignore[arg-type]  # refused before the grid is used
    assert tree(run) == before


# ----------------------------------------------------------------------------- sizes and bounds
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algo.K=100000000"], "algo.K=100000000 exceeds the limit 16777216"),
        (["algo.dim=1000000"], "algo.dim=1000000 exceeds the limit 65536"),
        (["algo.K=1000000", "algo.dim=1024"], "algo.K x algo.dim = 1024000000 queue entries exceeds the limit 268435456"),
        (["algo.hidden_dim=1000000000"], "algo.hidden_dim=1000000000 exceeds the limit 65536"),
        (["data.synthetic_size=100000000"], "data.synthetic_size=100000000 exceeds the limit 10000000"),
        (["data.synthetic_size=1000000", "data.image_size=512"], "= 786432000000 bytes exceeds the limit 8589934592"),
        (["train.weight_decay=1e300"], "train.weight_decay must be in [0, 1.0], got 1e+300"),
        (["flower.num_supernodes=1000000", "fed.num_clients=2"], "flower.num_supernodes=1000000 exceeds the limit fed.num_clients=2"),
        (["train.epochs=10000000"], "train.epochs=10000000 exceeds the limit 10000"),
        (["train.epochs=1000", "fed.num_clients=100000"], "train.epochs x fed.num_clients = 100000000 exceeds the limit 10000000"),
        (["train.batch_size=1000000"], "train.batch_size=1000000 exceeds the limit 65536"),
        (["fed.num_clients=1000000000"], "fed.num_clients=1000000000 exceeds the limit 100000"),
    ],
)
def test_resource_bounds_name_the_key_and_the_limit(overrides: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError) as e:
        schema_config(overrides)
    assert message in str(e.value)
    assert main(["comm", *[x for o in overrides for x in ("--set", o)]]) == 2  # the analytic command too, at once
    assert message in capsys.readouterr().err


def test_comm_steps_per_epoch_is_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["comm", "--steps-per-epoch", "1000000000"]) == 2
    assert "--steps-per-epoch must be in 1..10000000, got 1000000000" in capsys.readouterr().err


def test_a_yaml_alias_bomb_is_refused(tmp_path: Path) -> None:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    assert (tmp_path / "bomb.yaml").stat().st_size < 1000
    with pytest.raises(ConfigError, match=r"YAML aliases \(\*a\) are not accepted in a config \(line 2\)"):
        load_config(tmp_path / "bomb.yaml")
    (tmp_path / "big.toml").write_text("# " + "x" * 1_000_001 + "\n")
    with pytest.raises(ConfigError, match="is larger than 1000000 bytes"):
        load_config(tmp_path / "big.toml")


def test_an_untrained_attack_does_not_write_into_a_run_folder(stopped_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(stopped_run, tmp_path / "run")
    before = tree(run)
    assert main(["attack", "--config", str(run / "config.toml"), "--out", str(run), "--epochs", "1"]) == 2
    assert f"--out {run} holds a training run" in capsys.readouterr().err
    assert tree(run) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--decoder-width", "0"], "attack decoder-width must be an integer >= 1, got 0"),
        (["--seed", "-1"], "attack seed must be an integer >= 0, got -1"),
        (["--device", "tpu"], "attack device must be one of cpu, cuda, auto, got 'tpu'"),
        (["--epochs", "0"], "attack epochs must be an integer >= 1, got 0"),
        (["--aux-fraction", "nan"], "attack aux-fraction must be in (0, 1], got nan"),
    ],
)
def test_bad_attack_arguments_exit_2_before_any_work(stopped_run: Path, tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(stopped_run, tmp_path / "run")
    before = tree(run)
    assert main(["attack", str(run), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert tree(run) == before


# ----------------------------------------------------------------------------- disk full, read-only, extensions
def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_extending_a_finished_run_gives_the_longer_runs_losses_or_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref = tmp_path / "ref"
    assert main(["train", "--quiet", "--out", str(ref), *sets("fed.sync_every=2", "train.max_steps=4")]) == 0
    run = tmp_path / "run"
    assert main(["train", "--quiet", "--out", str(run), *sets("fed.sync_every=2")]) == 0  # finished at step 2
    assert main(["train", "--quiet", "--resume", str(run), "--set", "train.max_steps=4"]) == 0
    assert losses(run) == losses(ref)  # exactly: its step-2 sync is one the 4-step run makes too
    # without fed.sync_every the 2-step run's last sync is one a 3-step run does not make: refused, nothing changed
    short = tmp_path / "short"
    assert main(["train", "--quiet", "--out", str(short), *sets()]) == 0
    before = tree(short)
    capsys.readouterr()
    assert main(["train", "--quiet", "--resume", str(short), "--set", "train.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "stopped at step 2 (train.max_steps=2) with a final sync that a run of 3 steps does not make there" in err
    assert "start a new run with --set train.max_steps=3" in err
    assert tree(short) == before


@pytest.fixture()
def small_disk(tmp_path: Path):
    """A 4 MiB tmpfs (root only; skipped where mounting is not permitted), unmounted afterwards."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_one_line_exit_1_and_the_run_resumes_exactly_afterwards(small_disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref = tmp_path / "ref"
    assert main(["train", "--quiet", "--out", str(ref), *sets("fed.sync_every=2", "train.max_steps=4")]) == 0
    run = small_disk / "run"
    assert main(["train", "--quiet", "--out", str(run), *sets("fed.sync_every=2")]) == 0
    (run / "summary.json").unlink()
    st = os.statvfs(small_disk)
    (small_disk / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 64 * 1024))  # 64 KiB left
    capsys.readouterr()
    assert main(["train", "--quiet", "--resume", str(run), "--set", "train.max_steps=4"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mona-sfl: error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and f"({run}/" in errors[0], err
    assert errors[0].endswith(f"; the last checkpoint in {run} is kept: fix the cause, then run the same command again")
    assert "Traceback" not in err and "During handling" not in err
    assert torch.load(run / "checkpoint.pt", weights_only=True)["global_step"] == 2  # the previous checkpoint, intact
    (small_disk / "filler").unlink()  # the cause is gone
    assert main(["train", "--quiet", "--resume", str(run)]) == 0  # config.toml already holds train.max_steps=4
    assert losses(run) == losses(ref)


def test_a_read_only_run_folder_is_refused_before_any_work(small_disk: Path, stopped_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(stopped_run, small_disk / "run")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    capsys.readouterr()
    assert main(["train", "--quiet", "--resume", str(run), "--set", "train.max_steps=3"]) == 2
    assert f"cannot write in run folder {run} (Read-only file system): --resume needs a writable folder" in capsys.readouterr().err
    assert main(["attack", str(run), "--epochs", "1000000"]) == 2  # refused at once, not after training the decoder
    assert f"cannot write in run folder {run} (Read-only file system): the attack needs a writable folder" in capsys.readouterr().err


def test_activations_rejected_does_not_advise_a_resume_that_repeats_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", "--quiet", "--out", str(run), *sets("train.lr=1e30", "train.max_steps=4")]) == 1  # weights overflow
    err = capsys.readouterr().err
    assert "no valid client activations in this step" in err and "non-finite" in err
    assert "a --resume would repeat the same step and fail the same way: start a new run" in err
    assert "continue with: mona-sfl train --resume" not in err and "Traceback" not in err


def test_a_study_does_not_write_a_run_folder_another_process_holds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "study" / "runs" / "mona-cut2-seed0"
    holder = hold_lock(run_dir)  # e.g. a `train --resume` of that run
    try:
        assert main(["study", "--quick", "--cuts", "2", "--methods", "MonAcoSFL", "--out", str(tmp_path / "study"), "--no-plots"]) == 2
        assert f"run folder {run_dir} is in use by another mona-sfl process (pid {holder.pid})" in capsys.readouterr().err
        assert os.listdir(run_dir) == []
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- Ray processes of a killed run
RAY_DRIVERS = {  # what starts the local Ray instance of a run, then waits to be killed
    "ray": "from mona_sfl.runtime.ray_runtime import RayTransport\n"
           "RayTransport(cfg)\n",
    "flower": "from mona_sfl.runtime.flower.launch import simulation_backend_config, start_ray_for_simulation\n"
              "start_ray_for_simulation(simulation_backend_config(cfg))\n",
}


def _argv0(pid: int) -> bytes:
    """The process's title (its command line's first word), or b"" when it is gone."""
    try:
        return Path("/proc", str(pid), "cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return b""


def descendants(root: int) -> dict[int, bytes]:
    """``{pid: its /proc stat line}`` of every process below ``root`` (a pid reused later has another stat line)."""
    parent, stat = {}, {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat[int(name)] = Path("/proc", name, "stat").read_bytes()
        except OSError:
            continue
        parent[int(name)] = int(stat[int(name)].rsplit(b")", 1)[1].split()[1])
    found, todo = {}, [root]
    while todo:
        p = todo.pop()
        for c in [c for c, pp in parent.items() if pp == p]:
            found[c] = stat[c]
            todo.append(c)
    return found


def still_running(procs: dict[int, bytes]) -> list[int]:
    """The processes of ``procs`` that still run (same start time, not a zombie)."""
    alive = []
    for pid, st in procs.items():
        try:
            now = Path("/proc", str(pid), "stat").read_bytes()
        except OSError:
            continue
        fields = now.rsplit(b")", 1)[1].split()
        if fields[19] == st.rsplit(b")", 1)[1].split()[19] and fields[0] not in (b"Z", b"X"):
            alive.append(pid)
    return alive


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.slow
@pytest.mark.parametrize("runtime", sorted(RAY_DRIVERS))
def test_ray_processes_of_a_killed_driver_end_within_seconds(runtime: str) -> None:
    """A driver of runtime=ray (or flower) SIGKILLed: its local Ray instance (GCS, raylet,
    dashboard, the raylet's agents) is gone within seconds, not after the agents' 90 s."""
    pytest.importorskip("ray")
    code = (
        "import time\nfrom conftest import SMALLEST_RUN\nfrom mona_sfl.config import schema_config\n"
        f"cfg = schema_config(SMALLEST_RUN + ['runtime={runtime}'])\n{RAY_DRIVERS[runtime]}"
        "print('up', flush=True)\ntime.sleep(300)\n"
    )
    tests = str(Path(__file__).parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]), FLWR_TELEMETRY_ENABLED="0")
    driver = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    procs: dict[int, bytes] = {}
    try:
        assert driver.stdout is not None and driver.stdout.readline().strip() == "up"
        # the agents take their ray::... titles only once their imports are done (seconds on a
        # loaded machine): wait for them, so the check below is about the kill, not about startup
        wanted, deadline = (b"ray::DashboardAgent", b"ray::RuntimeEnvAgent", b"raylet"), time.monotonic() + 60.0
        while True:
            procs = descendants(driver.pid)
            names = b" ".join(_argv0(p) for p in procs)
            if all(w in names for w in wanted) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert all(w in names for w in wanted), names
        driver.kill()
        driver.wait()
        deadline = time.monotonic() + 8.0
        while still_running(procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = still_running(procs)
        assert not left, [Path("/proc", str(p), "cmdline").read_bytes()[:80] for p in left]
    finally:
        driver.kill()
        driver.wait()
        for pid in still_running(procs):  # a failed test leaves nothing behind either
            os.kill(pid, 9)


# ----------------------------------------------------------------------------- certs
def test_certs_never_overwrite_keys_nor_half_write_and_force_replaces_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key, load_ssh_private_key
    from cryptography.x509 import load_pem_x509_certificate

    out = tmp_path / "certs"
    out.mkdir()
    (out / "supernode-1.pub").write_bytes(b"ssh-ed25519 AAAA registered-with-the-superlink\n")
    capsys.readouterr()
    assert main(["certs", str(out), "--nodes", "2"]) == 2  # supernode-1.pub exists: nothing is written at all
    err = capsys.readouterr().err
    assert f"{out / 'supernode-1.pub'} already exists" in err and "--force" in err
    assert os.listdir(out) == ["supernode-1.pub"]
    (out / "ca.key").symlink_to(tmp_path / "elsewhere.key")  # a dangling link: not followed, not replaced
    assert main(["certs", "--out", str(out), "--nodes", "2"]) == 2
    assert f"{out / 'ca.key'}, {out / 'supernode-1.pub'} already exist" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["ca.key", "supernode-1.pub"] and not (tmp_path / "elsewhere.key").exists()
    (out / "ca.key").unlink()
    (out / "supernode-1.pub").unlink()

    assert main(["certs", "--out", str(out), "--nodes", "2"]) == 0
    before = tree(out)
    assert main(["certs", "--out", str(out), "--nodes", "1"]) == 2  # a complete set: refused, unchanged
    assert tree(out) == before
    assert main(["certs", "--out", str(out), "--node-keys-only", "--nodes", "1", "--force"]) == 2
    assert main(["certs", str(out), "--out", str(tmp_path / "other")]) == 2
    assert "two output folders" in capsys.readouterr().err
    assert tree(out) == before

    assert main(["certs", "--out", str(out), "--nodes", "2", "--force"]) == 0  # replaced, each file a new one
    after = tree(out)
    assert sorted(after) == sorted(before) and all(after[f] != before[f] for f in before)
    for name in ("ca.key", "server.key", "supernode-0.key", "supernode-1.key"):
        assert os.stat(out / name).st_mode & 0o777 == 0o600, name
    cert = load_pem_x509_certificate(after["server.pem"])
    assert cert.public_key() == load_pem_private_key(after["server.key"], None).public_key()
    cert.verify_directly_issued_by(load_pem_x509_certificate(after["ca.crt"]))
    pub = load_ssh_private_key(after["supernode-1.key"], None).public_key()
    assert after["supernode-1.pub"].split()[:2] == pub.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).split()


# ----------------------------------------------------------------------------- flwr-run
def test_flwr_run_takes_the_run_folder_lock_before_starting_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("flwr")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr home"))  # were a SuperLink started, its state goes here
    out = tmp_path / "new"
    holder = hold_lock(out)  # e.g. a `train --out new` or another flwr-run that has just started
    try:
        capsys.readouterr()
        assert main(["flwr-run", "--out", str(out), "--timeout", "30", *sets()]) == 2
        err = capsys.readouterr().err
        assert f"run folder {out} is in use by another mona-sfl process (pid {holder.pid})" in err
        assert "running: flwr run" not in err and os.listdir(out) == []
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- OS-error advice per command
def fill(disk: Path, leave: int = 0) -> None:
    st = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - leave))


def test_os_error_advice_names_what_each_command_can_do(small_disk: Path, stopped_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Only a training run is resumed: an attack, or a command without --resume, is not told to `--resume`."""
    run = copy_run(stopped_run, small_disk / "run")
    out = small_disk / "baseline"
    fill(small_disk)
    capsys.readouterr()
    attack = ["--epochs", "1", "--num-test", "4", "--aux-fraction", "0.2", "--decoder-width", "4"]
    assert main(["attack", str(run), *attack]) == 1  # attack.png / attack.json: no space
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err, err
    assert f"the run's checkpoints in {run} are unchanged: fix the cause, then run the same command again" in err
    assert "--resume" not in err
    assert main(["attack", "--config", "default", "--out", str(out), *attack, *sets()]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.rstrip().endswith("; fix the cause, then run the same command again"), err
    assert "--resume" not in err and "checkpoint" not in err

    from mona_sfl.cli import os_error_advice, parser

    def advice(*argv: str) -> str:
        return os_error_advice(parser().parse_args(list(argv)))

    again = "fix the cause, then run the same command again"
    assert advice("comm") == advice("plot", str(run)) == advice("certs", "--out", str(tmp_path)) == again
    assert advice("train", "--resume", str(run)) == f"the last checkpoint in {run} is kept: {again}"
    assert advice("train", "--out", str(run)) == f"the last checkpoint in {run} is kept: fix the cause, then continue with `mona-sfl train --resume {run}`"
    assert advice("train", "--out", str(tmp_path / "never-started")) == again
    assert advice("flwr-run", "--out", str(run)).endswith(f"`mona-sfl train --resume {run}` (on Flower's simulation engine)")
    assert advice("study", "--out", str(tmp_path)) == f"{again}: it keeps the finished rows and resumes the unfinished runs"


# ----------------------------------------------------------------------------- huge inputs
def test_a_huge_image_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    root = class_tree(tmp_path / "data")
    with open(root / "b" / "huge.png", "wb") as f:  # 1 TiB, sparse: nothing of it is on disk
        f.write(b"\x89PNG\r\n\x1a\n")
        f.truncate(1 << 40)
    with pytest.raises(DataError, match=r"huge.png' is too large \(1,099,511,627,776 bytes; data.max_image_pixels=89478485 "
                                        r"allows files of at most 732,605,096 bytes\): .*raise data.max_image_pixels"):
        load(root)
    with open(root / "b" / "huge.png", "r+b") as f:  # a real image with 17 MiB of trailing zeros: over a small limit only
        f.truncate(0)
        Image.new("RGB", (8, 8)).save(f, format="PNG")
        f.truncate(17 << 20)
    assert len(load(root)) == 7
    with pytest.raises(DataError, match=r"at most 16,785,216 bytes"):
        load(root, max_image_pixels=1000)  # 8 bytes per pixel + 16 MiB


def test_a_checkpoint_whose_tensors_claim_enormous_shapes_is_refused(stopped_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import mona_sfl.checkpoint as ckpt

    run = copy_run(stopped_run, tmp_path / "run")
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    key = sorted(state["global_online"])[0]
    state["global_online"][key] = torch.zeros(1).expand(10**6, 10**6)  # claims 4 TB over 4 bytes of data
    torch.save(state, run / "checkpoint.pt")
    assert (run / "checkpoint.pt").stat().st_size < 2 * (stopped_run / "checkpoint.pt").stat().st_size  # a small file
    (run / "checkpoint.prev.pt").unlink()  # nothing to fall back to
    before = tree(run)
    capsys.readouterr()
    assert main(["train", "--quiet", "--resume", str(run), "--set", "train.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert (f"no readable checkpoint in {run} (checkpoint.pt: tensor global_online.{key} claims shape (1000000, 1000000) "
            f"(1,000,000,000,000 elements) over 4 bytes of data: the file is damaged or crafted)") in err, err
    assert main(["attack", str(run), "--epochs", "1"]) == 2  # every reader of checkpoints: the attack too
    assert "claims shape (1000000, 1000000)" in capsys.readouterr().err
    assert tree(run) == before

    # a checkpoint larger than the memory left is not read at all (here: the memory is made small)
    shutil.copy(stopped_run / "checkpoint.pt", run / "checkpoint.pt")
    monkeypatch.setattr(ckpt, "available_memory", lambda: 1000)
    assert main(["train", "--quiet", "--resume", str(run), "--set", "train.max_steps=3"]) == 2
    err = capsys.readouterr().err
    size = sum(i.file_size for i in zipfile.ZipFile(run / "checkpoint.pt").infolist())
    assert f"{run / 'checkpoint.pt'} holds {size:,} bytes of tensors, more than the 1,000 bytes of memory available" in err, err
