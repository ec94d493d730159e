"""fastlayers.sparse_conv2d / sparse_batch_norm2d / sparse_layer_norm2d (SparK): the Triton kernels (interpreted on
CPU) against the references for outputs and every gradient; masks all-on, all-off, checkerboard and random; exact
zeros at inactive pixels; modules, the mask context, and sparsify/densify of timm ResNet / ConvNeXt against
SparK's dense-then-mask formulation."""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F

import fastlayers
from fastlayers import reference as R
from fastlayers.nn import (SparseAvgPool2d, SparseBatchNorm2d, SparseConv2d, SparseLayerNorm2d, SparseMaxPool2d,
                           sparse_mask)
from fastlayers.ops.sparse_conv2d import SparseMask, as_sparse_mask
from fastlayers.testing import assert_results

from .conftest import KERNEL_DTYPES
from .helpers import check, rand

triton_conv = functools.partial(fastlayers.sparse_conv2d, backend="triton")
triton_bn = functools.partial(fastlayers.sparse_batch_norm2d, backend="triton")
triton_ln = functools.partial(fastlayers.sparse_layer_norm2d, backend="triton")


def make_mask(kind, B, h, w, device="cpu", p=0.4, seed=0):
    """[B, 1, h, w] bool: 'random' (keep ratio p), 'on', 'off', 'checker'."""
    if kind == "on":
        m = torch.ones(B, 1, h, w, dtype=torch.bool)
    elif kind == "off":
        m = torch.zeros(B, 1, h, w, dtype=torch.bool)
    elif kind == "checker":
        ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        m = ((ii + jj) % 2 == 0).expand(B, 1, h, w).clone()
        m[1:] = ~m[1:]  # the other parity in the other samples
    else:
        g = torch.Generator().manual_seed(seed)
        m = torch.rand(B, 1, h, w, generator=g) < p
        m.view(B, -1)[:, 0] = True  # at least one visible patch per sample
    return m.to(device)


