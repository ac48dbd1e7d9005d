"""A ClientApp process that stays up: one per SuperNode, serving every message of the node.

In its default isolation mode a Flower 1.42 SuperNode runs each message in a fresh
``flwr-clientapp`` process (started by ``flower-superexec``): Python start, ``import flwr``,
the FAB installed, the app loaded, ``import torch`` and the data built by the first handler
that computes, one message, exit. Flower has no ClientApp that stays up (flwr issue 3670).
Its other isolation mode, ``flower-supernode --isolation process``, leaves starting the
ClientApps to something outside the SuperNode; this module is that something:

    python -m mona_sfl.runtime.flower.clientapp_worker --runtime-api-address 127.0.0.1:PORT --insecure

asks the SuperNode's Runtime API for a pending ClientApp task every ``--poll`` seconds
(``AcquireTask``, what ``flower-superexec`` does every ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``)
and runs each task in this process with the steps of Flower's ``flwr-clientapp``
(``flwr/supernode/runtime/run_clientapp.py``): pull the message and the context with the
task's token, run the ClientApp, push the reply, push the context and the task's status.
What a fresh process would redo for every message is done once: the FAB is installed and
the ClientApp loaded once per FAB, torch imported once, and the node's data and partition
built once (``mona_sfl.runtime.flower.node`` caches them per process). Flower's object-pull
back-off is shortened in this process (:mod:`mona_sfl.runtime.flower.polling`): the SuperNode
hands out a task before it has pulled the message's objects from the SuperLink.

The ClientApp itself is unchanged: it still rebuilds its host from ``context.state`` for
every message, so a node computes exactly what it computes with Flower's fresh processes
(and survives its worker being restarted: the state lives in the SuperNode).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("mona_sfl.flower.worker")


def _runtime_client(address: str, insecure: bool, certificates: bytes | None, *interceptors: Any) -> Any:
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=certificates,
        interceptors=list(interceptors), retry_invoker=make_simple_http_retry_invoker(),
    )


class ClientAppWorker:
    """Acquires the SuperNode's ClientApp tasks and runs them in this process, one at a time."""

    def __init__(self, runtime_api_address: str, *, insecure: bool = True, certificates: bytes | None = None,
                 poll_s: float = 0.02) -> None:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        if not poll_s > 0:
            raise ValueError(f"poll interval must be > 0 s, got {poll_s}")
        self.address = runtime_api_address
        self.insecure = insecure
        self.certificates = certificates
        self.poll_s = poll_s
        self.tasks = 0  # tasks run (replied or failed)
        self._apps: dict[str, Any] = {}  # FAB hash -> loaded ClientApp
        self._client = _runtime_client(runtime_api_address, insecure, certificates,
                                       RuntimeVersionHttpInterceptor(component_name="SuperExec"))

    def acquire(self) -> str | None:
        """The token of a pending ClientApp task, or None."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        res = self._client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[]))
        if res.HasField("task") and res.token:
            if res.task.type != TaskType.CLIENT_APP:  # asked for ClientApp tasks only
                raise RuntimeError(f"the SuperNode handed out a {res.task.type!r} task")
            return str(res.token)
        return None

    def _app(self, run: Any, fab: Any) -> Any:
        key = fab.hash_str
        if key not in self._apps:
            from flwr.cli.install import install_from_fab
            from flwr.clientapp.utils import get_load_client_app_fn

            install_from_fab(fab.content, skip_prompt=True)
            self._apps = {key: get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(run.fab_id, run.fab_version, key)}
        return self._apps[key]

    def run_task(self, token: str) -> bool:
        """Run one task the way ``flwr-clientapp`` does; True when the ClientApp replied without error."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        client = _runtime_client(self.address, self.insecure, self.certificates,
                                 RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token))
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        message = reply = context = None
        sub_status, details, ok = SubStatus.FAILED, "ClientApp task failed due to unknown reason", False
        heartbeat.start()
        t = [time.perf_counter()]
        try:
            message, context, run, fab = pull_task_input(client)
            t.append(time.perf_counter())
            reply = self._app(run, fab)(message=message, context=context)
            t.append(time.perf_counter())
            sub_status, details, ok = SubStatus.COMPLETED, "", not reply.has_error()
        except Exception as ex:  # noqa: BLE001 - as flwr-clientapp: the error goes back to the ServerApp
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"
            log.exception("ClientApp raised an exception")
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception:  # noqa: BLE001
                log.exception("failed to push the reply")
                ok = False
            push_task_output(client=client, context=context, sub_status=sub_status, details=details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
            self.tasks += 1
            t.append(time.perf_counter())
            log.info("task %d (%s): %s in %.3f s: pull %.3f s, ClientApp %.3f s, push %.3f s", self.tasks,
                     message.metadata.message_type if message is not None else "-", "ok" if ok else "failed", t[-1] - t[0],
                     *([t[1] - t[0], t[2] - t[1], t[3] - t[2]] if len(t) == 4 else [float("nan")] * 3))
        return ok

    def serve(self, stop: threading.Event | Callable[[], bool] | None = None, max_tasks: int | None = None) -> int:
        """Acquire and run tasks until ``stop`` is set or ``max_tasks`` ran; returns the tasks run."""
        is_stopped: Callable[[], bool] = stop.is_set if isinstance(stop, threading.Event) else (stop or (lambda: False))
        while not is_stopped() and (max_tasks is None or self.tasks < max_tasks):
            try:
                token = self.acquire()
            except Exception as e:  # noqa: BLE001 - the SuperNode restarting: try again
                log.warning("AcquireTask failed (%s); retrying", e)
                token = None
                time.sleep(1.0)
            if token is None:
                time.sleep(self.poll_s)
                continue
            self.run_task(token)
        return self.tasks

    def close(self) -> None:
        self._client.close()


def parser() -> argparse.ArgumentParser:
    """The worker's command line (docker/compose.flower.yml is checked against it)."""
    ap = argparse.ArgumentParser(prog="python -m mona_sfl.runtime.flower.clientapp_worker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime-api-address", required=True, help="HOST:PORT of the SuperNode's Runtime API (its --port)")
    sec = ap.add_mutually_exclusive_group(required=True)
    sec.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API (loopback only)")
    sec.add_argument("--root-certificates", help="CA certificate (PEM) of the Runtime API's TLS certificate")
    ap.add_argument("--poll", type=float, default=0.02, help="seconds between looks for a pending task (default %(default)s)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if not 0.001 <= args.poll <= 60:
        ap.error(f"--poll must be between 0.001 and 60 seconds, got {args.poll}")
    from mona_sfl.runtime.flower import polling

    try:
        polling.apply()  # objects of a message the SuperNode is still pulling: look again soon, not after 1 s
    except ValueError as e:
        ap.error(str(e))
    certs = Path(args.root_certificates).read_bytes() if args.root_certificates else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.set())
    worker = ClientAppWorker(args.runtime_api_address, insecure=args.insecure, certificates=certs, poll_s=args.poll)
    try:
        n = worker.serve(stop)
    finally:
        worker.close()
    log.info("stopped after %d task(s)", n)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ClientAppWorker", "main", "parser"]
