"""bench/runtimes.py (per-step time of one config under every runtime) and the flower.cpus_per_client key."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from mona_sfl.config import Config, ConfigError, schema_config, to_flat  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_bench() -> Any:
    """bench/ is not a package: import bench/runtimes.py by path."""
    spec = importlib.util.spec_from_file_location("bench_runtimes", ROOT / "bench" / "runtimes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- flower.cpus_per_client
def test_cpus_per_client_default_and_validation() -> None:
    assert Config().flower.cpus_per_client == 1.0
    assert "flower.cpus_per_client" in to_flat(Config())
    assert schema_config(["flower.cpus_per_client=0.5"]).flower.cpus_per_client == 0.5
    assert schema_config(["flower.cpus_per_client=2"]).flower.cpus_per_client == 2.0
    for bad in ("0", "-1", "nan", "inf", "'two'", "true"):
        with pytest.raises(ConfigError, match="flower.cpus_per_client"):
            schema_config([f"flower.cpus_per_client={bad}"])


def test_cpus_per_client_reaches_the_simulation_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import flwr.simulation

    from mona_sfl.runtime.flower.launch import simulation_backend_config, train_with_flower

    def resources(*overrides: str) -> dict[str, Any]:
        return simulation_backend_config(schema_config(["device=cpu", *overrides]))["client_resources"]

    assert resources() == {"num_cpus": 1, "num_gpus": 0.0}  # the behaviour before the key existed
    assert resources("flower.cpus_per_client=2") == {"num_cpus": 2, "num_gpus": 0.0}
    assert resources("flower.cpus_per_client=0.5") == {"num_cpus": 0.5, "num_gpus": 0.0}  # two ClientApps per CPU

    seen: dict[str, Any] = {}

    def fake_run_simulation(**kwargs: Any) -> None:  # the ServerApp never runs: no summary, RuntimeError below
        seen.update(kwargs)

    monkeypatch.setattr(flwr.simulation, "run_simulation", fake_run_simulation)
    cfg = schema_config(["device=cpu", "runtime=flower", "fed.num_clients=3", "flower.cpus_per_client=1.5"])
    with pytest.raises(RuntimeError, match="without a result"):
        train_with_flower(cfg, tmp_path / "run", progress=False)
    assert seen["num_supernodes"] == 3
    assert seen["backend_config"]["client_resources"]["num_cpus"] == 1.5


# ----------------------------------------------------------------------------- the benchmark script
def test_runtime_specs_and_table() -> None:
    b = load_bench()
    assert b.runtime_overrides("local") == ["runtime=local"]
    assert b.runtime_overrides("ray") == ["runtime=ray"]
    assert b.runtime_overrides("ray:2x1") == ["runtime=ray", "ray.num_actors=2", "ray.cpus_per_actor=1.0"]
    assert b.runtime_overrides("flower:0.5") == ["runtime=flower", "flower.cpus_per_client=0.5"]
    assert b.runtime_overrides("raycluster:2x1") == b.runtime_overrides("ray:2x1")  # the cluster's address is added by measure
    for bad in ("gpu", "ray:2", "ray:x1", "local:1", "ray:0x1", "ray:2x0", "raycluster", "raycluster:2", "ray:2xone"):
        with pytest.raises(ValueError):
            b.runtime_overrides(bad)
    for name in ("tiny", "resnet", "deep", "base"):  # every named config is a valid config for every runtime
        for spec in ("local", "ray:2x1", "flower:2"):
            schema_config([*b.COMMON, *b.CONFIGS[name], *b.runtime_overrides(spec), *b.timing_keys(5)])
    assert schema_config(b.CONFIGS["deep"]).model.cut > schema_config(b.CONFIGS["resnet"]).model.cut
    rows = [
        {"config": "x", "runtime": "local", "median": 1.0, "mean": 1.0, "min": 1.0, "ratio": 1.0, "cpu": math.nan},
        {"config": "x", "runtime": "flower", "error": "ValueError: boom"},
    ]
    table = b.format_table(rows).splitlines()
    assert table[0].split()[:3] == ["config", "runtime", "median"]
    assert "nan" not in table[1] and "FAILED: ValueError: boom" in table[2]


def test_concurrency_of_actor_spans() -> None:
    b = load_bench()
    assert b.concurrency([[(0.0, 1.0), (2.0, 3.0)]]) == 1.0  # one actor
    assert b.concurrency([[(0.0, 1.0)], [(1.0, 2.0)]]) == 1.0  # two actors taking turns
    assert b.concurrency([[(0.0, 1.0)], [(0.0, 1.0)]]) == 2.0  # side by side
    assert b.concurrency([[(0.0, 2.0), (3.0, 4.0)], [(1.0, 2.0), (3.0, 4.0)]]) == pytest.approx(5.0 / 3.0)
    assert b.concurrency([[(0.0, 1.0)], [(0.5, 3.0)], [(0.2, 0.4)]]) == pytest.approx(3.7 / 3.0)
    assert math.isnan(b.concurrency([[], []]))


def test_bench_tiny_local_and_ray() -> None:
    """The measuring function end to end: 3 timed steps of the tiny config on local and on Ray (two actors)."""
    pytest.importorskip("ray")
    import ray

    from mona_sfl.models import cut_info

    b = load_bench()
    t0 = time.perf_counter()
    rows = b.bench(["tiny"], ["local", "ray:2x1"], steps=3, warmup=1)
    elapsed = time.perf_counter() - t0
    assert not ray.is_initialized()  # the Ray instance the run started is gone
    local, on_ray = rows
    for r in rows:
        assert "error" not in r, r
        assert len(r["gaps"]) == 3 and all(g > 0 for g in r["gaps"])
        assert r["min"] <= r["median"] <= max(r["gaps"]) and r["startup"] > 0
        assert r["client"] > 0 and r["server"] > 0
        assert r["client"] + r["server"] <= r["mean"] * 1.01  # both are parts of the step gap
    assert (local["runtime"], on_ray["runtime"]) == ("local", "ray:2x1")
    # the server hands both actors their step before it waits for either: they compute side by side
    # (taking turns would give 1.0; two 1-CPU actors always side by side, 2.0)
    assert 1.3 < on_ray["concurrency"] <= 2.0
    assert local["ratio"] == 1.0 and on_ray["ratio"] > 0
    # the byte ledger has one meaning in every runtime: the protocol's payload, moved or not
    assert (local["up_MB"], local["down_MB"]) == (on_ray["up_MB"], on_ray["down_MB"])
    cfg = schema_config(b.CONFIGS["tiny"])
    act = cut_info(cfg.model.arch, cfg.model.cut, width=cfg.model.width).activation_numel * 4 * 2 * cfg.train.batch_size  # symmetric: 2B rows
    assert on_ray["up_MB"] * 1e6 == pytest.approx(cfg.fed.num_clients * 2 * act)  # a_q and a_k per client
    assert on_ray["down_MB"] * 1e6 == pytest.approx(cfg.fed.num_clients * act)  # one gradient per client
    assert math.isfinite(on_ray["actor"])
    print(f"local+ray tiny bench took {elapsed:.1f} s")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MONA_SFL_BENCH_FLOWER") != "1",
                    reason="Flower simulation start-up alone takes 30-80 s on 2 cores; set MONA_SFL_BENCH_FLOWER=1")
def test_bench_tiny_flower() -> None:
    pytest.importorskip("flwr")
    b = load_bench()
    (local, flower) = b.bench(["tiny"], ["local", "flower"], steps=3, warmup=1)
    assert "error" not in flower, flower
    assert len(flower["gaps"]) == 3 and flower["ratio"] > 0
    assert flower["exchanges"] == pytest.approx(1.0)  # one round trip per step
    assert 0 < flower["wait"] <= flower["client"]
    assert flower["up_MB"] > 0 and flower["down_MB"] > 0
