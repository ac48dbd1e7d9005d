"""The house rules: what may import what (core, models, data, runtimes, cli), checked on the source."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('ray', 'flwr'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import mona_sfl.core.client, mona_sfl.core.server, mona_sfl.core.sync, mona_sfl.core.moco
import mona_sfl.models, mona_sfl.data.datasets, mona_sfl.eval.knn, mona_sfl.config
import mona_sfl.build, mona_sfl.engine, mona_sfl.runtime.local, mona_sfl.runtime.sharded, mona_sfl.cli, mona_sfl.privacy, mona_sfl.comms
import mona_sfl.cli.train, mona_sfl.cli.attack, mona_sfl.cli.comm, mona_sfl.cli.study, mona_sfl.core.host, mona_sfl.core.schedule
bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'flwr')]
print('LOADED', bad)
sys.exit(1 if bad else 0)
"""


def test_core_imports_neither_ray_nor_flwr() -> None:
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "LOADED []" in r.stdout


# ----------------------------------------------------------------------------- the house rules, statically

import ast  # noqa: E402
from pathlib import Path  # noqa: E402

PACKAGE = Path(__file__).resolve().parents[1] / "mona_sfl"


def _imports() -> dict[str, set[str]]:
    """Module -> every absolute module it imports (top level or inside functions)."""
    graph: dict[str, set[str]] = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        mod = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names: set[str] = set()
        for n in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(n, ast.Import):
                names.update(a.name for a in n.names)
            elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                names.add(n.module)
                names.update(f"{n.module}.{a.name}" for a in n.names)  # `from mona_sfl import cli`
        graph[mod] = names
    return graph


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations(sources: tuple[str, ...], banned: tuple[str, ...], allow: tuple[str, ...] = ()) -> list[str]:
    return sorted(
        f"{mod} imports {name}"
        for mod, names in _imports().items()
        if _under(mod, *sources) and not _under(mod, *allow)
        for name in names
        if _under(name, *banned)
    )


def test_core_imports_no_runtime_engine_cli_ray_or_flwr() -> None:
    assert _violations(("mona_sfl.core",), ("mona_sfl.runtime", "mona_sfl.engine", "mona_sfl.cli", "mona_sfl.build", "ray", "flwr")) == []


def test_models_import_no_core_and_data_imports_no_models() -> None:
    assert _violations(("mona_sfl.models",), ("mona_sfl.core", "mona_sfl.data", "mona_sfl.runtime", "mona_sfl.engine")) == []
    assert _violations(("mona_sfl.data",), ("mona_sfl.models", "mona_sfl.core", "mona_sfl.runtime", "mona_sfl.engine")) == []


def test_runtimes_compute_no_loss() -> None:
    """Runtimes move requests to client hosts; the loss, the server step and the sync are the engine's and core's."""
    assert _violations(("mona_sfl.runtime",), ("mona_sfl.core.moco", "mona_sfl.core.server.Server", "mona_sfl.core.sync.sync_fronts", "mona_sfl.core.sync.fedavg")) == []
    assert _violations(("mona_sfl.runtime",), ("mona_sfl.engine",), allow=("mona_sfl.runtime.flower.server_app",)) == []


def test_only_entry_points_import_the_cli() -> None:
    assert _violations(("mona_sfl",), ("mona_sfl.cli",), allow=("mona_sfl.cli", "mona_sfl.__main__")) == []


def test_the_rules_see_a_violation() -> None:
    """The checker itself: core.host imports core.client, so banning that is reported."""
    assert "mona_sfl.core.host imports mona_sfl.core.client" in _violations(("mona_sfl.core.host",), ("mona_sfl.core.client",))


def test_parsing_the_command_line_imports_no_torch() -> None:
    """A typo is answered at once: neither the parser nor the config loader imports torch."""
    code = (
        "import sys, mona_sfl.cli as c; c.parser(); import mona_sfl.config as m; "
        "m.load_config(m.resolve_config_path(None)); print('TORCH', 'torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "TORCH False" in r.stdout
