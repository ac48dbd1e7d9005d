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


ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors of a Markdown page (lower case, punctuation dropped, spaces to '-')."""
    anchors, fence = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        m = None if fence else re.match(r"^#{1,6} (.*)$", line)
        if m:
            anchors.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_of_the_docs_resolves(page: Path) -> None:
    """Each relative link of README.md and docs/*.md names a file that exists, and its #anchor a heading there."""
    text = page.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links or page.name != "README.md"
    for link in links:
        if re.match(r"^[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: link {link!r} names a missing file"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path.read_text(encoding="utf-8")), f"{page.name}: link {link!r}: no heading #{anchor}"


def test_the_readme_links_every_docs_page() -> None:
    """The README is the entry point: every docs/*.md page is linked from it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"


def test_the_readme_keeps_its_two_set_up_commands_and_ci_runs_the_second() -> None:
    """The quick start's install-and-run and install-and-test commands; .ci/run runs the test command verbatim."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(python3 -m venv .venv && [^\n]*)\n```", readme)
    assert blocks[:2] == [
        "python3 -m venv .venv && .venv/bin/pip install -e . && FLWR_TELEMETRY_ENABLED=0 .venv/bin/mona-sfl train",
        'python3 -m venv .venv && .venv/bin/pip install -q -e ".[test]" && FLWR_TELEMETRY_ENABLED=0 .venv/bin/python -m pytest -q -n 2 --dist loadfile',
    ]
    assert blocks[1] in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
