#!/usr/bin/env bash
# Make the TLS certificates and SuperNode authentication keys of a Flower deployment:
# a CA (ca.crt, ca.key), the SuperLink's certificate (server.pem, server.key; SANs = --hosts)
# and N SuperNode key pairs (supernode-I.key for flower-supernode --auth-supernode-private-key,
# supernode-I.pub for flwr supernode register). Existing files are never overwritten (nothing is
# written when one exists), unless --force is given.
#
#   simulations/gen_certs.sh OUT [--hosts 127.0.0.1,localhost] [--nodes N] [--days 365] [--force]
#   simulations/gen_certs.sh certs --hosts 10.0.0.5,link.example.org --nodes 4
#   simulations/gen_certs.sh certs --node-keys-only --nodes 2      # two more SuperNodes later
#
# Exit codes: 0 success, 2 bad input (e.g. a file that already exists).
set -euo pipefail

PYTHON="${PYTHON:-python}"
if [[ -x "${VIRTUAL_ENV:-}/bin/python" ]]; then PYTHON="$VIRTUAL_ENV/bin/python"; fi
exec "$PYTHON" -m mona_sfl certs "$@"
