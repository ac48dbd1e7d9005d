"""``mona-sfl certs OUT``: a CA, a SuperLink TLS certificate and SuperNode keys for a Flower deployment."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

def add_parser(sub: Any) -> None:
    from mona_sfl.runtime.flower.certs import DEFAULT_HOSTS

    p = sub.add_parser(
        "certs",
        help="make a CA, a SuperLink TLS certificate and SuperNode authentication keys (Flower deployment)",
        description="Make a CA, a SuperLink TLS certificate and SuperNode authentication keys for a Flower deployment.",
        epilog=(
            "Then: flower-superlink --ssl-ca-certfile OUT/ca.crt --ssl-certfile OUT/server.pem "
            "--ssl-keyfile OUT/server.key --enable-supernode-auth ...; flwr supernode register "
            "OUT/supernode-I.pub CONNECTION; flower-supernode --root-certificates OUT/ca.crt "
            "--auth-supernode-private-key OUT/supernode-I.key ..."
        ),
    )
    p.add_argument("out", help="folder to write into (files that exist are never overwritten)")
    p.add_argument("--hosts", default=",".join(DEFAULT_HOSTS), help="comma-separated IPs/DNS names the SuperLink is reached at (its certificate's SANs; default %(default)s)")
    p.add_argument("--nodes", type=int, default=0, help="number of SuperNode key pairs supernode-0..N-1 (default %(default)s)")
    p.add_argument("--days", type=int, default=365, help="certificate validity in days (default %(default)s)")
    p.add_argument("--node-keys-only", action="store_true", help="only make SuperNode key pairs (numbered after the ones OUT already has)")


def run(args: argparse.Namespace) -> int:
    from mona_sfl.runtime.flower.certs import CA_CERT, SERVER_CERT, add_node_keys, make_test_certs, node_key_paths

    out = Path(args.out)
    if args.node_keys_only:
        made = add_node_keys(out, args.nodes)
    else:
        make_test_certs(out, tuple(args.hosts.split(",")), args.nodes, args.days)
        made = [out / CA_CERT, out / SERVER_CERT] + [node_key_paths(out, i)[1] for i in range(args.nodes)]
    for path in made:
        print(f"wrote {path}")
    return 0
