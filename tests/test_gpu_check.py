"""bench/gpu_check.sh without CUDA: a clear message, exit status 2, no results folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(
    "python,message",
    [
        (sys.executable, "gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing run"),
        ("false", "gpu_check: no CUDA: false cannot import torch; nothing run"),
    ],
)
def test_without_cuda_it_exits_2_and_writes_nothing(tmp_path: Path, python: str, message: str) -> None:
    env = {**os.environ, "PYTHON": python, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path / "from_env")}
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "results")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == message and r.stdout == ""
    assert list(tmp_path.iterdir()) == []
