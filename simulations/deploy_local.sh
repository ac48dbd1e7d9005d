#!/usr/bin/env bash
# Train through a deployed Flower federation on this machine: one SuperLink and N SuperNodes,
# each a separate process on 127.0.0.1 (insecure mode, free ports picked at run time), then
# `flwr run` with an isolated FLWR_HOME. Writes the usual run folder and stops every process
# it started, also on failure or Ctrl-C.
#
#   simulations/deploy_local.sh [--nodes N] [--config FILE] [--set KEY=VALUE ...] [--out DIR] [--probe MB] [--tls DIR|auto] [--keep]
#   simulations/deploy_local.sh --nodes 2 --set train.max_steps=4 --out runs/deployed
#
# Exit codes: 0 success, 2 bad input, 1 the run failed. See --help for TLS flags of a real deployment.
set -euo pipefail

PYTHON="${PYTHON:-python}"
if [[ -x "${VIRTUAL_ENV:-}/bin/python" ]]; then PYTHON="$VIRTUAL_ENV/bin/python"; fi
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1

# The Python driver tags, tracks and stops the SuperLink, the SuperNodes and everything Flower
# spawns under them; this trap makes sure the driver itself is told to clean up (SIGTERM, then
# SIGKILL after a grace period) if this script is interrupted or killed.
child=""
cleanup() {
  local rc=$?
  if [[ -n "$child" ]] && kill -0 "$child" 2>/dev/null; then
    kill -TERM "$child" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$child" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$child" 2>/dev/null || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$PYTHON" -m mona_sfl deploy-local "$@" &
child=$!
wait "$child"
