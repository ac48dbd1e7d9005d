"""Start a Flower run from Python: the simulation engine behind ``mona-sfl train --set runtime=flower``.

:func:`train_with_flower` runs the ServerApp (the ordinary Trainer with a FlowerRuntime) in
this process and ``flower.num_supernodes`` virtual SuperNodes on Flower's Ray backend
(``flwr.simulation.run_simulation``), and returns the run's summary.

Ray is started here, in the main thread, before the engine: its backend then reuses it instead
of calling ``ray.init`` itself. ``ray.init`` takes over SIGTERM (Ray's handler aborts the
process); starting it here lets :func:`mona_sfl.interrupt.rearm` put the stop handlers back, so
that SIGTERM stops a run cleanly (checkpoint, every process ended, exit 143) as SIGINT does.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from mona_sfl.config import Config, replace
from mona_sfl.runtime.reaper import Reaper



class _DropDeprecation(logging.Filter):
    """run_simulation is deprecated in favour of `flwr run`; we use it on purpose (in-process, no SuperLink)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation` function is deprecated" not in str(record.getMessage())


def simulation_backend_config(cfg: Config, *, cpus_per_client: float | None = None) -> dict[str, Any]:
    """Ray backend settings: ``flower.cpus_per_client`` CPUs per ClientApp (default 1: 2 run at once on 2 cores), GPU share when CUDA is used."""
    import torch

    if cpus_per_client is None:
        cpus_per_client = cfg.flower.cpus_per_client
    num_gpus = 0.0
    if cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        cpus = os.cpu_count() or 1
        num_gpus = 1.0 / max(1, min(cfg.num_nodes, int(cpus // cpus_per_client)))
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": True}
    if not os.environ.get("RAY_ADDRESS"):
        # ray.init() without an address joins the newest cluster started on this machine
        # (/tmp/ray/ray_current_cluster), e.g. another user's `ray start`: start our own instead.
        # Set RAY_ADDRESS to run the simulation on an existing (multi-node) Ray cluster.
        init_args["address"] = "local"
    num_cpus = int(cpus_per_client) if float(cpus_per_client).is_integer() else float(cpus_per_client)
    return {"client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus}, "init_args": init_args}


def start_ray_for_simulation(backend_config: dict[str, Any]) -> Reaper | None:
    """``ray.init`` as Flower's Ray backend would call it (its ``init_args``, dashboard off, this
    process's ``sys.path`` as the workers' PYTHONPATH), here in the calling thread; then the
    stop handlers are installed again. Returns the :class:`~mona_sfl.runtime.reaper.Reaper` of
    the local instance started (its processes end with this one, also after a SIGKILL; close it
    after ``ray.shutdown()``), or None (and does nothing) when this process is already
    connected to Ray.

    There is no setting to bind the local instance to 127.0.0.1: ``ray.init`` replaces a
    loopback ``_node_ip_address`` with the machine's address. The dashboard, the one HTTP
    server, stays off.
    """
    import ray

    from mona_sfl.interrupt import rearm

    if ray.is_initialized():
        return None
    init_args = {str(k).replace("-", "_"): v for k, v in (backend_config.get("init_args") or {}).items()}
    init_args.setdefault("include_dashboard", False)
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    init_args.setdefault("runtime_env", {"env_vars": {"PYTHONPATH": pythonpath}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO tip
        ray.init(**init_args)
    rearm()  # ray.init replaced the SIGTERM handler; a no-op outside stop_on_signals
    reaper = Reaper()
    reaper.record()  # only this process's descendants: nothing of a cluster it attached to
    return reaper


def train_with_flower(
    cfg: Config,
    run_dir: str | Path,
    progress: bool = True,
    *,
    backend_config: dict[str, Any] | None = None,
    resume: bool = False,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` on Flower's simulation engine (Ray backend) and return the summary dict.

    The run folder is the usual one (config.toml, metrics.jsonl, checkpoint.pt,
    summary.json, plus flower_transport.json). ``cfg.runtime`` is recorded as 'flower'.
    ``resume=True`` continues the run in ``run_dir`` (``cfg`` must be its config, see
    :func:`resume_with_flower`).
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from flwr.simulation import run_simulation

    from mona_sfl.runtime.flower.client_app import make_client_app
    from mona_sfl.runtime.flower.run_config import config_to_run_config
    from mona_sfl.runtime.flower.server_app import make_server_app

    if cfg.runtime != "flower":
        cfg = replace(cfg, runtime="flower")
    num_nodes = cfg.num_nodes
    result: dict[str, Any] = {}
    server_app = make_server_app(cfg, run_dir, progress=progress, result=result, resume=resume, max_steps=max_steps)
    client_app = make_client_app(config_to_run_config(cfg))
    flwr_log = logging.getLogger("flwr")
    propagate = flwr_log.propagate
    flwr_log.propagate = False  # Flower prints through its own handler; do not repeat its DEBUG records via root
    quiet = _DropDeprecation()
    flwr_log.addFilter(quiet)
    backend_config = backend_config or simulation_backend_config(cfg)
    reaper: Reaper | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            # Ray in this (the main) thread before the engine, which reuses it: SIGTERM stays ours
            reaper = start_ray_for_simulation(backend_config)
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_nodes,
                backend_name="ray",
                backend_config=backend_config,
            )
        except BaseException:
            if "error" in result:  # the ServerApp's own exception (ConfigError, DataError, ...) beats Flower's wrapper
                raise result["error"] from None
            raise
        finally:
            flwr_log.propagate = propagate
            flwr_log.removeFilter(quiet)
            if reaper is not None:  # the backend shuts Ray down when it ends; not when it failed to start
                import ray

                ray.shutdown()
                reaper.close()
    if "error" in result:
        raise result["error"]
    if "summary" not in result:
        raise RuntimeError("the Flower simulation ended without a result from the ServerApp (see the log above)")
    return result["summary"]


def resume_with_flower(run_dir: str | Path, progress: bool = True, max_steps: int | None = None) -> dict[str, Any]:
    """``mona-sfl train --resume RUN`` for a run whose config says runtime='flower'.

    The checks are :meth:`Trainer.resume`'s (config, checkpoint version); the clients' state
    from the checkpoint is sent back to fresh SuperNodes (``train.load``).
    """
    from mona_sfl.checkpoint import load_run_config

    return train_with_flower(load_run_config(Path(run_dir)), run_dir, progress, resume=True, max_steps=max_steps)


__all__ = ["train_with_flower", "resume_with_flower", "simulation_backend_config", "start_ray_for_simulation"]