def conv_inputs(B, Cin, Cout, H, W, k, groups, dtype, device, channels_last=False, bias=True):
    KH, KW = (k, k) if isinstance(k, int) else k
    x = rand(B, Cin, H, W, dtype=dtype, device=device, grad=False)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    inputs = {"x": x.requires_grad_(),
              "weight": rand(Cout, Cin // groups, KH, KW, dtype=dtype, device=device,
                             scale=(KH * KW * Cin // groups) ** -0.5)}
    inputs["bias"] = rand(Cout, dtype=dtype, device=device) if bias else None
    return inputs


# (name, B, Cin, Cout, H, W, kernel, stride, padding, dilation, groups, mask hw, channels_last): every path of the
# kernels: GEMM with one tap per K block (C/group >= 32) or flat K (RGB stem, small groups), the direct kernel
# (depthwise, channel multiplier, tiny groups), strides 1/2/4, odd sizes, dilation, non-square kernels, layouts.
CONV_CASES = [
    ("dense3x3_tapK", 2, 40, 24, 8, 8, 3, 1, 1, 1, 1, (4, 4), False),
    ("dense3x3_s2_cl", 2, 40, 24, 8, 8, 3, 2, 1, 1, 1, (2, 2), True),
    ("stem7x7_s2_flatK", 1, 3, 16, 8, 8, 7, 2, 3, 1, 1, (2, 2), False),
    ("dw7x7_cl", 2, 16, 16, 8, 8, 7, 1, 3, 1, 16, (4, 4), True),
    ("dw5x5_mult2_s2", 1, 8, 16, 8, 8, 5, 2, 2, 1, 8, (2, 2), False),
    ("group2_s2_flatK", 2, 32, 48, 8, 8, 3, 2, 1, 1, 2, (2, 2), False),
    ("group4_tiny_dil2_odd", 2, 8, 12, 9, 15, 3, 1, 2, 2, 4, (3, 5), True),
    ("down1x1_s2_cl", 2, 40, 24, 8, 8, 1, 2, 0, 1, 1, (2, 2), True),
    ("convnext_down2x2_s2", 2, 16, 32, 8, 8, 2, 2, 0, 1, 1, (4, 4), False),
    ("convnext_stem4x4_s4", 1, 3, 16, 16, 16, 4, 4, 0, 1, 1, (2, 2), False),
    ("rect3x5_s12", 2, 8, 8, 6, 12, (3, 5), (1, 2), (1, 2), 1, 1, (3, 3), False),
]
CONV_IDS = [c[0] for c in CONV_CASES]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_triton_conv_matches_reference(case, dtype, device):
    name, B, Cin, Cout, H, W, k, s, p, d, g, (mh, mw), cl = case
    inputs = conv_inputs(B, Cin, Cout, H, W, k, g, dtype, device, cl, bias=(B + Cin) % 2 == 0 or Cin == 3)
    mask = make_mask("random", B, mh, mw, device)
    kw = {"mask": mask, "stride": s, "padding": p, "dilation": d, "groups": g}
    check(triton_conv, R.sparse_conv2d, inputs, kw, ("y",), name)


def test_gemm_block_m_128_path(device, monkeypatch):
    """Large maps take BLOCK_M=128 (small ones, as in the other tests, 64): check that configuration too."""
    from fastlayers.kernels import sparse_conv2d as K
    monkeypatch.setitem(K._TARGET_PROGRAMS, "cuda", 1)
    for case in (CONV_CASES[1], CONV_CASES[2]):
        name, B, Cin, Cout, H, W, k, s, p, d, g, (mh, mw), cl = case
        inputs = conv_inputs(B, Cin, Cout, H, W, k, g, torch.float16, device, cl)
        kw = {"mask": make_mask("random", B, mh, mw, device), "stride": s, "padding": p, "dilation": d, "groups": g}
        check(triton_conv, R.sparse_conv2d, inputs, kw, ("y",), name)


@pytest.mark.parametrize("kind", ["on", "off", "checker", "random"])
@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[4]], ids=[CONV_IDS[1], CONV_IDS[4]])
def test_conv_masks_and_exact_zeros(case, kind, device):
    name, B, Cin, Cout, H, W, k, s, p, d, g, (mh, mw), cl = case
    inputs = conv_inputs(B, Cin, Cout, H, W, k, g, torch.float32, device, cl)
    mask = make_mask(kind, B, mh, mw, device)
    kw = {"mask": mask, "stride": s, "padding": p, "dilation": d, "groups": g}
    y = triton_conv(**inputs, **kw)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(inputs.values()), dy)
    ins64 = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    y64 = R.sparse_conv2d(**ins64, **kw)
    torch.testing.assert_close(y, y64.float(), rtol=1e-4, atol=1e-4)
    for name_, a, b in zip(ins64, grads, torch.autograd.grad(y64, list(ins64.values()), dy.double())):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name_}: {m}")
    dx = grads[0]
    m_out = R.upsample_mask(mask, *y.shape[2:]).expand_as(y)
    m_in = R.upsample_mask(mask, H, W).expand_as(dx)
    assert (y[~m_out] == 0).all() and (dx[~m_in] == 0).all()
    if kind == "on":  # all visible: the plain convolution
        ref = F.conv2d(inputs["x"], inputs["weight"], inputs["bias"], s, p, d, g)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    if kind == "off":
        assert (y == 0).all() and (dx == 0).all()


def test_stride2_at_patch_boundaries(device):
    """Patches of 3 input pixels, stride 2 with kernel 3: taps straddle patch borders from both sides."""
    B, C, H = 2, 4, 12
    mask = make_mask("checker", B, 2, 2, device)  # 6-pixel input patches -> 3-pixel output patches
    inputs = conv_inputs(B, C, 8, H, H, 3, 1, torch.float32, device)
    check(triton_conv, R.sparse_conv2d, inputs, {"mask": mask, "stride": 2, "padding": 1}, ("y",), "k3 s2")
    # 3-pixel input patches with stride 1 and kernel 5: every output near a border reads two patches away
    inputs = conv_inputs(B, C, 4, 9, 9, 5, 1, torch.float32, device)
    check(triton_conv, R.sparse_conv2d, inputs, {"mask": make_mask("random", B, 3, 3, device), "padding": 2},
          ("y",), "k5 patch 3")


def test_inactive_inputs_are_ignored_even_nan(device):
    B, C, H = 2, 8, 8
    mask = make_mask("checker", B, 2, 2, device)
    x = torch.randn(B, C, H, H, device=device)
    x[~R.upsample_mask(mask, H, H).expand_as(x)] = float("nan")
    w = torch.randn(16, C, 3, 3, device=device)
    y = triton_conv(x, mask, w, padding=1)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, R.sparse_conv2d(x, mask, w, padding=1), rtol=1e-5, atol=1e-5)
    x2 = torch.randn(B, C, H, H, device=device)
    x2[0, 0, 0, 0] = float("nan")  # an active pixel (the checkerboard keeps patch (0, 0) of sample 0)
    y2, ref = triton_conv(x2, mask, w, padding=1), R.sparse_conv2d(x2, mask, w, padding=1)
    assert torch.equal(torch.isnan(y2), torch.isnan(ref)) and torch.isnan(y2).any()


