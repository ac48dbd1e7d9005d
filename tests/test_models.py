"""Backbones, cut layers and the client/server split (mona_sfl.models)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TEST_DEVICE
from mona_sfl.models import (
    ARCHS,
    NUM_CUTS,
    NUM_UNITS,
    CutInfo,
    Projector,
    ServerNet,
    WSConv2d,
    build_backbone,
    build_split,
    check_cut,
    cut_info,
    group_norm_groups,
)

CUTS = range(1, NUM_CUTS + 1)
TINY = {"resnet18": 0.125, "mobilenetv2": 0.25}  # fast widths for CPU tests

# docs/algorithm.md section 2.1 (reference ResNet-18, GN + WS, width 1.0, 32x32 input).
RESNET_CLIENT_PARAMS = (1_856, 75_840, 149_824, 379_968, 675_392, 1_594_432, 2_775_104, 6_448_192, 11_168_832)
RESNET_TOTAL = 11_168_832
RESNET_SHAPES = (
    (64, 32, 32), (64, 32, 32), (64, 32, 32), (128, 16, 16), (128, 16, 16),
    (256, 8, 8), (256, 8, 8), (512, 4, 4), (512, 4, 4),
)
RESNET_NUMEL = (65_536, 65_536, 65_536, 32_768, 32_768, 16_384, 16_384, 8_192, 8_192)
# docs/algorithm.md section 2.2: activation shapes match the reference ...
MOBILENET_SHAPES = (
    (32, 32, 32), (16, 32, 32), (24, 32, 32), (32, 16, 16), (64, 8, 8),
    (96, 8, 8), (160, 4, 4), (320, 4, 4), (1280, 4, 4),
)
# ... parameter counts do not (torchvision blocks); these are this package's own values.
MOBILENET_CLIENT_PARAMS = (928, 1_824, 15_792, 55_488, 239_360, 542_528, 1_337_792, 1_811_712, 2_223_872)


pytestmark = pytest.mark.usefixtures("one_thread")


def _wire(t: torch.Tensor) -> torch.Tensor:
    """Send a tensor through a bytes round trip, as a transport would (back on its device)."""
    arr = t.detach().cpu().numpy()
    data = arr.tobytes()
    return torch.from_numpy(np.frombuffer(data, dtype=arr.dtype).reshape(arr.shape).copy()).to(t.device)


def _loss(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(z) * target).sum() + 0.5 * z.pow(2).mean()


# ---------------------------------------------------------------------------- split gradients


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_split_gradients_equal_unsplit_exactly(arch: str, cut: int) -> None:
    torch.manual_seed(0)
    client, server = build_split(arch, cut, width=TINY[arch], proj_hidden=16, proj_dim=8)
    client, server = client.to(TEST_DEVICE), server.to(TEST_DEVICE)
    x = torch.randn(3, 3, 32, 32).to(TEST_DEVICE)
    target = torch.randn(3, 8).to(TEST_DEVICE)

    # Unsplit: one graph through client and server.
    client_u, server_u = copy.deepcopy(client), copy.deepcopy(server)
    loss_u = _loss(server_u(client_u(x)), target)
    loss_u.backward()

    # Split: activation and gradient cross the "wire" as bytes.
    client_s, server_s = copy.deepcopy(client), copy.deepcopy(server)
    a = client_s(x)
    a_srv = _wire(a).requires_grad_()
    loss_s = _loss(server_s(a_srv), target)
    loss_s.backward()
    a.backward(_wire(a_srv.grad))

    assert torch.equal(loss_u.detach(), loss_s.detach())
    pairs = list(zip(client_u.parameters(), client_s.parameters())) + list(
        zip(server_u.parameters(), server_s.parameters())
    )
    assert len(pairs) == len(list(client.parameters())) + len(list(server.parameters()))
    for p_u, p_s in pairs:
        assert p_u.grad is not None and p_s.grad is not None
        assert torch.equal(p_u.grad, p_s.grad)


def test_split_is_the_backbone_cut() -> None:
    torch.manual_seed(3)
    client, server = build_split("resnet18", 4, width=0.125, proj_hidden=16, proj_dim=8)
    torch.manual_seed(3)
    backbone = build_backbone("resnet18", width=0.125)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(server.features(client(x)), backbone(x).mean(dim=(2, 3)))
        assert server(client(x)).shape == (2, 8)
    # Parameter names keep the backbone's unit indices on both sides.
    assert list(client.state_dict())[0] == "0.0.weight"
    assert next(iter(server.state_dict())) == "body.4.conv1.weight"
    assert client.out_channels == 16 and server.feature_dim == 64 and server.out_dim == 8


def test_cut_9_server_is_pool_and_projector() -> None:
    torch.manual_seed(0)
    client, server = build_split("mobilenetv2", 9, width=0.25, proj_hidden=16, proj_dim=8)
    assert isinstance(server, ServerNet)
    assert len(server.body) == 0 and len(client) == NUM_UNITS
    a = torch.randn(2, 320, 4, 4)
    assert torch.equal(server.features(a), a.mean(dim=(2, 3)))


def test_build_split_is_deterministic_given_seed() -> None:
    def build() -> dict[str, torch.Tensor]:
        torch.manual_seed(7)
        client, server = build_split("mobilenetv2", 3, width=0.25, proj_hidden=16, proj_dim=8)
        return {**client.state_dict(), **{f"s.{k}": v for k, v in server.state_dict().items()}}

    sd1, sd2 = build(), build()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)


# ---------------------------------------------------------------------------- cut_info


@pytest.mark.parametrize("norm", ["group", "batch"])
@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_cut_info_matches_real_tensors(arch: str, cut: int, norm: str) -> None:
    info = cut_info(arch, cut, input_size=64, width=0.25, norm=norm, proj_hidden=32, proj_dim=16)
    torch.manual_seed(0)
    client, server = build_split(arch, cut, width=0.25, norm=norm, proj_hidden=32, proj_dim=16)
    with torch.no_grad():
        a = client(torch.randn(2, 3, 64, 64))
    assert info.activation_shape == tuple(a.shape[1:])
    assert info.activation_numel == a[0].numel()
    assert info.client_params == sum(p.numel() for p in client.parameters())
    state = [t for k, t in client.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert info.client_state_numel == sum(t.numel() for t in state)
    assert info.server_backbone_params == sum(p.numel() for p in server.body.parameters())
    assert info.projector_params == sum(p.numel() for p in server.projector.parameters())
    assert info.feature_dim == server.features(torch.zeros(1, *a.shape[1:])).shape[1]
    assert (info.arch, info.cut, info.input_size, info.width) == (arch, cut, 64, 0.25)
    if norm == "group":
        assert info.client_state_numel == info.client_params  # GN + WS: no buffers
    elif info.client_params:
        assert info.client_state_numel > info.client_params  # BN running stats


@pytest.mark.parametrize("cut", CUTS)
def test_cut_info_resnet18_matches_reference_table(cut: int) -> None:
    info = cut_info("resnet18", cut)
    assert info.activation_shape == RESNET_SHAPES[cut - 1]
    assert info.activation_numel == RESNET_NUMEL[cut - 1]
    assert info.client_params == RESNET_CLIENT_PARAMS[cut - 1]
    assert info.client_state_numel == RESNET_CLIENT_PARAMS[cut - 1]
    assert info.server_backbone_params == RESNET_TOTAL - RESNET_CLIENT_PARAMS[cut - 1]
    assert info.projector_params == 1_574_912
    assert info.feature_dim == 512


@pytest.mark.parametrize("cut", CUTS)
def test_cut_info_mobilenetv2_shapes_match_reference(cut: int) -> None:
    info = cut_info("mobilenetv2", cut)
    c, h, w = MOBILENET_SHAPES[cut - 1]
    assert info.activation_shape == (c, h, w)
    assert info.activation_numel == c * h * w
    assert info.client_params == MOBILENET_CLIENT_PARAMS[cut - 1]
    assert info.server_backbone_params == 2_223_872 - MOBILENET_CLIENT_PARAMS[cut - 1]
    assert info.feature_dim == 1280
    assert info.projector_params == 2_361_344  # reference: 1280*1024+1024 + 1024*1024+1024


def test_cut_info_batch_norm_counts_running_stats() -> None:
    info = cut_info("mobilenetv2", 9, norm="batch")
    assert info.client_params == 2_223_872
    assert info.client_state_numel == 2_257_984  # + running mean/var of every BN layer


def test_cut_info_is_cheap_and_leaves_rng_alone() -> None:
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    info = cut_info("mobilenetv2", 5, input_size=40, width=0.5)  # a configuration no other test uses
    assert isinstance(info, CutInfo)
    assert torch.equal(torch.random.get_rng_state(), state)  # meta device: no RNG draws
    assert info.activation_shape == (32, 10, 10)
    assert cut_info("mobilenetv2", 5, input_size=40, width=0.5) is info  # cached
    assert cut_info("mobilenetv2", 5, input_size=40, width=0.5, norm="batch") != info
    with pytest.raises(ValueError, match="input_size"):
        cut_info("resnet18", 5, input_size=0)


def test_projector_reference_size_and_init() -> None:
    torch.manual_seed(0)
    proj = Projector(512)
    assert sum(p.numel() for p in proj.parameters()) == 1_574_912
    assert [type(m) for m in proj] == [nn.Linear, nn.ReLU, nn.Linear]
    for lin in (proj[0], proj[2]):
        assert torch.count_nonzero(lin.bias) == 0
        bound = math.sqrt(6.0 / (lin.in_features + lin.out_features))  # Xavier-uniform
        assert lin.weight.abs().max() <= bound
        assert lin.weight.abs().max() > 0.9 * bound
    assert proj(torch.randn(5, 512)).shape == (5, 1024)
    with pytest.raises(ValueError, match="hidden_dim"):
        Projector(512, 0)


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize("cut", [0, 10, -1, 12])
def test_check_cut_out_of_range(cut: int) -> None:
    with pytest.raises(ValueError) as e:
        check_cut("resnet18", cut)
    msg = str(e.value)
    assert f"model.cut={cut} is out of range for resnet18" in msg
    assert "legal cut layers are 1..9 (1 = stem only, 9 = whole backbone on the client)" in msg


@pytest.mark.parametrize("cut", ["2", True, 2.0, None])
def test_check_cut_rejects_non_int(cut: object) -> None:
    with pytest.raises(ValueError, match=r"legal cut layers are 1\.\.9"):
        check_cut("mobilenetv2", cut)  # type: ignore[arg-type]


def test_check_cut_accepts_legal_and_numpy_ints() -> None:
    for cut in CUTS:
        check_cut("resnet18", cut)
    check_cut("mobilenetv2", np.int64(3))
    with pytest.raises(ValueError, match="out of range"):
        build_split("resnet18", 10, width=0.125)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "resnet50"}, "legal values are resnet18, mobilenetv2"),
        ({"arch": "resnet18", "norm": "layer"}, "legal values are group, batch"),
        ({"arch": "resnet18", "width": 0}, "width must be a finite number > 0"),
        ({"arch": "resnet18", "width": -0.5}, "width must be a finite number > 0"),
        ({"arch": "mobilenetv2", "width": float("nan")}, "width must be a finite number > 0"),
        ({"arch": "mobilenetv2", "width": "1"}, "width must be a finite number > 0"),
        ({"arch": "mobilenetv2", "width": True}, "width must be a finite number > 0"),
    ],
)
def test_bad_backbone_args(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_backbone(**kwargs)
    with pytest.raises(ValueError, match=match):
        cut_info(cut=1, **kwargs)


def test_check_cut_rejects_unknown_arch() -> None:
    with pytest.raises(ValueError, match="legal values are resnet18, mobilenetv2"):
        check_cut("vgg", 1)


# ---------------------------------------------------------------------------- layers


def test_wsconv2d_pinned_value_uses_unbiased_std() -> None:
    conv = WSConv2d(1, 1, kernel_size=2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]))
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0] = 1.0  # picks the first standardised weight
    std = math.sqrt(5.0 / 3.0)  # unbiased std of 1,2,3,4 (biased would be sqrt(5/4))
    expected = -1.5 / (std + 1e-5)
    assert conv(x).item() == pytest.approx(expected, rel=1e-6)
    assert conv.weight[0, 0, 0, 0].item() == 1.0  # the parameter itself is untouched


def test_wsconv2d_equals_conv_with_standardised_weight() -> None:
    torch.manual_seed(0)
    conv = WSConv2d(6, 8, kernel_size=3, stride=2, padding=1, bias=True)
    x = torch.randn(2, 6, 9, 9)
    w = conv.weight
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    std = w.reshape(8, -1).std(dim=1).reshape(8, 1, 1, 1)
    w_hat = (w - mean) / (std + 1e-5)
    ref = F.conv2d(x, w_hat, conv.bias, stride=2, padding=1)
    torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)  # float32: sums of 54 products of O(1) terms
    assert w_hat.mean(dim=(1, 2, 3)).abs().max() < 1e-6


def test_wsconv2d_standardised_weight_and_gradient_match_tensor_std() -> None:
    """The two-pass std gives Tensor.std's value and gradient (float64: to 1e-12)."""
    torch.manual_seed(1)
    conv = WSConv2d(16, 32, kernel_size=3, padding=1, groups=2).double()
    w = conv.weight
    flat = w.flatten(1)
    ref = (w - flat.mean(1).view(-1, 1, 1, 1)) / (flat.std(1).view(-1, 1, 1, 1) + 1e-5)
    got = conv.standardized_weight()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    probe = torch.randn_like(ref)
    g_ref, = torch.autograd.grad((ref * probe).sum(), w)
    g_got, = torch.autograd.grad((got * probe).sum(), w)
    torch.testing.assert_close(g_got, g_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_std_and_norm_switches(arch: str) -> None:
    def types(model: nn.Module) -> set[type]:
        return {type(m) for m in model.modules()}

    ws_gn = build_backbone(arch, width=TINY[arch])
    assert WSConv2d in types(ws_gn) and nn.Conv2d not in types(ws_gn)
    assert nn.GroupNorm in types(ws_gn) and nn.BatchNorm2d not in types(ws_gn)
    assert len(list(ws_gn.buffers())) == 0

    plain = build_backbone(arch, width=TINY[arch], weight_std=False)
    assert nn.Conv2d in types(plain) and WSConv2d not in types(plain)

    bn = build_backbone(arch, width=TINY[arch], norm="batch")
    assert nn.BatchNorm2d in types(bn) and nn.GroupNorm not in types(bn)
    assert WSConv2d in types(bn)


@pytest.mark.parametrize("arch", ARCHS)
def test_backbone_structure_and_init(arch: str) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(arch)
    assert isinstance(backbone, nn.Sequential) and len(backbone) == NUM_UNITS
    assert backbone.out_channels == {"resnet18": 512, "mobilenetv2": 1280}[arch]
    assert len(backbone.unit_channels) == NUM_UNITS
    for m in backbone.modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels // m.num_groups == 4  # reference: 4 channels per group
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if isinstance(m, nn.Conv2d):
            # PyTorch default (Kaiming-uniform, a=sqrt(5)): |w| <= 1/sqrt(fan_in).
            fan_in = m.weight[0].numel()
            assert m.weight.abs().max() <= 1 / math.sqrt(fan_in)
    if arch == "mobilenetv2":
        assert backbone[0][0].stride == (1, 1)  # CIFAR stem
        assert [len(stage) for stage in backbone[1:8]] == [1, 2, 3, 4, 3, 3, 1]


def test_tiny_width_channels() -> None:
    assert build_backbone("resnet18", width=0.125).unit_channels == (8, 8, 8, 16, 16, 32, 32, 64, 64)
    assert build_backbone("resnet18", width=0.01).unit_channels == (4,) * 9  # at least 4
    # torchvision rounding (multiples of 8, at least 8); the last channel scales with width.
    assert build_backbone("mobilenetv2", width=0.25).unit_channels == (8, 8, 8, 8, 16, 24, 40, 80, 320)
    assert build_backbone("mobilenetv2", width=0.5).out_channels == 640


def test_group_norm_groups() -> None:
    assert [group_norm_groups(c) for c in (1, 3, 4, 8, 12, 18, 20, 24, 64, 1280)] == [
        1, 1, 1, 2, 3, 3, 5, 6, 16, 320,
    ]
