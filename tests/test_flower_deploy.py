"""The deployed Flower path made faster: the SuperNodes' poll intervals, a ClientApp process that
stays up per SuperNode, and a deployment that still gives the in-process runtime's numbers."""

from __future__ import annotations

import json
import time
import types
from pathlib import Path

import pytest

from conftest import assert_same, load_checkpoint, losses, tiny_overrides
from mona_sfl.config import schema_config

flwr = pytest.importorskip("flwr")

from mona_sfl.runtime.flower import polling, supernode  # noqa: E402
from mona_sfl.runtime.flower.clientapp_worker import ClientAppWorker  # noqa: E402
from mona_sfl.runtime.flower.clientapp_worker import main as worker_main  # noqa: E402

TINY = tiny_overrides(drop=("device", "eval.knn_k"))


@pytest.fixture(autouse=True)
def _flower_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr_home")))


class FakeClock:
    """A ``time`` module that records sleeps instead of sleeping."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def sleep(self, s: float) -> None:
        self.slept.append(s)

    def monotonic(self) -> float:
        return 42.0


# ----------------------------------------------------------------------------- SuperNode poll intervals
def test_poll_clock_shortens_exactly_the_two_supernode_sleeps() -> None:
    fake = FakeClock()
    clock = polling.PollClock(0.05, 0.01, clock=fake)  # type: ignore[arg-type]
    for s in (3, 0.5, 3.0, 1, 0.2, 0.5):
        clock.sleep(s)
    assert fake.slept == [0.05, 0.01, 0.05, 1, 0.2, 0.01]
    assert clock.monotonic() == 42.0  # everything else is the real module's


def test_poll_intervals_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(polling.IDLE_ENV, raising=False)
    assert polling.interval(polling.IDLE_ENV, 0.05) == 0.05
    monkeypatch.setenv(polling.IDLE_ENV, " 0.2 ")
    assert polling.interval(polling.IDLE_ENV, 0.05) == 0.2
    for bad in ("abc", "0", "-1", "nan", "inf", "61"):
        monkeypatch.setenv(polling.IDLE_ENV, bad)
        with pytest.raises(ValueError, match=polling.IDLE_ENV):
            polling.interval(polling.IDLE_ENV, 0.05)


def test_main_refuses_a_bad_interval_before_starting(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(polling.REPLY_ENV, "soon")
    with pytest.raises(SystemExit) as e:
        supernode.main(["--insecure"])
    assert e.value.code == 2 and polling.REPLY_ENV in capsys.readouterr().err


def test_patch_reaches_flowers_supernode_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import start_client_internal as sci

    monkeypatch.setattr(sci, "time", sci.time)  # restored after the test
    assert polling.patch_supernode_loop(0.02, 0.003) is True
    assert isinstance(sci.time, polling.PollClock)
    assert (sci.time.idle_s, sci.time.reply_s) == (0.02, 0.003)
    t0 = time.perf_counter()
    sci.time.sleep(3)  # what the loop calls after an empty pull
    assert time.perf_counter() - t0 < 1.0


def test_patch_leaves_an_unknown_flower_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import start_client_internal as sci

    monkeypatch.setattr(sci, "time", sci.time)
    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    with pytest.warns(RuntimeWarning, match="1.43.0"):
        assert polling.patch_supernode_loop(0.02, 0.003) is False
    assert sci.time is time


def test_object_pull_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.inflatable import inflatable_utils as iu

    for fn in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):
        monkeypatch.setattr(fn, "__kwdefaults__", dict(fn.__kwdefaults__))  # restored after the test
        assert (fn.__kwdefaults__["initial_backoff"], fn.__kwdefaults__["backoff_cap"]) == (1, 10)  # Flower's
    monkeypatch.setenv(polling.BACKOFF_ENV, "0.02")
    monkeypatch.delenv(polling.BACKOFF_CAP_ENV, raising=False)
    assert polling.apply() == {"backoff_s": 0.02, "backoff_cap_s": 0.2}
    for fn in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):
        assert (fn.__kwdefaults__["initial_backoff"], fn.__kwdefaults__["backoff_cap"]) == (0.02, 0.2)
    # what Flower's pull loop then does: an object that is not there yet is asked for again after ~0.02 s
    calls: list[float] = []

    def pull(object_id: str) -> bytes:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise iu.ObjectUnavailableError(object_id)
        return b"x"

    assert iu.pull_objects(["a"], pull) == {"a": b"x"}
    assert len(calls) == 3 and calls[-1] - calls[0] < 0.5  # Flower's own back-off: 1 s + 2 s
    monkeypatch.setenv(polling.BACKOFF_CAP_ENV, "-3")
    with pytest.raises(ValueError, match=polling.BACKOFF_CAP_ENV):
        polling.apply()


# ----------------------------------------------------------------------------- the ClientApp worker
def test_worker_refuses_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="poll"):
        ClientAppWorker("127.0.0.1:1", poll_s=0)
    with pytest.raises(SystemExit) as e:
        worker_main(["--runtime-api-address", "127.0.0.1:1", "--insecure", "--poll", "0"])
    assert e.value.code == 2 and "--poll" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        worker_main(["--runtime-api-address", "127.0.0.1:1"])  # neither --insecure nor certificates
    assert e.value.code == 2


def test_worker_polls_at_its_interval_and_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    w = ClientAppWorker("127.0.0.1:1", poll_s=0.25)
    fake = FakeClock()
    asked: list[int] = []
    ran: list[str] = []
    tokens = iter([None, None, "t1", None, "t2"])

    def acquire() -> str | None:
        asked.append(1)
        return next(tokens)

    monkeypatch.setattr("mona_sfl.runtime.flower.clientapp_worker.time", types.SimpleNamespace(sleep=fake.sleep))
    monkeypatch.setattr(w, "acquire", acquire)

    def run_task(token: str) -> bool:
        ran.append(token)
        w.tasks += 1
        return True

    monkeypatch.setattr(w, "run_task", run_task)
    assert w.serve(max_tasks=2) == 2
    w.close()
    assert ran == ["t1", "t2"] and len(asked) == 5
    assert fake.slept == [0.25, 0.25, 0.25]  # a sleep after every empty look, none after a task


def test_deploy_refuses_bad_speed_settings(tmp_path: Path) -> None:
    from mona_sfl.runtime.flower.deploy import deploy

    cfg = schema_config([*TINY, "runtime=flower"])
    with pytest.raises(ValueError, match="clientapp"):
        deploy(cfg, 2, tmp_path / "run", clientapp="forever")
    with pytest.raises(ValueError, match="supernode_poll_s"):
        deploy(cfg, 2, tmp_path / "run", supernode_poll_s=0.0)
    assert not (tmp_path / "run").exists()


def test_deploy_local_refuses_a_bad_poll_interval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import set_args

    from mona_sfl.cli import main

    for bad in ("-1", "nan", "0.0001", "100"):
        assert main(["deploy-local", "--out", str(tmp_path / "run"), "--supernode-poll", bad, *set_args()]) == 2
        assert "--supernode-poll" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_supernode_command_lines() -> None:
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    from mona_sfl.runtime.flower.deploy import Running

    def running(**kw: object) -> Running:
        return Running(port=9, env={}, work=Path("."), logs=Path("."), tls_dir=None, start=lambda *a: None, **kw)  # type: ignore[arg-type, return-value]

    fast = running().supernode_args(1, 2, runtime_port=1234)
    assert fast[1:3] == ["-m", "mona_sfl.runtime.flower.supernode"]
    args = _parse_args_run_supernode().parse_args(fast[3:])  # the rest is flower-supernode's own command line
    assert (args.isolation, args.port, args.host, args.insecure) == ("process", 1234, "127.0.0.1", True)
    stock = running(clientapp="per-message", supernode_poll_s=None).supernode_args(0, 2)
    assert Path(stock[0]).name == "flower-supernode"
    assert _parse_args_run_supernode().parse_args(stock[1:]).isolation == "subprocess"


def test_poll_env_of_the_deployed_processes() -> None:
    """What deploy-local (and docker/compose.flower.yml) put in every process's environment."""
    from mona_sfl.runtime.flower.deploy import DEFAULT_SUPERNODE_POLL_S, poll_env

    assert poll_env() == poll_env(DEFAULT_SUPERNODE_POLL_S) == {polling.IDLE_ENV: "0.05", polling.REPLY_ENV: "0.01"}
    assert poll_env(5.0) == {polling.IDLE_ENV: "5.0", polling.REPLY_ENV: "0.5"}  # the reply poll: at most 0.5 s
    assert poll_env(0.002) == {polling.IDLE_ENV: "0.002", polling.REPLY_ENV: "0.001"}  # ... and at least 1 ms
    assert poll_env(None) == {polling.BACKOFF_ENV: "1", polling.BACKOFF_CAP_ENV: "10"}  # Flower's own intervals


