"""Deployed Flower on one machine: a SuperLink and N SuperNodes as separate processes.

:func:`deploy` runs one config that way (``mona-sfl deploy-local`` is its command line;
``simulations/deploy_local.sh`` wraps that):

1. picks free ports on 127.0.0.1 and an isolated ``FLWR_HOME`` (a temp folder);
2. starts ``flower-superlink --insecure`` and N ``flower-supernode --insecure`` processes
   (``--node-config 'partition-id=i num-partitions=N'``), each in its own session;
3. writes a minimal Flower app (``pyproject.toml`` naming ``mona_sfl.runtime.flower.{server,client}_app:app``
   with the whole run config, ``out`` = the run folder) and a ``[superlink.deploy]`` connection;
4. ``flwr run <app> deploy --stream`` and waits for the run to finish;
5. stops every process it started, on success, failure or signal: each process is tagged
   with ``MONA_SFL_DEPLOY_TAG=<uuid>`` in its environment (inherited by the ``flower-superexec``,
   ``flwr-serverapp`` and ``flwr-clientapp`` processes Flower spawns, some of them in new
   sessions), and the tagged processes are terminated by PID.

Insecure mode is for one trusted machine only. ``--tls DIR`` (``ca.crt``, ``server.pem``,
``server.key``, as written by :mod:`mona_sfl.runtime.flower.certs`) or ``--tls auto`` (a
throw-away CA) switches the SuperLink, the SuperNodes and the ``flwr`` connection to TLS;
``--auth`` adds SuperNode authentication: the SuperLink starts with ``--enable-supernode-auth``,
the public key ``supernode-I.pub`` of each node is registered with ``flwr supernode register``
before the node starts with ``--auth-supernode-private-key supernode-I.key``, and any SuperNode
whose key is not registered is refused. See ``tls_help()`` for real deployments.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mona_sfl.config import Config, ConfigError
from mona_sfl.runtime.flower.certs import CA_CERT, SERVER_CERT, SERVER_KEY, CertError, node_key_paths
from mona_sfl.runtime.flower.polling import BACKOFF_CAP_ENV, BACKOFF_ENV, IDLE_ENV, REPLY_ENV
from mona_sfl.runtime.flower.run_config import app_config_toml

TAG = "MONA_SFL_DEPLOY_TAG"
CONNECTION = "deploy"
#: How a SuperNode runs its ClientApp: "persistent", one long-lived process per node
#: (:mod:`mona_sfl.runtime.flower.clientapp_worker`, the SuperNode in ``--isolation process``
#: mode); "per-message", Flower's default: a fresh ``flwr-clientapp`` process per message.
CLIENTAPP_MODES = ("persistent", "per-message")
#: The SuperNodes' idle poll interval (Flower's own: 3 s; see :mod:`mona_sfl.runtime.flower.polling`).
DEFAULT_SUPERNODE_POLL_S = 0.05
#: Flower's SuperExec (it starts the ServerApp and, in "per-message" mode, the ``flwr-clientapp``
#: processes) looks for new tasks every second by default; every process here looks every 0.1 s
#: unless the environment sets ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``.
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
DEFAULT_SUPEREXEC_POLL_S = 0.1


def poll_env(supernode_poll_s: float | None = DEFAULT_SUPERNODE_POLL_S) -> dict[str, str]:
    """The poll intervals :func:`deploy` puts in the environment of every process it starts.

    Read by :mod:`mona_sfl.runtime.flower.polling` in the SuperNodes, the ClientApp workers and
    the ServerApp: the SuperNodes' idle poll ``supernode_poll_s`` and their reply poll (a fifth
    of it, at most 0.5 s); ``None``: Flower's own intervals and object-pull back-off (1 s
    doubling to 10 s). docker/compose.flower.yml sets the values of the default.
    """
    if supernode_poll_s is None:
        return {BACKOFF_ENV: "1", BACKOFF_CAP_ENV: "10"}
    return {IDLE_ENV: str(supernode_poll_s), REPLY_ENV: str(min(0.5, max(0.001, supernode_poll_s / 5)))}


def tls_help() -> str:
    return """\
