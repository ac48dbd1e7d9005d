"""The Flower ServerApp: the ordinary Trainer, with its clients on SuperNodes.

``main(grid, context)`` rebuilds the Config from ``context.run_config`` (flat config keys,
see ``run_config``), creates a :class:`FlowerRuntime` on the Grid and runs
:class:`mona_sfl.engine.Trainer`, which writes the usual run folder (``out`` key).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from logging import INFO

from flwr.app import Context
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid, ServerApp

from mona_sfl.checkpoint import default_run_dir
from mona_sfl.config import Config
from mona_sfl.runtime.flower.run_config import config_from_run_config
from mona_sfl.runtime.flower.runtime import FlowerRuntime


def flower_runtime(grid: Grid) -> Callable[[Config], FlowerRuntime]:
    """The Trainer's runtime argument for clients reached through ``grid`` (``Trainer.resume`` too)."""
    return lambda cfg: FlowerRuntime(cfg, grid)


def run_trainer(
    grid: Grid,
    cfg: Config,
    run_dir: str | Path,
    *,
    progress: bool = False,
    probe_mb: float = 0.0,
    train: bool = True,
    resume: bool = False,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train (or resume) one run through ``grid``; returns the engine's summary plus Flower transport figures.

    ``probe_mb > 0`` first round-trips that many MB through every node (large-message check,
    ``<run_dir>/flower_probe.json``); ``train=False`` stops after the probe. ``resume``
    continues the run in ``run_dir`` from its checkpoint (its own config; ``max_steps`` may
    extend it), the client state going back to the nodes.
    """
    from mona_sfl.engine import Trainer

    summary: dict[str, Any] = {}
    if train and not resume:
        from mona_sfl.checkpoint import check_new_run_dir

        check_new_run_dir(Path(run_dir))  # never write a new run over another one (`flwr run` passes any out)
    if resume:
        trainer = Trainer.resume(run_dir, progress=progress, max_steps=max_steps, runtime=flower_runtime(grid))
        runtime = trainer.runtime
    else:
        runtime = FlowerRuntime(cfg, grid)
        trainer = None
    try:
        if probe_mb > 0:
            summary["probe"] = run_probe(runtime, run_dir, probe_mb)
        if train:
            if trainer is None:
                trainer = Trainer(cfg, run_dir, progress=progress, runtime=runtime)
            summary.update(trainer.run(resumed=resume))
            summary.update(total_steps=trainer.total_steps, device=str(trainer.device))
    finally:
        runtime.close()
    transport = {"flower_nodes": runtime.num_nodes, "flower_exchanges": runtime.exchanges, "flower_wait_s": runtime.wait_s,
                 **{f"flower_wire_{k}": v for k, v in runtime.wire.items()},
                 "flower_step_gaps_s": [round(g, 6) for g in runtime.step_gaps()],
                 **{f"flower_step_{k}_s": [round(v, 6) for v in vs] for k, vs in runtime.step_timing().items()},
                 "flower_clientapp_pids": {str(p): v for p, v in runtime.clientapp_pids().items()}}
    summary.update(transport)
    if train:  # next to summary.json: what the transport cost (the engine's summary has the bytes)
        (Path(run_dir) / "flower_transport.json").write_text(json.dumps(transport, indent=2) + "\n")
    return summary


def run_probe(runtime: FlowerRuntime, run_dir: str | Path, mb: float) -> dict[str, Any]:
    """Large-message check: ``mb`` MB to every node and back, bit-exact; writes ``flower_probe.json``."""
    res = runtime.probe(int(mb * 1e6))
    res = {**res, "intact": {str(k): v for k, v in res["intact"].items()}, "failures": {str(k): v for k, v in res["failures"].items()}}
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flower_probe.json").write_text(json.dumps(res, indent=2) + "\n")
    if res["failures"] or not all(res["intact"].values()):
        raise RuntimeError(f"flower probe failed: {res}")
    return res


def make_server_app(cfg: Config | None = None, run_dir: str | Path | None = None, *, progress: bool = False,
                    result: dict[str, Any] | None = None, resume: bool = False, max_steps: int | None = None) -> ServerApp:
    """A ServerApp; with ``cfg`` given it ignores ``run_config`` (the in-process simulation API has none).

    ``result`` receives ``"summary"`` or ``"error"`` (the exception, re-raised by the caller).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            if type(grid).__name__ != "InMemoryGrid":  # deployed: replies' objects arrive after the replies
                from mona_sfl.runtime.flower import polling

                polling.apply()
            rc = dict(context.run_config)
            if cfg is not None:
                run_cfg, out, prog, res, steps = cfg, run_dir, progress, resume, max_steps
            else:
                run_cfg = config_from_run_config(rc)
                out, prog, res = str(rc.get("out", "")), bool(rc.get("progress", False)), bool(rc.get("resume", False))
                steps = run_cfg.train.max_steps if res and run_cfg.train.max_steps else None
            if res and not out:
                raise ValueError("resume=true needs out=<the run folder to continue>")
            out_dir = Path(out) if out else default_run_dir(run_cfg, "flower")
            summary = run_trainer(grid, run_cfg, out_dir, progress=prog, probe_mb=float(rc.get("probe_mb", 0.0)),
                                  train=not bool(rc.get("probe_only", False)), resume=res, max_steps=steps)
            if "knn_top1" in summary:  # streamed by `flwr run --stream`
                flwr_log(INFO, "mona-sfl: kNN top-1 %.2f%% after %s steps; run folder %s", summary["knn_top1"], summary.get("steps"), out_dir)
            if result is not None:
                result["summary"] = summary
                result["run_dir"] = str(out_dir)
        except BaseException as e:
            if result is not None:
                result["error"] = e
            raise

    return app


# The ServerApp that `flwr run` loads ([tool.flwr.app.components]).
app = make_server_app()

__all__ = ["app", "make_server_app", "flower_runtime", "run_trainer", "run_probe"]