def test_backward_is_deterministic_and_split_reductions_agree(device, monkeypatch):
    from fastlayers.kernels import sparse_conv2d as K
    grads = []
    cases = [("dense", 2, 32, 8, 8, 8, 3, 1, 1, 1, 1, (4, 4), False), CONV_CASES[4]]
    for target in (8, 8, 10**6):  # the last: one chunk per output tile (most partial sums)
        monkeypatch.setitem(K._TARGET_PROGRAMS, "cpu", target)
        for case in cases:
            name, B, Cin, Cout, H, W, k, s, p, d, g, (mh, mw), cl = case
            torch.manual_seed(1)
            inputs = conv_inputs(B, Cin, Cout, H, W, k, g, torch.float32, device, cl)
            mask = make_mask("random", B, mh, mw, device, p=0.6)
            y = triton_conv(**inputs, mask=mask, stride=s, padding=p, groups=g)
            grads.append(torch.autograd.grad(y, list(inputs.values()), torch.ones_like(y)))
    for a, b in zip(grads[0] + grads[1], grads[2] + grads[3]):
        assert torch.equal(a, b)
    for a, b in zip(grads[0] + grads[1], grads[4] + grads[5]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_output_layout_follows_input(device):
    mask = make_mask("random", 2, 2, 2, device)
    x = torch.randn(2, 8, 8, 8, device=device)
    w = torch.randn(16, 8, 3, 3, device=device)
    y_cf = triton_conv(x, mask, w, padding=1)
    y_cl = triton_conv(x.contiguous(memory_format=torch.channels_last), mask, w, padding=1)
    assert y_cf.is_contiguous() and y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cf, y_cl)
    xs = torch.randn(2, 16, 8, 16, device=device)[:, ::2, :, ::2]  # neither layout: read through its strides
    torch.testing.assert_close(triton_conv(xs, mask, w, padding=1), R.sparse_conv2d(xs, mask, w, padding=1),
                               rtol=1e-5, atol=1e-5)


def test_inputs_not_mutated(device):
    inputs = conv_inputs(2, 8, 8, 8, 8, 3, 1, torch.float32, device)
    mask = make_mask("random", 2, 2, 2, device)
    before = {k: v.detach().clone() for k, v in inputs.items()}
    mask_before = mask.clone()
    triton_conv(**inputs, mask=mask, padding=1).sum().backward()
    for k, v in inputs.items():
        assert torch.equal(v.detach(), before[k]), k
    assert torch.equal(mask, mask_before)