# ----------------------------------------------------------------------------- deployed end to end
@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory, one_thread) -> dict:
    from mona_sfl.engine import Trainer
    from mona_sfl.runtime.flower.deploy import deploy, tagged_pids

    root = tmp_path_factory.mktemp("deployed")
    extra = ["train.max_steps=4"]
    Trainer(schema_config([*TINY, *extra]), root / "local", progress=False).run()
    cfg = schema_config([*TINY, *extra, "runtime=flower", "flower.num_supernodes=2", "flower.step_timeout_s=120"])
    res = deploy(cfg, 2, root / "run", work_dir=root / "work", probe_mb=64.0, extra_env={"OMP_NUM_THREADS": "1"}, timeout_s=600)
    res["still_tagged"] = tagged_pids(res["tag"])
    res["local"], res["run"] = root / "local", root / "run"
    return res


@pytest.mark.slow
def test_deployed_persistent_clientapps_train_like_local(deployed: dict) -> None:
    """SuperLink + 2 SuperNodes with a ClientApp process each that stays up: the local run's numbers."""
    run = deployed["run"]
    assert deployed["summary"]["steps"] == 4 and deployed["summary"]["runtime"] == "flower"
    assert losses(run) == losses(deployed["local"])  # same numbers through HTTP and the long-lived ClientApps
    a, b = load_checkpoint(deployed["local"]), load_checkpoint(run)
    for key in a:
        if key not in {"config", "bytes", "train_time", "torch_rng"}:
            assert_same(a[key], b[key], key)
    started = dict(deployed["started"])
    assert list(started) == ["superlink", "supernode-0", "clientapp-0", "supernode-1", "clientapp-1"]
    transport = json.loads((run / "flower_transport.json").read_text())
    # every message of node i (meta, probe, steps, syncs, state) ran in the one process started for it
    assert transport["flower_clientapp_pids"] == {"0": [started["clientapp-0"]], "1": [started["clientapp-1"]]}
    gaps, wait, compute = (transport[f"flower_step_{k}_s"] for k in ("gaps", "wait", "compute"))
    assert len(gaps) >= 3 and len(wait) == len(compute) == len(gaps) + 1  # n step exchanges, n - 1 gaps between them
    assert all(g > w > c > 0 for g, w, c in zip(gaps, wait, compute))  # a step holds its wait, which holds the node's compute
    assert deployed["survivors"] == [] and deployed["still_tagged"] == []  # every process is gone


@pytest.mark.slow
def test_deployed_large_message_round_trip(deployed: dict) -> None:
    """64 MB (13 chunks of 5 MiB) to each SuperNode and back, bit-exact (FlowerRuntime.probe)."""
    probe = deployed["probe"]
    assert probe["bytes_each_way"] >= 64_000_000 and probe["nodes"] == 2
    assert probe["failures"] == {} and probe["intact"] == {"0": True, "1": True}
