"""``mona-sfl certs --out OUT [--force]``: a CA, a SuperLink TLS certificate and SuperNode keys for a Flower deployment."""

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
    p.add_argument("out", nargs="?", help="folder to write into (same as --out)")
    p.add_argument("--out", dest="out_opt", metavar="OUT", help="folder to write into: nothing is written when a file to write exists there, unless --force")
    p.add_argument("--force", action="store_true", help="replace the CA, server and SuperNode files that exist in OUT (their old keys stop working)")
    p.add_argument("--hosts", default=",".join(DEFAULT_HOSTS), help="comma-separated IPs/DNS names the SuperLink is reached at (its certificate's SANs; default %(default)s)")
    p.add_argument("--nodes", type=int, default=0, help="number of SuperNode key pairs supernode-0..N-1 (default %(default)s)")
    p.add_argument("--days", type=int, default=365, help="certificate validity in days (default %(default)s)")
    p.add_argument("--node-keys-only", action="store_true", help="only make SuperNode key pairs (numbered after the ones OUT already has)")


def run(args: argparse.Namespace) -> int:
    from mona_sfl.runtime.flower.certs import CA_CERT, SERVER_CERT, CertError, add_node_keys, make_test_certs, node_key_paths

    if args.out and args.out_opt and args.out != args.out_opt:
        raise CertError(f"two output folders: {args.out} and --out {args.out_opt}: pass one")
    if not (args.out or args.out_opt):
        raise CertError("pass the output folder: mona-sfl certs --out DIR")
    out = Path(args.out or args.out_opt)
    if args.node_keys_only:
        if args.force:
            raise CertError("--node-keys-only adds keys after the existing ones and never replaces any: drop --force")
        made = add_node_keys(out, args.nodes)
    else:
        make_test_certs(out, tuple(args.hosts.split(",")), args.nodes, args.days, force=args.force)
        made = [out / CA_CERT, out / SERVER_CERT] + [node_key_paths(out, i)[1] for i in range(args.nodes)]
    for path in made:
        print(f"wrote {path}")
    return 0
