"""``python -m mona_sfl.runtime.flower.supernode ARGS``: ``flower-supernode ARGS`` with shorter polls.

The same command line as Flower's ``flower-supernode``; before Flower's own ``flower_supernode()``
runs, :func:`mona_sfl.runtime.flower.polling.apply` shortens the SuperNode loop's poll sleeps
and the object-pull back-off of this process (intervals from the environment, see
:mod:`mona_sfl.runtime.flower.polling`). ``mona-sfl deploy-local`` starts its SuperNodes this way.
"""

from __future__ import annotations

import sys

from mona_sfl.runtime.flower import polling


def main(argv: list[str] | None = None) -> None:
    try:
        polling.apply(supernode=True)
    except ValueError as e:
        print(f"mona-sfl supernode: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *(sys.argv[1:] if argv is None else argv)]
    flower_supernode()


if __name__ == "__main__":
    main()
