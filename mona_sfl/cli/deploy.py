"""``mona-sfl deploy-local``: train through a local Flower SuperLink and N SuperNodes (separate processes)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from mona_sfl.errors import ConfigError


def add_parser(sub: Any) -> None:
    from mona_sfl.cli import add_settings
    from mona_sfl.runtime.flower.deploy import CLIENTAPP_MODES, DEFAULT_SUPERNODE_POLL_S, tls_help

    p = sub.add_parser(
        "deploy-local",
        help="train through a local Flower SuperLink + N SuperNodes (separate processes on 127.0.0.1)",
        description="Train through a local SuperLink + N SuperNodes (separate processes on 127.0.0.1; insecure unless --tls).",
        epilog=tls_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_settings(p)
    p.add_argument("--nodes", type=int, help="number of SuperNodes, client c on node c %% N (default: flower.num_supernodes, or one per client)")
    p.add_argument("--out", help="run folder (default: runs/<time>-<arch>-cut<N>-<method>-deployed)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before the run is abandoned (default %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (FLWR_HOME, app, logs)")
    p.add_argument("--probe", type=float, default=0.0, metavar="MB", help="first round-trip MB megabytes through every node (large-message check)")
    p.add_argument("--tls", metavar="DIR", help="TLS instead of --insecure: DIR holds ca.crt, server.pem, server.key ('auto': make throw-away ones)")
    p.add_argument("--clientapp", choices=CLIENTAPP_MODES, default=CLIENTAPP_MODES[0],
                   help="persistent (default): one ClientApp process per SuperNode that stays up; per-message: Flower's "
                        "default, a fresh flwr-clientapp process for every message (seconds each)")
    p.add_argument("--supernode-poll", type=float, default=DEFAULT_SUPERNODE_POLL_S, metavar="S",
                   help="SuperNodes' idle poll interval in seconds (default %(default)s; 0 = Flower's own 3 s and 0.5 s)")
    p.add_argument("--auth", action="store_true", help="SuperNode authentication (needs --tls): register DIR/supernode-I.pub, start node I with DIR/supernode-I.key")


def run(args: argparse.Namespace) -> int:
    from mona_sfl.checkpoint import check_new_run_dir, default_run_dir, lock_run_dir
    from mona_sfl.config import load_config, resolve_config_path
    from mona_sfl.runtime.flower.certs import CertError
    from mona_sfl.runtime.flower.deploy import check_out_name, check_tls_dir

    if args.nodes is not None and args.nodes < 1:
        raise ConfigError(f"--nodes must be >= 1, got {args.nodes}")
    nodes = [f"flower.num_supernodes={args.nodes}"] if args.nodes is not None else []
    cfg = load_config(resolve_config_path(args.config), [*args.overrides, "runtime=flower", *nodes])
    run_dir = Path(args.out) if args.out else default_run_dir(cfg, "deployed")
    check_out_name(run_dir)
    check_new_run_dir(run_dir)
    if args.supernode_poll != 0 and not 0.001 <= args.supernode_poll <= 60:
        raise ConfigError(f"--supernode-poll must be 0 (Flower's own intervals) or between 0.001 and 60 seconds, got {args.supernode_poll}")
    if args.auth and not args.tls:
        raise CertError("--auth needs --tls DIR or --tls auto (Flower authenticates SuperNodes only over TLS)")
    if args.tls and args.tls != "auto":
        check_tls_dir(Path(args.tls), cfg.num_nodes if args.auth else 0)
    with lock_run_dir(run_dir, "the deployment"):  # held until every started process has ended
        check_new_run_dir(run_dir)  # again under the lock, before any process starts
        return _deploy(args, cfg, run_dir)


def _deploy(args: argparse.Namespace, cfg: Any, run_dir: Path) -> int:
    from mona_sfl.cli import EXIT_FAILED
    from mona_sfl.cli.train import print_summary
    from mona_sfl.runtime.flower.certs import make_test_certs
    from mona_sfl.runtime.flower.deploy import deploy

    tls = auto_certs = None
    try:
        if args.tls == "auto":
            auto_certs = Path(tempfile.mkdtemp(prefix="mona-flwr-certs-"))
            tls = make_test_certs(auto_certs, nodes=cfg.num_nodes if args.auth else 0, days=2)
        elif args.tls:
            tls = Path(args.tls)  # checked before the lock
        res = deploy(cfg, cfg.num_nodes, run_dir, timeout_s=args.timeout, keep=args.keep, probe_mb=args.probe, tls_dir=tls, auth=args.auth,
                     clientapp=args.clientapp, supernode_poll_s=args.supernode_poll or None)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"mona-sfl: error: the deployment failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if auto_certs is not None:
            shutil.rmtree(auto_certs, ignore_errors=True)  # throw-away keys do not outlive the run
    s = res["summary"]
    print_summary(s, run_dir)
    print(f"flwr run {res['train_s']:.1f} s")
    return 0 if not res["survivors"] else EXIT_FAILED