TLS and SuperNode authentication for a real deployment (drop --insecure everywhere):
  mona-sfl certs certs --hosts LINK_HOST --nodes N   # or your own CA's files
  flower-superlink --ssl-ca-certfile certs/ca.crt --ssl-certfile certs/server.pem --ssl-keyfile certs/server.key \\
      --enable-supernode-auth --host 0.0.0.0 --port 8000 --disable-runtime-dependency-installation
  $FLWR_HOME/config.toml:  [superlink.prod]  address = "LINK_HOST:8000"  root-certificates = "certs/ca.crt"
  flwr supernode register certs/supernode-I.pub prod                          # once per node, I = 0..N-1
  flower-supernode --root-certificates certs/ca.crt --auth-supernode-private-key certs/supernode-I.key \\
      --superlink LINK_HOST:8000 --node-config 'partition-id=I num-partitions=N'
  Here: --tls auto --auth does all of this on 127.0.0.1 with throw-away certificates and keys."""


# ----------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with code {proc.returncode} before listening on port {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:g} s")


def tagged_pids(tag: str) -> list[int]:
    """PIDs of this user's processes whose environment holds ``MONA_SFL_DEPLOY_TAG=tag``."""
    needle = f"{TAG}={tag}".encode()
    me = os.getpid()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_tagged(tag: str, procs: list[subprocess.Popen[bytes]], grace_s: float = 10.0) -> list[int]:
    """SIGTERM every tagged process (and our direct children), SIGKILL what is left; returns survivors."""
    pids = set(tagged_pids(tag)) | {p.pid for p in procs if p.poll() is None}
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        for p in procs:
            p.poll()  # reap our direct children
        pids = {pid for pid in pids | set(tagged_pids(tag)) if _alive(pid)}
        if not pids:
            break
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.2)
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    return [pid for pid in tagged_pids(tag) if _alive(pid)]


# ----------------------------------------------------------------------------- the app
def write_app(app_dir: Path, cfg: Config, run_dir: Path, **app: Any) -> None:
    """A minimal Flower app: its code is the installed mona_sfl package, so the FAB holds only pyproject.toml.

    Every value of the run (the run folder ``out`` too, and the app keys ``app``) is written
    here as an escaped TOML string, never spliced into a ``--run-config`` command-line string:
    a folder name with quotes or spaces stays one value.
    """
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(
        "[build-system]\n"
        'requires = ["hatchling"]\n'
        'build-backend = "hatchling.build"\n\n'
        "[project]\n"
        'name = "mona-sfl-deploy"\n'
        'version = "0.1.0"\n'
        "dependencies = []\n\n"
        "[tool.flwr.app]\n"
        'publisher = "mona-sfl"\n\n'
        "[tool.flwr.app.components]\n"
        'serverapp = "mona_sfl.runtime.flower.server_app:app"\n'
        'clientapp = "mona_sfl.runtime.flower.client_app:app"\n\n'
        "[tool.flwr.app.config]\n" + app_config_toml(cfg, out=str(run_dir.resolve()), progress=True, **app),
        encoding="utf-8",
    )


def check_out_name(run_dir: Path) -> None:
    """ConfigError for a run folder name Flower's config cannot carry (bytes that are not UTF-8)."""
    try:
        str(run_dir).encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"--out {str(run_dir)!r} holds bytes that are not UTF-8: choose a folder name of UTF-8 text") from None


def write_connection(flwr_home: Path, port: int, ca: Path | None = None) -> None:
    """``$FLWR_HOME/config.toml`` with the ``[superlink.deploy]`` connection (insecure, or TLS with ``ca``)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{ca.resolve()}"' if ca is not None else "insecure = true"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n{security}\n',
        encoding="utf-8",
    )


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def check_tls_dir(tls: Path, nodes: int = 0) -> None:
    """Raise CertError unless ``tls`` holds the SuperLink's files and ``nodes`` SuperNode key pairs."""
    names = [CA_CERT, SERVER_CERT, SERVER_KEY] + [p.name for i in range(nodes) for p in node_key_paths(tls, i)]
    missing = [n for n in names if not (tls / n).is_file()]
    if missing:
        raise CertError(f"{tls} lacks {', '.join(missing)} (make them with `mona-sfl certs DIR`)")


