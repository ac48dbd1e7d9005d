"""The algorithm core, models, data, engine and local runtime import neither ray nor flwr."""

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
import mona_sfl.build, mona_sfl.engine, mona_sfl.runtime.local, mona_sfl.cli, mona_sfl.privacy, mona_sfl.comms
bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'flwr')]
print('LOADED', bad)
sys.exit(1 if bad else 0)
"""


def test_core_imports_neither_ray_nor_flwr() -> None:
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "LOADED []" in r.stdout