@pytest.mark.parametrize("B", [0, 2])
def test_zero_size(B, device):
    x = torch.randn(B, 4, 8, 8, device=device, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, device=device, requires_grad=True)
    mask = make_mask("on", B, 2, 2, device) if B else torch.zeros(0, 1, 2, 2, dtype=torch.bool, device=device)
    if B:  # zero output channels
        w = torch.randn(0, 4, 3, 3, device=device, requires_grad=True)
    y = triton_conv(x, mask, w, padding=1)
    assert y.shape == (B, w.shape[0], 8, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and (w.grad == 0).all()


@pytest.mark.parametrize("call, exc, match", [
    (lambda x, m, w: triton_conv(x[0], m, w), ValueError, "`x` must have 4 dimensions"),
    (lambda x, m, w: triton_conv(x, m.float(), w), TypeError, "`mask` must have dtype"),
    (lambda x, m, w: triton_conv(x, torch.ones(2, 1, 3, 2, dtype=torch.bool), w), ValueError, "whole multiple"),
    (lambda x, m, w: triton_conv(x, torch.ones(2, 2, 2, 2, dtype=torch.bool), w), ValueError, r"\[B, 1, h, w\]"),
    (lambda x, m, w: triton_conv(x, m[:1], w), ValueError, "B = x.shape"),
    (lambda x, m, w: triton_conv(x, m, w, stride=3, padding=1), ValueError, "whole multiple"),
    (lambda x, m, w: triton_conv(x, m, w[:, :2]), ValueError, "`weight` must have shape"),
    (lambda x, m, w: triton_conv(x, m, w, groups=3), ValueError, "divisible by groups"),
    (lambda x, m, w: triton_conv(x, m, torch.randn(6, 4, 33, 1)), ValueError, "kernel sizes"),
    (lambda x, m, w: triton_conv(x, m, w, torch.randn(5)), ValueError, "`bias` must have shape"),
    (lambda x, m, w: triton_conv(x, m, w.half()), TypeError, "`weight` has dtype"),
    (lambda x, m, w: triton_conv(x, m, w, stride=0), ValueError, "`stride` must be >= 1"),
    (lambda x, m, w: triton_conv(x, m, w, padding=-1), ValueError, "`padding` must be >= 0"),
    (lambda x, m, w: triton_conv(x, m, w, stride=2, padding="same"), ValueError, "needs stride 1"),
    (lambda x, m, w: triton_conv(x, m, w, padding="full"), ValueError, "'same' or 'valid'"),
    (lambda x, m, w: triton_conv(x, m, torch.randn(6, 4, 9, 9)), ValueError, "output would be empty"),
    (lambda x, m, w: triton_conv(x, m.to("meta"), w), ValueError, "`mask` is on meta"),
    (lambda x, m, w: triton_conv(x.double(), m, w.double()), ValueError, "float64 runs only on the reference"),
    (lambda x, m, w: fastlayers.sparse_batch_norm2d(x, m, torch.zeros(3), torch.ones(4)), ValueError,
     "`running_mean` must have shape"),
    (lambda x, m, w: fastlayers.sparse_batch_norm2d(x, m, torch.zeros(4), None), ValueError, "give both"),
    (lambda x, m, w: fastlayers.sparse_layer_norm2d(x, torch.ones(2, 1, 3, 3, dtype=torch.bool)), ValueError,
     "whole multiple"),
    (lambda x, m, w: fastlayers.sparse_layer_norm2d(x, m, torch.ones(5)), ValueError, "`weight` must have shape"),
])
def test_bad_input_raises(call, exc, match):
    x, w = torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3)
    m = make_mask("random", 2, 2, 2)
    with pytest.raises(exc, match=match):
        call(x, m, w)


def test_module_without_mask_explains():
    with pytest.raises(RuntimeError, match="sparse_mask"):
        SparseConv2d(4, 4, 3)(torch.randn(1, 4, 8, 8))


# ------------------------------------------------------------------------------------------------ mask tables

