"""docs/algorithm.md's cut tables are the code's (mona_sfl.models.cut_info), not hand-copied numbers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mona_sfl.models import cut_info

DOC = Path(__file__).resolve().parent.parent / "docs" / "algorithm.md"


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2"])
def test_algorithm_doc_cut_tables_match_the_models(arch: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    marker = f"<!-- cut table: {arch};"
    assert marker in text
    rows = [line for line in text.split(marker, 1)[1].splitlines()[1:] if line.startswith("|")][2:]
    rows = rows[:9]
    assert len(rows) == 9
    for cut, line in enumerate(rows, 1):
        cells = [c.strip() for c in line.strip("|").split("|")]
        info = cut_info(arch, cut)
        assert int(cells[0]) == cut
        assert tuple(int(x) for x in re.split("×", cells[1])) == tuple(info.activation_shape)
        assert [int(c.replace(",", "")) for c in cells[2:5]] == [info.activation_numel, info.client_params, info.server_backbone_params]