def _json_out(text: str) -> Any:
    """The JSON document in a ``flwr ... --format json`` output (anything before it is ignored)."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON in the output")
    return json.loads(text[start:])


@dataclass
class Running:
    """A started local deployment (SuperLink up, SuperNodes started), as ``on_ready`` sees it."""

    port: int
    env: dict[str, str]
    work: Path
    logs: Path
    tls_dir: Path | None
    start: Callable[[str, list[str]], subprocess.Popen[bytes]]  # tagged: stopped with the rest
    timeout_s: float = 120.0
    clientapp: str = "persistent"  # see CLIENTAPP_MODES
    supernode_poll_s: float | None = DEFAULT_SUPERNODE_POLL_S

    def supernode_args(self, partition_id: int, num_partitions: int, key: Path | None = None,
                       runtime_port: int | None = None) -> list[str]:
        """``flower-supernode`` command line for this SuperLink (TLS if the deployment has it).

        With ``supernode_poll_s`` set it is Flower's SuperNode with shorter polls
        (:mod:`mona_sfl.runtime.flower.supernode`); with ``clientapp="persistent"`` it runs in
        ``--isolation process`` mode (its ClientApp worker is started by :meth:`start_supernode`).
        """
        sec = ["--insecure"] if self.tls_dir is None else ["--root-certificates", str(self.tls_dir / CA_CERT)]
        exe = [_bin("flower-supernode")] if self.supernode_poll_s is None else [sys.executable, "-m", "mona_sfl.runtime.flower.supernode"]
        args = [
            *exe, *sec, "--superlink", f"127.0.0.1:{self.port}",
            "--node-config", f"partition-id={partition_id} num-partitions={num_partitions}",
            # the SuperNode's own Runtime API (for its ClientApp processes) stays on loopback
            "--host", "127.0.0.1", "--port", str(runtime_port or free_port()),
        ]
        if self.clientapp == "persistent":
            args += ["--isolation", "process"]
        if key is not None:
            args += ["--auth-supernode-private-key", str(Path(key).resolve())]
        return args

    def start_supernode(self, partition_id: int, num_partitions: int, key: Path | None = None) -> None:
        """Start SuperNode ``partition_id`` and, with ``clientapp="persistent"``, its ClientApp worker."""
        port = free_port()
        self.start(f"supernode-{partition_id}", self.supernode_args(partition_id, num_partitions, key=key, runtime_port=port))
        if self.clientapp == "persistent":
            self.start(f"clientapp-{partition_id}", [
                sys.executable, "-m", "mona_sfl.runtime.flower.clientapp_worker",
                "--runtime-api-address", f"127.0.0.1:{port}", "--insecure",  # the Runtime API is plain HTTP on loopback
            ])

    def flwr(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``flwr ARGS`` against this deployment's FLWR_HOME (the ``deploy`` connection)."""
        return subprocess.run(
            [_bin("flwr"), *args], env=self.env, cwd=self.work, capture_output=True, text=True,
            stdin=subprocess.DEVNULL, timeout=min(self.timeout_s, 300.0), check=False,
        )

    def register(self, public_key: Path) -> int:
        """``flwr supernode register KEY.pub``: returns the node id the SuperLink assigned."""
        r = self.flwr("supernode", "register", str(Path(public_key).resolve()), CONNECTION, "--format", "json")
        try:
            out = _json_out(r.stdout)
            ok = r.returncode == 0 and out.get("success") is True
        except ValueError:
            ok = False
        if not ok:
            raise RuntimeError(f"flwr supernode register {public_key} failed (exit {r.returncode}): {(r.stdout + r.stderr).strip()[-2000:]}")
        return int(out["node-id"])

    def nodes(self) -> list[dict[str, Any]]:
        """The SuperLink's node list (``flwr supernode ls``): node-id, status, ..."""
        r = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        try:
            out = _json_out(r.stdout)
        except ValueError:
            out = {}
        if r.returncode != 0 or out.get("success") is not True:
            raise RuntimeError(f"flwr supernode ls failed (exit {r.returncode}): {(r.stdout + r.stderr).strip()[-2000:]}")
        return list(out["nodes"])


