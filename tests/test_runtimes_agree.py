"""Same numbers from every runtime, by default: `mona-sfl train` with runtime=local, ray and
flower on the tiny config, with no thread settings, gives bit-identical losses and weights."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("flwr")

from conftest import TEST_DEVICE, assert_same, load_checkpoint, losses, tiny_overrides  # noqa: E402
from mona_sfl.cli import main  # noqa: E402

# on CUDA (MONA_SFL_TEST_DEVICE=cuda) the Ray actors share the GPU, as Flower's simulated nodes do
TINY = tiny_overrides("fed.num_clients=3", "ray.num_actors=2", "flower.num_supernodes=2",
                      *(["ray.gpus_per_actor=0.5"] if TEST_DEVICE == "cuda" else []))


@pytest.mark.slow
def test_cli_runtimes_give_bit_identical_losses_without_thread_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the machine's defaults, as a user has them
        monkeypatch.delenv(var, raising=False)
    runs = {}
    for runtime in ("local", "ray", "flower"):
        runs[runtime] = tmp_path / runtime
        sets = [a for kv in [*TINY, f"runtime={runtime}"] for a in ("--set", kv)]
        assert main(["train", "--quiet", "--out", str(runs[runtime]), *sets]) == 0, runtime
    base = losses(runs["local"])
    assert len(base) == 6
    for runtime in ("ray", "flower"):
        assert losses(runs[runtime]) == base, runtime  # bitwise
        a, b = load_checkpoint(runs["local"]), load_checkpoint(runs[runtime])
        assert_same(a["global_online"], b["global_online"], f"{runtime} global_online")
        assert_same(a["server"], b["server"], f"{runtime} server")
