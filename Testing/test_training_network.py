"""Tests of the cascaded 2.5D attention dense U-Net, its loss, summary and ONNX export (training package)."""

from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import torch.nn as nn  # noqa: E402

from livertumorseg_training.losses import CascadeLoss, soft_dice_loss, targets_from_labels  # noqa: E402
from livertumorseg_training.model_summary import format_summary, summarize  # noqa: E402
from livertumorseg_training.networks import build_model  # noqa: E402
from livertumorseg_training.networks.cascade import AttentionDenseUNet, AttentionGate, CascadeNet  # noqa: E402
from livertumorseg_training.onnx_export import (  # noqa: E402
    check_onnx_matches_torch,
    export_branch_onnx,
)

torch.set_num_threads(1)

PAPER_PARAMS = 12e6
PAPER_TOLERANCE = 0.10  # the paper's "~12 M parameters per branch", accepted within +-10 %


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _phantom(n: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Structured [0, 255] slices (ellipses on a background, plus noise); channel 4 (if any) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    out = torch.zeros(n, c, h, w)
    for i in range(n):
        img = torch.full((h, w), 20.0)
        for _ in range(6):
            cy, cx = (torch.rand(2, generator=g) * 1.6 - 0.8).tolist()
            ry, rx = (torch.rand(2, generator=g) * 0.5 + 0.1).tolist()
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            img = torch.where(inside, torch.rand(1, generator=g) * 235 + 20, img)
        for j in range(min(c, 3)):
            out[i, j] = (img + torch.randn(h, w, generator=g) * 8).clamp(0, 255)
        if c == 4:
            out[i, 3] = (img > 100).float() * 0.9 + 0.05
    return out


def _calibrate_bn(module: nn.Module, x: torch.Tensor) -> None:
    """Sets BatchNorm running statistics to the statistics of ``x`` (as after training on such data)."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    module.train()
    with torch.no_grad():
        module(x)
    module.eval()


# ---------------------------------------------------------------------------- network


def test_paper_preset_matches_published_architecture():
    torch.manual_seed(0)
    model = build_model("cascade", "paper")
    assert isinstance(model, CascadeNet)
    for name, branch in model.branches().items():
        n = _n_params(branch)
        assert abs(n - PAPER_PARAMS) <= PAPER_TOLERANCE * PAPER_PARAMS, f"{name}: {n} parameters"
        # DenseNet-169-style encoder: 6/12/32/24 layers, growth 32, compression 0.5 in three transitions.
        assert [len(b.layers) for b in branch.blocks] == [6, 12, 32, 24]
        assert all(b.layers[0].conv2.out_channels == 32 for b in branch.blocks)
        assert [t.conv.out_channels for t in branch.transitions] == [128, 256, 640]
        assert [t.conv.in_channels for t in branch.transitions] == [256, 512, 1280]
    assert model.liver.in_channels == 3 and model.tumor.in_channels == 4

    # Shapes at 224 x 224 on the meta device (no computation): skips at 7, 14, 28, 56; output 224.
    with torch.device("meta"):
        meta = build_model("cascade", "paper")
        x = torch.zeros(1, 3, 224, 224)
        enc = meta.liver.encode(x)
        assert [tuple(e.shape[-2:]) for e in enc] == [(7, 7), (14, 14), (28, 28), (56, 56)]
        assert [e.shape[1] for e in enc] == [1408, 1280, 512, 256]
        maps = meta.liver.attention_maps(x)
        assert [tuple(a.shape) for a in maps] == [(1, 1, s, s) for s in (7, 14, 28, 56)]
        liver, tumor = meta(x)
        assert tuple(liver.shape) == (1, 1, 224, 224) and tuple(tumor.shape) == (1, 1, 224, 224)

    # A real forward at 64 x 64 (224 is too slow for a unit test on two cores).
    model.eval()
    with torch.no_grad():
        liver, tumor = model(torch.rand(1, 3, 64, 64) * 255)
    assert liver.shape == (1, 1, 64, 64) and tumor.shape == (1, 1, 64, 64)
    assert torch.isfinite(liver).all() and torch.isfinite(tumor).all()


def test_lite_preset_forward_non_square_and_budget():
    torch.manual_seed(0)
    model = build_model("cascade", "lite")
    x = torch.rand(2, 3, 64, 96) * 255
    liver, tumor = model(x)  # train mode
    assert liver.shape == (2, 1, 64, 96) and tumor.shape == (2, 1, 64, 96)
    model.eval()
    with torch.no_grad():
        liver, tumor = model(x)
    assert liver.shape == (2, 1, 64, 96) and tumor.shape == (2, 1, 64, 96)

    summary = summarize("cascade", "lite")
    for name in ("liver", "tumor"):
        b = summary["branches"][name]
        assert b["parameters"] <= 1.0e6, b
        assert b["flops_per_slice"] <= 1.5e9, b
        assert b["parameters"] == _n_params(model.branches()[name])
    text = format_summary(summary)
    assert "liver" in text and "tumor" in text and "GFLOPs" in text


def test_input_normalisation_is_inside_the_branches():
    model = build_model("cascade", "lite")
    assert torch.allclose(model.liver.input_scale.scale.flatten(), torch.full((3,), 1 / 255.0))
    assert torch.allclose(model.tumor.input_scale.scale.flatten(), torch.tensor([1 / 255.0] * 3 + [1.0]))


def test_rejects_sizes_that_are_not_multiples_of_32():
    branch = AttentionDenseUNet(3, "lite").eval()
    with pytest.raises(ValueError, match="multiples of 32"):
        branch(torch.zeros(1, 3, 64, 80))
    with pytest.raises(ValueError, match="expected input of shape"):
        branch(torch.zeros(1, 4, 64, 64))


FLAG_COMBOS = [
    dict(dense_skips=d, subpixel=s, attention=a) for d, s, a in itertools.product([True, False], repeat=3)
]


def test_ablation_flags_build_run_and_change_the_model():
    counts = {}
    x = torch.rand(1, 3, 64, 64) * 255
    for flags in FLAG_COMBOS:
        torch.manual_seed(0)
        branch = AttentionDenseUNet(3, "lite", **flags).eval()
        with torch.no_grad():
            y = branch(x)
        assert y.shape == (1, 1, 64, 64) and torch.isfinite(y).all()
        counts[tuple(flags.values())] = _n_params(branch)
    full = counts[(True, True, True)]
    assert counts[(False, True, True)] < full  # plain U-Net skips
    assert counts[(True, False, True)] < full  # bilinear + conv instead of sub-pixel
    assert counts[(True, True, False)] < full  # no attention gates
    assert len(set(counts.values())) == len(FLAG_COMBOS)
    baseline = build_model("cascade", "lite", dense_skips=False, subpixel=False, attention=False)
    assert _n_params(baseline.liver) == counts[(False, False, False)]
    assert all(not isinstance(m, AttentionGate) for m in baseline.modules())


def test_attention_gate_coefficients_are_in_unit_interval():
    torch.manual_seed(0)
    gate = AttentionGate(x_channels=24, g_channels=40, inter_channels=8)
    x = torch.randn(2, 24, 16, 12) * 5
    g = torch.randn(2, 40, 8, 6) * 5
    with torch.no_grad():
        alpha = gate.coefficients(x, g)
        gated = gate(x, g)
    assert alpha.shape == (2, 1, 16, 12)
    assert float(alpha.min()) >= 0.0 and float(alpha.max()) <= 1.0
    assert torch.allclose(gated, x * alpha)
    branch = AttentionDenseUNet(4, "lite").eval()
    with torch.no_grad():
        maps = branch.attention_maps(torch.rand(1, 4, 64, 96) * 255)
    assert [tuple(a.shape[-2:]) for a in maps] == [(2, 3), (4, 6), (8, 12), (16, 24)]
    assert all(float(a.min()) >= 0 and float(a.max()) <= 1 for a in maps)


# ---------------------------------------------------------------------------- loss


def _targets(seed=0, shape=(2, 1, 32, 32)):
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(shape, dtype=torch.long)
    labels[..., 4:28, 4:28] = 1
    labels[..., 10:16, 12:20] = 2
    labels[0, ..., 0:2, 0:2] = (torch.rand(2, 2, generator=g) > 0.5).long()
    return targets_from_labels(labels)


def test_loss_perfect_and_wrong_predictions():
    liver_t, tumor_t = _targets()
    loss = CascadeLoss()
    perfect_l, perfect_t = (liver_t * 2 - 1) * 30, (tumor_t * 2 - 1) * 30
    total, parts = loss(perfect_l, perfect_t, liver_t, tumor_t)
    assert float(total) < 1e-3
    total, parts = loss(-perfect_l, -perfect_t, liver_t, tumor_t)
    assert float(total) > 3 * 0.7 + 3 * 0.3 * 10  # Dice ~1 per branch, BCE ~30 per branch
    assert set(parts) >= {"liver", "tumor", "liver_dice", "tumor_dice", "liver_bce", "tumor_bce", "total"}
    expected = 1 * parts["liver"] + 2 * parts["tumor"]
    assert torch.allclose(parts["total"], expected)
    assert torch.allclose(parts["liver"], 0.7 * parts["liver_dice"] + 0.3 * parts["liver_bce"])
    # Empty target predicted empty: Dice ~0 thanks to eps, not 1.
    assert float(soft_dice_loss(torch.full((1, 1, 8, 8), -30.0), torch.zeros(1, 1, 8, 8))) < 1e-3
    # Targets without the channel axis are accepted; a field-of-view mask restricts both terms.
    total2, _ = loss(perfect_l, perfect_t, liver_t[:, 0], tumor_t[:, 0], mask=torch.ones_like(liver_t))
    assert float(total2) < 1e-3


def test_gradient_flows_through_the_cascade_and_loss_is_finite_under_bf16_autocast():
    torch.manual_seed(0)
    model = build_model("cascade", "lite")
    x = torch.rand(2, 3, 32, 64) * 255
    liver_t, tumor_t = _targets(shape=(2, 1, 32, 64))
    liver, tumor = model(x)
    total, parts = CascadeLoss()(liver, tumor, liver_t, tumor_t)
    assert torch.isfinite(total)
    total.backward()
    for branch in (model.liver, model.tumor):
        assert branch.stem[0].weight.grad is not None and float(branch.stem[0].weight.grad.abs().sum()) > 0
        assert float(branch.head.weight.grad.abs().sum()) > 0
    # The tumour loss alone reaches the liver branch (end-to-end cascade).
    model.zero_grad(set_to_none=True)
    liver, tumor = model(x)
    CascadeLoss(w_liver=0.0)(liver, tumor, liver_t, tumor_t)[0].backward()
    assert float(model.liver.head.weight.grad.abs().sum()) > 0

    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        liver, tumor = model(x)
        total, parts = CascadeLoss()(liver, tumor, liver_t, tumor_t)
    assert liver.dtype == torch.bfloat16
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert all(torch.isfinite(v) for v in parts.values())
    total.backward()
    assert torch.isfinite(model.liver.stem[0].weight.grad).all()
    # Saturated bf16 logits stay finite too.
    big = torch.full((1, 1, 8, 8), 1e4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t, _ = CascadeLoss()(big, -big, torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8))
    assert torch.isfinite(t)


# ---------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("in_channels", [3, 4])
def test_onnx_export_matches_torch_with_dynamic_shapes(tmp_path, in_channels):
    import onnx

    torch.manual_seed(0)
    scale = (1 / 255.0,) * 3 + ((1.0,) if in_channels == 4 else ())
    branch = AttentionDenseUNet(in_channels, "lite", input_scale=scale)
    # Running statistics as after training; without this an untrained deep DenseNet in eval mode produces
    # logits of several hundred and saturated probabilities, which would make the comparison meaningless.
    _calibrate_bn(branch, _phantom(4, in_channels, 64, 96, seed=1))
    # Untrained random heads give logits of tens, where float32 rounding differences between the two
    # runtimes are amplified; a small head keeps the output in the sigmoid's informative range, as a trained
    # network's is.
    nn.init.normal_(branch.head.weight, std=0.01)
    path = export_branch_onnx(branch, in_channels, tmp_path / "branch.onnx")
    assert path.exists() and not list(tmp_path.glob("*.part"))

    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["probability"]
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] and dims[2] and dims[3] and dims[1] == ""

    for shape, seed in [((2, in_channels, 64, 96), 2), ((1, in_channels, 96, 160), 3)]:
        x = _phantom(*shape, seed=seed)
        with torch.no_grad():
            prob = torch.sigmoid(branch(x))
        assert float(prob.max() - prob.min()) > 0.1  # a non-trivial output
        # Float32 rounding of the two runtimes differs by ~1e-5 here; an export error (wrong resize mode,
        # baked-in shape, missing scale) is >= 1e-2.
        diff = check_onnx_matches_torch(branch, path, x)
        assert diff < 1e-4, f"{shape}: max abs diff {diff}"


def test_coarse_liver_branch_pools_runs_and_upsamples_and_the_tumour_branch_sees_the_centre():
    """liver_scale 2: the liver logit covers the whole window at the input's size (the network ran on the 2× pooled
    window); the tumour branch runs on the central half of the window with the liver probability of that centre."""
    model = CascadeNet("lite", liver_scale=2).eval()
    x = _phantom(1, 3, 128, 192, seed=5)
    with torch.no_grad():
        liver, tumour = model(x)
        inner = model.liver.net(torch.nn.functional.avg_pool2d(x, 2))
        centre = torch.cat([x, torch.sigmoid(liver)], 1)[..., 32:96, 48:144]
        expected_tumour = model.tumor(centre)
    assert liver.shape == (1, 1, 128, 192) and tumour.shape == (1, 1, 64, 96) and inner.shape == (1, 1, 64, 96)
    torch.testing.assert_close(torch.nn.functional.avg_pool2d(liver, 2), torch.nn.functional.avg_pool2d(
        torch.nn.functional.interpolate(inner, scale_factor=2.0, mode="bilinear", align_corners=False), 2))
    torch.testing.assert_close(tumour, expected_tumour)
    assert model.liver.in_channels == 3 and model.branch_inputs(64)["liver"][1] == (1, 3, 128, 128)


def test_weights_of_a_full_resolution_cascade_initialise_a_coarse_one(tmp_path):
    from livertumorseg_training.train import initialise_from

    source = CascadeNet("lite")
    torch.save({"model": source.state_dict()}, tmp_path / "source.pt")
    coarse = CascadeNet("lite", liver_scale=2)
    initialise_from(coarse, str(tmp_path / "source.pt"))
    for name, value in source.liver.state_dict().items():
        torch.testing.assert_close(coarse.liver.net.state_dict()[name], value, rtol=0, atol=0)
    for name, value in source.tumor.state_dict().items():
        torch.testing.assert_close(coarse.tumor.state_dict()[name], value, rtol=0, atol=0)