def deploy(
    cfg: Config,
    num_nodes: int,
    run_dir: Path,
    *,
    work_dir: Path | None = None,
    timeout_s: float = 1800.0,
    keep: bool = False,
    probe_mb: float = 0.0,
    train: bool = True,
    extra_env: dict[str, str] | None = None,
    tls_dir: Path | None = None,
    auth: bool = False,
    on_ready: Callable[[Running], None] | None = None,
    log: Any = sys.stderr,
    clientapp: str = "persistent",
    supernode_poll_s: float | None = DEFAULT_SUPERNODE_POLL_S,
) -> dict[str, Any]:
    """Run ``cfg`` through a local SuperLink and ``num_nodes`` SuperNodes.

    With ``probe_mb > 0`` the run first round-trips that many MB through every node (the
    large-message check, ``result["probe"]``, also in ``<run_dir>/flower_probe.json``); then, if
    ``train``, it trains (``result["summary"]``). Raises RuntimeError when a run fails; every started process is
    stopped in any case. ``result["survivors"]`` lists tagged PIDs still alive after cleanup
    (should be empty). ``tls_dir`` (ca.crt, server.pem, server.key) switches from
    ``--insecure`` to TLS between the CLI, the SuperLink and the SuperNodes. ``auth`` (needs
    ``tls_dir``) enables SuperNode authentication: node i's public key
    ``tls_dir/supernode-i.pub`` is registered before the node starts with
    ``tls_dir/supernode-i.key`` (``result["registered"]``: partition id -> node id;
    ``result["nodes"]``: the SuperLink's node list after the run, ``flwr supernode ls``).
    ``on_ready(running)`` is called once the SuperLink and the SuperNodes are started, before
    ``flwr run`` (tests use it to start a SuperNode the SuperLink must refuse).

    Speed (docs/performance.md): ``clientapp`` is one of :data:`CLIENTAPP_MODES` (default
    "persistent": one ClientApp process per SuperNode that stays up); ``supernode_poll_s`` is
    the SuperNodes' idle poll interval (their reply poll is a fifth of it, at most 0.5 s; every
    process's object-pull back-off starts at 0.01 s; ``None``: Flower's stock ``flower-supernode``,
    3 s and 0.5 s, and Flower's back-off, 1 s doubling to 10 s; see :mod:`mona_sfl.runtime.flower.polling`). ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``
    (Flower's SuperExec, which starts the ServerApp and, per message, the ``flwr-clientapp``
    processes) is 0.1 s unless the environment sets it.
    """
    if clientapp not in CLIENTAPP_MODES:
        raise ValueError(f"clientapp={clientapp!r}: one of {', '.join(CLIENTAPP_MODES)}")
    if supernode_poll_s is not None and not 0.001 <= supernode_poll_s <= 60:
        raise ValueError(f"supernode_poll_s={supernode_poll_s}: between 0.001 and 60 seconds (None: Flower's 3 s)")
    if auth and tls_dir is None:
        raise ValueError("SuperNode authentication needs TLS (tls_dir)")
    if tls_dir is not None:
        check_tls_dir(Path(tls_dir), num_nodes if auth else 0)
    run_dir = Path(run_dir).resolve()
    check_out_name(run_dir)
    tag = uuid.uuid4().hex
    own_tmp = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="mona-flwr-")) if work_dir is None else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    flwr_home, app_dir, logs = work / "flwr_home", work / "app", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        TAG: tag,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # SuperExec looks for new ServerApp/ClientApp tasks every second by default
        SUPEREXEC_POLL_ENV: os.environ.get(SUPEREXEC_POLL_ENV, str(DEFAULT_SUPEREXEC_POLL_S)),
        "PYTHONUNBUFFERED": "1",
        # read by mona_sfl.runtime.flower.polling in every process (SuperNodes, ClientApp workers, ServerApp)
        **poll_env(supernode_poll_s),
        **(extra_env or {}),
        # Flower spawns flower-superexec, flwr-serverapp and flwr-clientapp by name
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    procs: list[subprocess.Popen[bytes]] = []
    files: list[Any] = []

    def start(name: str, args: list[str]) -> subprocess.Popen[bytes]:
        f = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - closed in finally
        files.append(f)
        p = subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=work)
        procs.append(p)
        result["started"].append((name, p.pid))
        print(f"deploy: started {name} (pid {p.pid}): {' '.join(args)}", file=log, flush=True)
        return p

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for s in previous:
        signal.signal(s, on_signal)
    result: dict[str, Any] = {"work_dir": str(work), "logs": str(logs), "tag": tag, "started": []}
    try:
        tls = None if tls_dir is None else Path(tls_dir).resolve()
        if tls is not None:
            link_sec = ["--ssl-ca-certfile", str(tls / CA_CERT), "--ssl-certfile", str(tls / SERVER_CERT), "--ssl-keyfile", str(tls / SERVER_KEY)]
            if auth:
                link_sec.append("--enable-supernode-auth")
        else:
            link_sec = ["--insecure"]
        write_connection(flwr_home, port := free_port(), None if tls is None else tls / CA_CERT)
        out_dir = run_dir if train else work / "probe"
        write_app(app_dir, cfg, out_dir, **({"probe_mb": float(probe_mb)} if probe_mb > 0 else {}), **({} if train else {"probe_only": True}))
        link = start(
            "superlink",
            [_bin("flower-superlink"), *link_sec, "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"],
        )
        wait_port(port, 120, link)
        running = Running(port=port, env=env, work=work, logs=logs, tls_dir=tls, start=start, timeout_s=timeout_s,
                          clientapp=clientapp, supernode_poll_s=supernode_poll_s)
        if auth:
            assert tls is not None
            result["registered"] = {i: running.register(node_key_paths(tls, i)[1]) for i in range(num_nodes)}
        for i in range(num_nodes):
            key = node_key_paths(tls, i)[0] if auth and tls is not None else None
            running.start_supernode(i, num_nodes, key=key)
        if on_ready is not None:
            on_ready(running)

        def flwr_run(name: str, expect: Path) -> dict[str, Any]:
            args = [_bin("flwr"), "run", str(app_dir), CONNECTION, "--stream"]  # the run's values are in the app's pyproject.toml
            t0 = time.perf_counter()
            run = subprocess.run(args, env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
            out = run.stdout.decode(errors="replace")
            (logs / f"flwr-run-{name}.log").write_text(out)
            result[f"{name}_s"] = time.perf_counter() - t0
            if run.returncode != 0 or not expect.is_file():
                tail = "\n".join(out.splitlines()[-40:])
                raise RuntimeError(f"flwr run ({name}) failed (exit {run.returncode}, {expect.name} {'found' if expect.is_file() else 'missing'}); logs in {logs}\n{tail}")
            return json.loads(expect.read_text())

        if probe_mb > 0 or train:
            expect = out_dir / ("summary.json" if train else "flower_probe.json")
            done = flwr_run("train" if train else "probe", expect)
            if train:
                result["summary"] = done
            if probe_mb > 0:
                result["probe"] = json.loads((out_dir / "flower_probe.json").read_text())
                print(f"deploy: probe {probe_mb:g} MB to each of {num_nodes} nodes and back in {result['probe']['seconds']:.1f} s, intact", file=log, flush=True)
        if auth:  # the nodes the SuperLink knows at the end: the registered ones only
            result["nodes"] = running.nodes()
        result["ok"] = True
        return result
    finally:
        survivors = stop_tagged(tag, procs)
        for f in files:
            f.close()
        for s, h in previous.items():
            signal.signal(s, h)
        result["survivors"] = survivors
        if survivors:
            print(f"deploy: WARNING processes still alive after cleanup: {survivors}", file=log, flush=True)
        else:
            print(f"deploy: stopped all {len(procs)} started processes and their children", file=log, flush=True)
        if own_tmp and not keep and result.get("ok"):
            shutil.rmtree(work, ignore_errors=True)
        elif not result.get("ok"):
            print(f"deploy: logs kept in {logs}", file=log, flush=True)
