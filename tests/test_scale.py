"""1,000 clients with ResNet-18 (width 1.0) cut 2 fit comfortably: idle clients are not stored N times."""

from __future__ import annotations

import pytest
import torch

from mona_sfl.core.client import ClientHParams
from mona_sfl.core.host import ClientHost as ClientGroup
from mona_sfl.core.sync import GlobalFronts, fedavg
from mona_sfl.models import build_split


class OneImage:
    def __init__(self, cid: int) -> None:
        self.cid, self.draws = cid, 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.cid * 7919 + self.draws)
        self.draws += 1
        return torch.randn(1, 3, 32, 32, generator=g), torch.randn(1, 3, 32, 32, generator=g)

    def state_dict(self) -> dict[str, int]:
        return {"draws": self.draws}

    def load_state_dict(self, s: dict[str, int]) -> None:
        self.draws = s["draws"]


@pytest.mark.slow
@pytest.mark.parametrize("align", [True, False])
def test_thousand_clients_memory(align: bool) -> None:
    torch.manual_seed(0)
    front, _ = build_split("resnet18", 2, width=1.0)
    n = 1000
    group = ClientGroup(front, ClientHParams(lr=0.06, symmetric="client"), {i: OneImage(i) for i in range(n)})
    front_bytes = sum(v.numel() * v.element_size() for v in group.global_online.values())
    assert front_bytes == 75_840 * 4
    assert group.memory_bytes() == 2 * front_bytes  # globals only: 1,000 fresh clients cost nothing

    pool = list(range(0, n, 10))  # 100 sampled clients train one step
    group.begin_epoch(0, pool)
    acts = group.forward(pool)
    group.backward({c: torch.randn_like(a.a_q) * 1e-3 for c, a in acts.items()})
    fr = group.fronts(pool)
    group.load(GlobalFronts(fedavg([fr[c][0] for c in pool]), fedavg([fr[c][1] for c in pool]) if align else None))
    group.end_epoch()

    per_client = front_bytes * (1 if align else 2)  # SGD momentum buffer (+ own momentum front under MocoSFL)
    assert len(group.records) == len(pool)
    spare = len(pool) * 2 * front_bytes  # the retired clients' modules, reused by the next epoch's
    assert len(group.spare) == len(pool)
    assert group.memory_bytes() == 2 * front_bytes + len(pool) * per_client + spare
    # even with every client trained, 1,000 clients stay far below 1 GB
    assert 2 * front_bytes + n * 2 * front_bytes < 1e9
