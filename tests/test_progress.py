"""Progress of long work (mona_sfl.progress.Meter): plain lines off a terminal, nothing when disabled,
counts from threads; the image-folder decoding and the training report through it."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mona_sfl.progress import LINE_SHARE, Meter


def test_plain_lines_every_share_and_at_the_end() -> None:
    out = io.StringIO()  # not a terminal: lines, no bar
    with Meter(100, "decoding train images", unit="images", stream=out) as m:
        for k in range(1, 101):
            m.update(k, loss=f"{k / 10:.1f}")
    lines = out.getvalue().splitlines()
    assert len(lines) == round(1 / LINE_SHARE) == 20
    assert lines[0] == "decoding train images 5/100 images (5%) loss 0.5"
    assert lines[-1] == "decoding train images 100/100 images (100%) loss 10.0"


def test_disabled_prints_nothing_and_threads_add_up() -> None:
    out = io.StringIO()
    m = Meter(1000, "x", stream=out, enabled=False)
    m.update(1000)
    m.close()
    assert out.getvalue() == ""
    out = io.StringIO()
    m = Meter(4000, "work", unit="items", stream=out)
    threads = [threading.Thread(target=lambda: [m.advance(1) for _ in range(1000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    m.close()
    assert m.done == 4000 and out.getvalue().splitlines()[-1] == "work 4000/4000 items (100%)"


@pytest.mark.parametrize("progress", [True, False])
def test_imagefolder_decoding_reports_its_progress(tmp_path: Path, progress: bool, capsys: pytest.CaptureFixture[str]) -> None:
    from mona_sfl.data import load_dataset

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for k in range(300):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "train" / c / f"{k}.png")
    d = load_dataset("imagefolder", "train", root=str(tmp_path), image_size=8, progress=progress)
    assert len(d) == 600
    err = capsys.readouterr().err.splitlines()
    if not progress:
        assert err == []
        return
    assert err[-1] == "decoding train images 600/600 images (100%)"
    counts = [int(line.split()[3].split("/")[0]) for line in err]
    assert counts == sorted(counts) and counts[0] < 600  # lines while decoding, in 256-image chunks per thread