def test_sparse_mask_tables_are_built_once_and_valid(device):
    mask = make_mask("random", 2, 3, 3, device)
    sm = SparseMask(mask)
    t = sm.table(12, 12)
    assert sm.table(12, 12) is t  # cached per resolution
    m = R.upsample_mask(mask, 12, 12).reshape(-1)
    n = int(m.sum())
    assert int(t.count) == n and sm.count(12, 12) == n
    assert torch.equal(t.rows.long().sort().values, torch.arange(m.numel()))  # a permutation
    assert m[t.rows[:n].long()].all() and not m[t.rows[n:].long()].any()
    assert torch.equal(t.active.bool(), m)
    t2 = sm.table(12, 12, (2, 2))  # active pixels sorted by (h % 2, w % 2)
    rows = t2.rows[:n].long()
    parity = ((rows % 144) // 12 % 2) * 2 + (rows % 12) % 2
    assert (parity.diff() >= 0).all() and set(rows.tolist()) == set(t.rows[:n].tolist())
    # a plain tensor is cached by identity; an in-place change rebuilds; a new tensor never hits a stale entry
    assert as_sparse_mask(mask) is as_sparse_mask(mask)
    first = as_sparse_mask(mask)
    mask[0, 0, 0, 0] = ~mask[0, 0, 0, 0]
    assert as_sparse_mask(mask) is not first
    assert as_sparse_mask(mask.clone()) is not as_sparse_mask(mask)


def test_reference_is_spark_formulation():
    """SparK: conv on the masked input, output multiplied by the block-repeated mask."""
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    mask = make_mask("random", 2, 4, 4)
    m_in = mask.repeat_interleave(4, 2).repeat_interleave(4, 3)
    m_out = mask.repeat_interleave(2, 2).repeat_interleave(2, 3)
    torch.testing.assert_close(R.sparse_conv2d(x, mask, w, None, 2, 1), F.conv2d(x * m_in, w, None, 2, 1) * m_out)


def test_gradcheck_reference_fp64():
    mask = make_mask("random", 2, 2, 2)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    gc = functools.partial(torch.autograd.gradcheck, fast_mode=True)
    assert gc(lambda x, w, b: fastlayers.sparse_conv2d(x, mask, w, b, 1, 1, 1, 2), (x, w, b))
    g = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert gc(lambda x, g, b: fastlayers.sparse_batch_norm2d(x, mask, None, None, g, b[:4], True), (x, g, b))
    assert gc(lambda x, g, b: fastlayers.sparse_layer_norm2d(x, mask, g, b[:4]), (x, g, b))


# ------------------------------------------------------------------------------------------------ norms

def _bn_fns(mask, running, training, momentum=0.1):
    """Kernel and reference BN with fresh copies of the running statistics per call (compare() calls each
    function several times)."""
    def make(fn):
        def f(x, weight, bias):
            rm, rv = (t.clone() for t in running) if running else (None, None)
            return fn(x, mask, rm, rv, weight, bias, training, momentum, 1e-5)
        return f
    return make(triton_bn), make(R.sparse_batch_norm2d)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("C, channels_last, kind", [(24, False, "random"), (40, True, "checker"),
                                                    (8, False, "on")])
def test_triton_batch_norm_matches_reference(C, channels_last, kind, training, dtype, device):
    x = rand(2, C, 9, 9, dtype=dtype, device=device, grad=False) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    inputs = {"x": x.requires_grad_(), "weight": rand(C, dtype=dtype, device=device),
              "bias": rand(C, dtype=dtype, device=device)}
    running = (torch.randn(C, device=device), torch.rand(C, device=device) + 0.5)
    mask = make_mask(kind, 2, 3, 3, device)
    fn, ref = _bn_fns(mask, running, training)
    check(fn, ref, inputs, None, ("y",), f"bn C={C} {kind}")
    y = fn(**inputs)
    assert (y[~R.upsample_mask(mask, 9, 9).expand_as(y)] == 0).all()
    if training:  # running statistics updated like BatchNorm1d on the active pixels
        rk, rr = (t.clone() for t in running)
        triton_bn(x.detach(), mask, rk, rr, None, None, True, 0.1)
        rk2, rr2 = (t.clone() for t in running)
        R.sparse_batch_norm2d(x.detach(), mask, rk2, rr2, None, None, True, 0.1)
        torch.testing.assert_close(rk, rk2, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rr, rr2, rtol=1e-4, atol=1e-4)


def test_batch_norm_all_off_and_no_running_stats(device):
    C = 8
    x = torch.randn(2, C, 6, 6, device=device, requires_grad=True)
    off = make_mask("off", 2, 2, 2, device)
    rm, rv = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = triton_bn(x, off, rm, rv, torch.ones(C), torch.ones(C), True)
    assert (y == 0).all() and torch.equal(rm, rm0) and torch.equal(rv, rv0)
    y.sum().backward()
    assert (x.grad == 0).all()
    fn, ref = _bn_fns(make_mask("random", 2, 2, 2, device), None, False)  # no running stats: batch statistics
    check(fn, ref, {"x": x, "weight": rand(C), "bias": rand(C)}, None, ("y",), "bn no running stats")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("C, channels_last, affine, kind", [(24, False, True, "random"), (40, True, True, "checker"),
                                                            (300, False, False, "random"), (300, True, True, "on")])
def test_triton_layer_norm_matches_reference(C, channels_last, affine, kind, dtype, device):
    shape = (2, 6, 9, C) if channels_last else (2, C, 6, 9)
    x = rand(*shape, dtype=dtype, device=device, grad=False) * 2 + 0.5
    if channels_last and C == 300:  # the [B, H, W, C] permuted view of an NCHW tensor, as in a ConvNeXt block
        x = rand(2, C, 6, 9, dtype=dtype, device=device, grad=False).permute(0, 2, 3, 1)
    inputs = {"x": x.requires_grad_()}
    if affine:
        inputs.update(weight=rand(C, dtype=dtype, device=device), bias=rand(C, dtype=dtype, device=device))
    mask = make_mask(kind, 2, 2, 3, device)
    check(triton_ln, R.sparse_layer_norm2d, inputs, {"mask": mask, "channels_last": channels_last}, ("y",),
          f"ln C={C}")
    y = triton_ln(**inputs, mask=mask, channels_last=channels_last)
    m = R.upsample_mask(mask, 6, 9)
    m = m.permute(0, 2, 3, 1) if channels_last else m
    assert (y[~m.expand_as(y)] == 0).all()


# ------------------------------------------------------------------------------------------------ custom ops

def test_opcheck(device):
    mask = make_mask("random", 2, 2, 2, device)
    sm = SparseMask(mask)
    x = torch.randn(2, 8, 4, 4, device=device, requires_grad=True)
    w = torch.randn(16, 8, 3, 3, device=device, requires_grad=True)
    b = torch.randn(16, device=device, requires_grad=True)
    t_out, t_in = sm.table(2, 2), sm.table(4, 4, (2, 2))
    torch.library.opcheck(torch.ops.fastlayers.sparse_conv2d.default,
                          (x, w, b, t_out.rows, t_out.count, t_out.active, sm.table(4, 4).active, t_in.rows,
                           t_in.count, [2, 2], [1, 1], [1, 1], 1, "triton"))
    t = sm.table(4, 4)
    g = torch.randn(8, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastlayers.sparse_batch_norm2d.default,
                          (x, g, b[:8], None, None, t.rows, t.count, True, 1e-5, "triton"))
    torch.library.opcheck(torch.ops.fastlayers.sparse_layer_norm2d.default,
                          (x, g, b[:8], t.rows, t.count, 1e-6, False, "triton"))


def test_torch_compile_fullgraph(device):
    mask = make_mask("random", 2, 2, 2, device)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).to(device)
    g = torch.randn(8, device=device, requires_grad=True)

    def f(x, mask):
        y = fastlayers.sparse_conv2d(x, mask, conv.weight, conv.bias, padding=1)
        y = fastlayers.sparse_batch_norm2d(y, mask, None, None, g, None, True)
        return fastlayers.sparse_layer_norm2d(F.relu(y), mask, g)

    x = torch.randn(2, 8, 8, 8, device=device, requires_grad=True)
    with fastlayers.use_backend("triton"):
        eager = f(x, mask)
        ge = torch.autograd.grad(eager.sum(), [x, conv.weight, g])
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, mask)
        gc = torch.autograd.grad(out.sum(), [x, conv.weight, g])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # modules reading the mask from the context
    m = torch.nn.Sequential(SparseConv2d(8, 8, 3, padding=1), SparseBatchNorm2d(8), SparseLayerNorm2d(8)).to(device)
    with fastlayers.use_backend("triton"), sparse_mask(mask):
        eager = m(x)
        out = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ modules

def test_modules_load_dense_checkpoints_and_match_dense_when_all_visible(device):
    import timm.layers
    on = make_mask("on", 2, 2, 2, device)
    x = torch.randn(2, 8, 8, 8, device=device)
    conv = torch.nn.Conv2d(8, 16, 3, 2, 1)
    sconv = SparseConv2d(8, 16, 3, 2, 1)
    sconv.load_state_dict(conv.state_dict())
    bn, sbn = torch.nn.BatchNorm2d(8).eval(), SparseBatchNorm2d(8).eval()
    bn.running_mean.normal_()
    sbn.load_state_dict(bn.state_dict())
    ln, sln = timm.layers.LayerNorm2d(8), SparseLayerNorm2d(8)
    torch.nn.init.normal_(ln.weight)
    sln.load_state_dict(ln.state_dict())
    lnc, slnc = timm.layers.LayerNorm(8), SparseLayerNorm2d(8, channels_last=True)
    slnc.load_state_dict(lnc.state_dict())
    assert set(sbn.state_dict()) == set(bn.state_dict()) and set(sln.state_dict()) == set(ln.state_dict())
    with fastlayers.use_backend("triton"), sparse_mask(on):
        torch.testing.assert_close(sconv(x), conv(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sbn(x), bn(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sln(x), ln(x), rtol=1e-4, atol=1e-4)
        xc = x.permute(0, 2, 3, 1)
        torch.testing.assert_close(slnc(xc), lnc(xc), rtol=1e-4, atol=1e-4)


def test_batch_norm_module_matches_spark_bn1d(device):
    """SparK's SparseBatchNorm2d is a BatchNorm1d on the gathered active pixels: outputs and running stats,
    over several training steps, with momentum=None (cumulative average) too."""
    for momentum in (0.1, None):
        sbn = SparseBatchNorm2d(8, momentum=momentum)
        bn1d = torch.nn.BatchNorm1d(8, momentum=momentum)
        for step in range(3):
            mask = make_mask("random", 2, 2, 2, seed=step)
            x = torch.randn(2, 8, 6, 6) * 2 + 1
            with fastlayers.use_backend("triton"):
                y = sbn(x, mask)
            idx = R.upsample_mask(mask, 6, 6)[:, 0].nonzero(as_tuple=True)
            rows = bn1d(x.permute(0, 2, 3, 1)[idx])
            torch.testing.assert_close(y.permute(0, 2, 3, 1)[idx], rows, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sbn.running_mean, bn1d.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sbn.running_var, bn1d.running_var, rtol=1e-5, atol=1e-6)
        assert int(sbn.num_batches_tracked) == 3


def test_pools_mask_like_spark(device):
    mask = make_mask("random", 2, 2, 2, device)
    x = torch.relu(torch.randn(2, 4, 8, 8, device=device))
    xm = R.masked(x, mask)
    with sparse_mask(mask):
        for sp, dense in ((SparseMaxPool2d(3, 2, 1), torch.nn.MaxPool2d(3, 2, 1)),
                          (SparseAvgPool2d(2, 2), torch.nn.AvgPool2d(2, 2))):
            torch.testing.assert_close(sp(x), R.masked(dense(xm), mask))


# ------------------------------------------------------------------------------------------------ sparsify

def _randomize(model):
    """Non-trivial norm statistics and affine parameters (timm zero-inits some; ConvNeXt's layer scale is 1e-6)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if name.endswith(("weight", "gamma")) else 0))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model


def _tiny_models():
    from timm.models.convnext import ConvNeXt
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet
    return {
        "resnet-basic": lambda: ResNet(BasicBlock, [1, 1, 1, 1], channels=(8, 16, 16, 24), stem_width=8,
                                       num_classes=5),
        "resnet-bottleneck-deep-avgdown": lambda: ResNet(Bottleneck, [1, 1, 1, 1], channels=(8, 8, 16, 16),
                                                         stem_width=8, stem_type="deep", avg_down=True,
                                                         base_width=16, num_classes=5),
        "convnext": lambda: ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 16, 24), num_classes=5),
        "convnext-conv-mlp": lambda: ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 16, 24), conv_mlp=True,
                                              num_classes=5),
    }


@pytest.mark.parametrize("name", list(_tiny_models()))
def test_sparsify_equals_spark_dense_then_mask(name):
    """backend="reference", float64, train mode (batch statistics, running stats updated) and eval mode."""
    dense = _randomize(_tiny_models()[name]()).double()
    mask = make_mask("random", 2, 2, 2, p=0.5)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for training in (True, False):
        spark = R.spark_dense_then_mask(dense, mask).train(training)
        sparse = fastlayers.sparsify(copy.deepcopy(dense)).train(training)
        with fastlayers.use_backend("reference"), sparse_mask(mask):
            out = sparse.forward_features(x)
        ref = spark.forward_features(x)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
        assert (out[~R.upsample_mask(mask, *out.shape[2:]).expand_as(out)] == 0).all()
        for (n1, b1), (n2, b2) in zip(sparse.named_buffers(), spark.named_buffers()):
            assert n1 == n2
            torch.testing.assert_close(b1, b2, rtol=1e-9, atol=1e-9)
        assert out.abs().sum() > 0


def test_sparsify_densify_round_trip():
    import timm
    model = _randomize(timm.create_model("convnext_atto", pretrained=False)).eval()
    x = torch.randn(1, 3, 64, 64)
    before = model(x)
    types_before = {n: type(m) for n, m in model.named_modules()}
    ids_before = {n: id(p) for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fastlayers.sparsify(fastlayers.sparsify(model))  # twice: a no-op the second time
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"SparseConv2d", "SparseLayerNorm2d"} <= kinds
    assert type(model.head.norm).__name__ == "LayerNorm2d"  # the head stays dense
    assert set(model.state_dict()) == set(state)
    with sparse_mask(make_mask("on", 1, 2, 2)):
        torch.testing.assert_close(model.forward_features(x), fastlayers.densify(copy.deepcopy(model)).forward_features(x),
                                   rtol=1e-4, atol=1e-4)
    fastlayers.densify(model)
    assert {n: type(m) for n, m in model.named_modules()} == types_before
    assert {n: id(p) for n, p in model.named_parameters()} == ids_before
    torch.testing.assert_close(model(x), before)
    resnet = timm.create_model("resnet18", pretrained=False)
    fastlayers.sparsify(resnet)
    assert isinstance(resnet.conv1, SparseConv2d) and isinstance(resnet.maxpool, SparseMaxPool2d)
    assert isinstance(resnet.layer2[0].downsample[1], SparseBatchNorm2d)
    assert type(fastlayers.densify(resnet).conv1) is torch.nn.Conv2d


@pytest.mark.parametrize("name", ["resnet-basic", "convnext"])
def test_sparsify_triton_through_modules(name, device):
    """The Triton kernels inside a whole (tiny) sparse encoder, forward and every parameter gradient, against
    SparK's formulation: error vs float64 SparK within twice that of float32 SparK ("twice PyTorch's error")."""
    from fastlayers.testing import compare_tensor
    dense = _randomize(_tiny_models()[name]()).to(device)
    mask = torch.tensor([[[[True, False], [True, True]]]], device=device)  # one sample: 3 of 4 patches visible
    x = torch.randn(1, 3, 64, 64, device=device)
    sparse = fastlayers.sparsify(copy.deepcopy(dense)).train()
    with fastlayers.use_backend("triton"), sparse_mask(mask):
        out = sparse.forward_features(x)
    dy = torch.randn_like(out)
    runs = {"kernel": (sparse, out)}
    for label, dt in (("ref32", torch.float32), ("ref64", torch.float64)):
        spark = R.spark_dense_then_mask(dense, mask).to(dt).train()
        runs[label] = (spark, spark.forward_features(x.to(dt)))
    grads = {k: torch.autograd.grad(o, list(m.parameters()), dy.to(o.dtype), allow_unused=True)
             for k, (m, o) in runs.items()}
    results = [compare_tensor("features", out, runs["ref32"][1], runs["ref64"][1], torch.float32)]
    for i, (n, _) in enumerate(sparse.named_parameters()):
        if n.split(".")[0] in ("head", "fc"):
            continue
        results.append(compare_tensor(f"d{n}", grads["kernel"][i], grads["ref32"][i], grads["ref64"][i],
                                      torch.float32))
    assert_results(results, name)


# ------------------------------------------------------------------------------------------------ GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_bf16_conv_on_gpu(case):
    name, B, Cin, Cout, H, W, k, s, p, d, g, (mh, mw), cl = case
    inputs = conv_inputs(B, Cin, Cout, H, W, k, g, torch.bfloat16, "cuda", cl)
    kw = {"mask": make_mask("random", B, mh, mw, "cuda"), "stride": s, "padding": p, "dilation": d, "groups": g}
    check(triton_conv, R.sparse_conv2d, inputs, kw, ("y",), name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(8, 64, 56, 3, 1, 1), (8, 128, 28, 3, 2, 1), (8, 96, 56, 7, 1, 96),
                                   (8, 512, 7, 3, 1, 1)], ids=["r50s1", "r50s2down", "cnxdw7", "r50s4"])
def test_stage_shapes_on_gpu(shape, dtype):
    B, C, H, k, s, g = shape
    inputs = conv_inputs(B, C, C, H, H, k, g, dtype, "cuda", channels_last=(C == 96))
    kw = {"mask": make_mask("random", B, 7, 7, "cuda"), "stride": s, "padding": k // 2, "groups": g}
    check(triton_conv, R.sparse_conv2d, inputs, kw, ("y",), str(shape))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_norms_on_gpu(dtype):
    mask = make_mask("random", 8, 7, 7, "cuda")
    for C, cl in ((64, False), (768, True)):
        x = rand(8, C, 28, 28, dtype=dtype, device="cuda", grad=False)
        inputs = {"x": (x.permute(0, 2, 3, 1) if cl else x).requires_grad_(),
                  "weight": rand(C, dtype=dtype, device="cuda"), "bias": rand(C, dtype=dtype, device="cuda")}
        check(triton_ln, R.sparse_layer_norm2d, inputs, {"mask": mask, "channels_last": cl}, ("y",), f"ln {C}")
        inputs["x"] = x.requires_grad_()
        fn, ref = _bn_fns(mask, (torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")), True)
        check(fn, ref, inputs, None, ("y",), f"bn {C}")


@pytest.mark.gpu
def test_sparse_resnet50_on_gpu():
    import timm
    dense = _randomize(timm.create_model("resnet50", pretrained=False)).cuda()
    mask = make_mask("random", 4, 7, 7, "cuda", p=0.4)
    x = torch.randn(4, 3, 224, 224, device="cuda")
    spark = R.spark_dense_then_mask(dense, mask).train()
    sparse = fastlayers.sparsify(copy.deepcopy(dense)).train().to(torch.bfloat16)
    with sparse_mask(mask):
        out = sparse.forward_features(x.to(torch.bfloat16))
    ref = spark.forward_features(x)
    assert fastlayers.testing.rel_err(out.float(), ref) < 5e-2
