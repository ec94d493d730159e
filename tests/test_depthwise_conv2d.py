"""fastlayers.depthwise_conv2d: the Triton kernels (interpreted on CPU) against the reference (F.conv2d with
groups=C), gradients included; kernel sizes 3..31, even/non-square kernels, dilation, stride 2, images smaller
than the kernel, both memory layouts; determinism of dweight; modules (DepthwiseConv2d, DilatedReparamBlock and
its re-parameterisation), accelerate on timm ConvNeXt, errors, torch.compile and opcheck."""
import functools

import pytest
import torch
import torch.nn.functional as F

import fastlayers
from fastlayers import reference as R
from fastlayers.kernels import depthwise_conv2d as K
from fastlayers.nn import DepthwiseConv2d, DilatedReparamBlock

from .conftest import KERNEL_DTYPES
from .helpers import check, rand

# (B, C, H, W, (Kh, Kw), padding, dilation, stride)
SHAPES = [
    (2, 5, 9, 11, (3, 3), 1, 1, 1),
    (1, 3, 12, 10, (4, 4), "same", 1, 1),           # even kernel: torch pads one more at the bottom/right
    (2, 4, 11, 13, (7, 7), "same", 1, 1),           # ConvNeXt
    (1, 3, 15, 14, (13, 13), "same", 1, 1),         # UniRepLKNet
    (1, 2, 9, 10, (31, 31), "same", 1, 1),          # RepLKNet's largest, image smaller than the kernel
    (1, 3, 10, 17, (5, 11), (2, 5), 1, 1),          # non-square
    (2, 3, 9, 12, (4, 6), "same", 1, 1),            # even, non-square
    (1, 4, 13, 12, (3, 3), "same", 3, 1),           # dilated re-parameterisation branch
    (1, 3, 15, 16, (5, 3), (4, 3), (2, 3), 1),      # per-axis dilation
    (2, 5, 13, 11, (7, 7), 3, 1, 2),                # stride 2
    (1, 3, 12, 15, (4, 5), (1, 2), 2, 2),           # stride 2, dilation 2, even kernel
    (1, 2, 5, 4, (13, 13), 6, 1, 2),                # stride 2, image smaller than the kernel
    (1, 10, 7, 9, (3, 3), 1, 1, (1, 2)),            # channels past one channel block; stride (1, 2)
    (1, 2, 70, 37, (5, 3), "valid", 1, 1),          # several row and column tiles
]
IDS = [f"B{b}C{c}_{h}x{w}_k{kh}x{kw}_p{p}_d{d}_s{s}".replace(" ", "").replace("'", "")
       for b, c, h, w, (kh, kw), p, d, s in SHAPES]


def _inputs(B, C, H, W, k, dtype, device, channels_last=False, bias=True):
    x = rand(B, C, H, W, dtype=dtype, device=device, grad=False)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    kh, kw = k
    inputs = {"x": x.requires_grad_(), "weight": rand(C, 1, kh, kw, dtype=dtype, device=device,
                                                     scale=(kh * kw) ** -0.5)}
    inputs["bias"] = rand(C, dtype=dtype, device=device) if bias else None
    return inputs


def _triton(**kw):
    return functools.partial(fastlayers.depthwise_conv2d, backend="triton", **kw)


def _check_shape(shape, channels_last, dtype, device):
    B, C, H, W, k, pad, d, s = shape
    inputs = _inputs(B, C, H, W, k, dtype, device, channels_last, bias=(B + C) % 2 == 1 or channels_last)
    kw = {"padding": pad, "dilation": d, "stride": s}
    check(_triton(), R.depthwise_conv2d, inputs, kw, ("y",), f"{shape} {dtype}")


# every shape in both layouts, except the one with many tiles: channels-last tiles are small, so other shapes
# already cover several of them, and the interpreter is slow
FP32_CASES = [(s, cl) for s in SHAPES for cl in (False, True) if not (cl and s is SHAPES[13])]


@pytest.mark.parametrize("shape, channels_last", FP32_CASES,
                         ids=[IDS[SHAPES.index(s)] + ("-cl" if c else "-cf") for s, c in FP32_CASES])
def test_triton_matches_reference(shape, channels_last, device):
    _check_shape(shape, channels_last, torch.float32, device)


# the other kernel dtypes on a subset (the interpreter is slow; the tiling does not depend on the dtype)
LOW_PRECISION = [(SHAPES[1], False), (SHAPES[4], True), (SHAPES[9], False), (SHAPES[12], True)]


@pytest.mark.parametrize("dtype", [d for d in KERNEL_DTYPES if d != torch.float32], ids=str)
@pytest.mark.parametrize("shape, channels_last", LOW_PRECISION,
                         ids=[IDS[SHAPES.index(s)] + ("-cl" if c else "-cf") for s, c in LOW_PRECISION])
def test_triton_matches_reference_low_precision(shape, channels_last, dtype, device):
    _check_shape(shape, channels_last, dtype, device)


def test_reference_is_conv2d_and_same_matches_torch():
    x = torch.randn(2, 3, 10, 9, dtype=torch.float64)
    for k, d in (((4, 6), 1), ((3, 4), 2), ((7, 7), 1)):
        w = torch.randn(3, 1, *k, dtype=torch.float64)
        y = fastlayers.depthwise_conv2d(x, w, padding="same", dilation=d)
        assert y.shape == x.shape
        torch.testing.assert_close(y, F.conv2d(x, w, padding="same", dilation=d, groups=3))


def test_gradcheck_reference_fp64():
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    f = functools.partial(fastlayers.depthwise_conv2d, padding=(1, 2), dilation=(1, 2), stride=2,
                          backend="reference")
    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_dweight_is_deterministic(channels_last, device):
    """Bit-identical gradients twice; many row tiles, so dweight is a sum of many program partials."""
    inputs = _inputs(2, 3, 33, 8, (3, 3), torch.float32, device, channels_last)
    grads = []
    for _ in range(2):
        y = fastlayers.depthwise_conv2d(**inputs, padding="same", backend="triton")
        grads.append(torch.autograd.grad((y * 1.3).sum(), list(inputs.values())))
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_batch_split_for_int32_offsets(channels_last, device, monkeypatch):
    """The launchers split the batch so offsets fit in int32: force several chunks and compare."""
    inputs = _inputs(5, 3, 8, 9, (3, 5), torch.float32, device, channels_last)
    monkeypatch.setattr(K, "_INT32_LIMIT", 2 * 3 * 8 * 9 + 10)  # two images per launch
    assert len(K._batch_chunks(5, inputs["x"])) == 3
    check(_triton(), R.depthwise_conv2d, inputs, {"padding": (1, 2), "stride": (2, 1)}, ("y",), "chunked")
    monkeypatch.setattr(K, "_INT32_LIMIT", 100)
    with pytest.raises(ValueError, match="more than the Triton kernels index"):
        fastlayers.depthwise_conv2d(inputs["x"], inputs["weight"], backend="triton")


def test_output_layout_follows_input(device):
    x = torch.randn(2, 6, 9, 8, device=device)
    w = torch.randn(6, 1, 5, 5, device=device)
    y_cf = fastlayers.depthwise_conv2d(x, w, backend="triton")
    y_cl = fastlayers.depthwise_conv2d(x.contiguous(memory_format=torch.channels_last), w, backend="triton")
    assert y_cf.is_contiguous() and y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y_cf, rtol=1e-5, atol=1e-5)
    xs = torch.randn(2, 6, 18, 8, device=device)[:, :, ::2]  # neither layout: copied, not misread
    torch.testing.assert_close(fastlayers.depthwise_conv2d(xs, w, backend="triton"), R.depthwise_conv2d(xs, w),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 4, 6, 6), (2, 0, 6, 6)])
def test_zero_size(shape, device):
    x = torch.randn(*shape, device=device, requires_grad=True)
    w = torch.randn(shape[1], 1, 3, 3, device=device, requires_grad=True)
    b = torch.randn(shape[1], device=device, requires_grad=True)
    y = fastlayers.depthwise_conv2d(x, w, b, backend="triton")
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and b.grad.shape == b.shape
    assert not w.grad.any() and not b.grad.any()


def test_nan_propagates(device):
    """A non-finite input makes the outputs that read it non-finite. Documented deviation from F.conv2d: the
    kernels multiply whole input rows by a banded matrix, so NaN * 0 spreads a NaN along the output row tile
    (columns outside the kernel's reach too); other rows and channels stay finite."""
    x = torch.randn(1, 2, 9, 9, device=device)
    x[0, 1, 4, 4] = float("nan")
    w = torch.randn(2, 1, 3, 3, device=device)
    y = fastlayers.depthwise_conv2d(x, w, padding=1, backend="triton")
    ref = R.depthwise_conv2d(x, w, padding=1)
    assert torch.isnan(y[torch.isnan(ref)]).all()
    assert torch.isnan(y[0, 1, 3:6, 3:6]).all()
    assert not torch.isnan(y[0, 0]).any() and not torch.isnan(y[0, 1, :3]).any() and not torch.isnan(y[0, 1, 6:]).any()


def test_inputs_not_mutated(device):
    inputs = _inputs(2, 3, 8, 7, (5, 5), torch.float32, device)
    before = {k: v.detach().clone() for k, v in inputs.items()}
    fastlayers.depthwise_conv2d(**inputs, backend="triton").sum().backward()
    for k, v in inputs.items():
        assert torch.equal(v.detach(), before[k]), k


@pytest.mark.parametrize("call, exc, match", [
    (lambda x, w: fastlayers.depthwise_conv2d(x[0], w), ValueError, "`x` must have 4 dimensions"),
    (lambda x, w: fastlayers.depthwise_conv2d(x, w[:, 0]), ValueError, "`weight` must have 4 dimensions"),
    (lambda x, w: fastlayers.depthwise_conv2d(x, torch.randn(4, 2, 3, 3)), ValueError, r"\[C, 1, Kh, Kw\]"),
    (lambda x, w: fastlayers.depthwise_conv2d(x, torch.randn(3, 1, 3, 3)), ValueError, r"\[C, 1, Kh, Kw\]"),
    (lambda x, w: fastlayers.depthwise_conv2d(x, torch.randn(4, 1, 33, 3), padding=0), ValueError,
     "must be in"),
    (lambda x, w: fastlayers.depthwise_conv2d(x, w, stride=2), ValueError, "not supported for strided"),
    (lambda x, w: fastlayers.depthwise_conv2d(x, w, stride=0), ValueError, "`stride` must be >= 1"),
    (lambda x, w: fastlayers.depthwise_conv2d(x, w, dilation=(1, 2, 3)), ValueError, "pair of ints"),
    (lambda x, w: fastlayers.depthwise_conv2d(x, w, dilation=1.5), TypeError, "`dilation` must be an int"),
    (lambda x, w: fastlayers.depthwise_conv2d(x, w, padding=-1), ValueError, "`padding` must be >= 0"),
    (lambda x, w: fastlayers.depthwise_conv2d(x, w, padding="full"), ValueError, "`padding` must be one of"),
    (lambda x, w: fastlayers.depthwise_conv2d(x, w, padding=0, dilation=5), ValueError, "smaller than the dilated"),
    (lambda x, w: fastlayers.depthwise_conv2d(x, w.half()), TypeError, "`weight` has dtype"),
    (lambda x, w: fastlayers.depthwise_conv2d(x, w.to("meta")), ValueError, "`weight` is on meta"),
    (lambda x, w: fastlayers.depthwise_conv2d(x.int(), w), TypeError, "`x` must have dtype"),
    (lambda x, w: fastlayers.depthwise_conv2d(x, w, torch.randn(3)), ValueError, "`bias` must have shape"),
    (lambda x, w: fastlayers.depthwise_conv2d(x, w, backend="cuda"), ValueError, "needs CUDA tensors"),
    (lambda x, w: fastlayers.depthwise_conv2d(x.double(), w.double(), backend="triton"), ValueError,
     "float64 runs only on the reference"),
])
def test_bad_input_raises(call, exc, match):
    x, w = torch.randn(2, 4, 9, 9), torch.randn(4, 1, 3, 3)
    with pytest.raises(exc, match=match):
        call(x, w)


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_opcheck(channels_last, device):
    x = torch.randn(2, 3, 5, 4, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(3, 1, 2, 3, device=device, requires_grad=True)
    b = torch.randn(3, device=device, requires_grad=True) if not channels_last else None
    # (x, weight, bias, sh, sw, pt, pb, pl, pr, dh, dw, backend): stride (1, 2), asymmetric "same"-like padding
    # channels-last: the layout-specific parts (fake strides, autograd); the compile tests ran for channels-first
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") if channels_last else \
        torch.library._OPCHECK_DEFAULT_UTILS
    torch.library.opcheck(torch.ops.fastlayers.depthwise_conv2d.default, (x, w, b, 1, 2, 0, 1, 1, 1, 1, 2, "triton"),
                          test_utils=utils)


def test_torch_compile_fullgraph(device):
    m = DepthwiseConv2d(4, 4, (3, 4), padding="same").to(device)
    x = torch.randn(2, 4, 9, 10, device=device, requires_grad=True)
    with fastlayers.use_backend("triton"):
        eager = m(x).square()
        g_eager = torch.autograd.grad(eager.sum(), [x, m.weight, m.bias])
        compiled = torch.compile(lambda t: m(t).square(), fullgraph=True, backend="aot_eager")
        out = compiled(x)
        g = torch.autograd.grad(out.sum(), [x, m.weight, m.bias])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ modules

def test_depthwise_conv2d_module_is_a_conv2d(device):
    conv = torch.nn.Conv2d(6, 6, (5, 4), stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=6)
    m = DepthwiseConv2d(6, 6, (5, 4), stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=6)
    m.load_state_dict(conv.state_dict())
    assert isinstance(m, torch.nn.Conv2d) and set(m.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 6, 11, 12)
    torch.testing.assert_close(m(x), conv(x), rtol=1e-5, atol=1e-5)  # CPU tensors: the reference
    with fastlayers.use_backend("triton"):
        torch.testing.assert_close(m(x), conv(x), rtol=1e-5, atol=1e-5)
        shared = DepthwiseConv2d.from_conv2d(conv)
        assert shared.weight is conv.weight
        torch.testing.assert_close(shared(x), conv(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="depthwise"):
        DepthwiseConv2d(4, 8, 3)
    with pytest.raises(ValueError, match="padding_mode"):
        DepthwiseConv2d(4, 4, 3, padding_mode="reflect")


def _unireplknet_keys(C, k):
    """The state_dict keys UniRepLKNet's DilatedReparamBlock(C, k, deploy=False) has."""
    keys = {"lk_origin.weight"} | {f"origin_bn.{n}" for n in ("weight", "bias", "running_mean", "running_var",
                                                              "num_batches_tracked")}
    for kk, r in {7: ((5, 1), (3, 2), (3, 3)), 13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5))}[k]:
        keys |= {f"dil_conv_k{kk}_{r}.weight"}
        keys |= {f"dil_bn_k{kk}_{r}.{n}" for n in ("weight", "bias", "running_mean", "running_var",
                                                   "num_batches_tracked")}
    return keys


def _randomize_bn(block):
    g = torch.Generator().manual_seed(1)
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


@pytest.mark.parametrize("k", [7, 13])
def test_dilated_reparam_block_merge_keeps_outputs(k):
    C = 6
    block = DilatedReparamBlock(C, k)
    assert set(block.state_dict()) == _unireplknet_keys(C, k)
    _randomize_bn(block)
    x = torch.randn(2, C, 11, 10, dtype=torch.float64)
    block = block.double()
    # training mode: every branch with its BN, as UniRepLKNet computes it
    block.train()
    y = block(x)
    ref = block.origin_bn(F.conv2d(x, block.lk_origin.weight, None, padding=k // 2, groups=C))
    for kk, r in zip(block.kernel_sizes, block.dilates):
        conv = getattr(block, f"dil_conv_k{kk}_{r}")
        ref = ref + getattr(block, f"dil_bn_k{kk}_{r}")(F.conv2d(x, conv.weight, None, padding=r * (kk - 1) // 2,
                                                                 dilation=r, groups=C))
    torch.testing.assert_close(y, ref)
    # eval mode: branches (one merged convolution on the fly) == merged deploy form
    block.eval()
    branches = sum(bn(F.conv2d(x, conv.weight, None, padding=conv.padding, dilation=conv.dilation, groups=C))
                   for conv, bn in [(block.lk_origin, block.origin_bn)]
                   + [(getattr(block, f"dil_conv_k{kk}_{r}"), getattr(block, f"dil_bn_k{kk}_{r}"))
                      for kk, r in zip(block.kernel_sizes, block.dilates)])
    y_eval = block(x)
    torch.testing.assert_close(y_eval, branches)
    block.merge()
    assert set(block.state_dict()) == {"lk_origin.weight", "lk_origin.bias"}
    assert isinstance(block.lk_origin, DepthwiseConv2d)
    torch.testing.assert_close(block(x), branches)


def test_dilated_reparam_block_triton(device):
    """The Triton kernels through the block: training (all branches) and eval (merged), with gradients."""
    block = DilatedReparamBlock(4, 5).to(device)
    _randomize_bn(block)
    x = torch.randn(2, 4, 7, 6, device=device, requires_grad=True)
    for train in (True, False):
        block.train(train)
        with fastlayers.use_backend("reference"):
            ref = block(x)
            g_ref = torch.autograd.grad(ref.square().sum(), [x, block.lk_origin.weight])
        with fastlayers.use_backend("triton"):
            y = block(x)
            g = torch.autograd.grad(y.square().sum(), [x, block.lk_origin.weight])
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_dilated_reparam_block_errors():
    with pytest.raises(ValueError, match="no default branches"):
        DilatedReparamBlock(4, 31)
    b = DilatedReparamBlock(4, 31, branches=[(5, 1), (3, 15)])
    assert hasattr(b, "dil_conv_k3_15")
    with pytest.raises(ValueError, match="does not centre"):
        DilatedReparamBlock(4, 7, branches=[(3, 4)])


# ------------------------------------------------------------------------------------------------ accelerate

def test_accelerate_timm_convnext_same_outputs():
    timm = pytest.importorskip("timm")
    model = timm.create_model("convnext_atto", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        report = fastlayers.accelerate(model)
        with fastlayers.use_backend("reference"):  # the kernels' oracle; CPU tensors
            got = model(x)
    n_dw = sum(1 for m in model.modules() if isinstance(m, DepthwiseConv2d))
    assert n_dw == len(report.replaced) == 12
    assert all(new == "DepthwiseConv2d" for _, _, new in report.replaced)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_accelerate_timm_convnext_block_triton(device):
    pytest.importorskip("timm")
    from timm.models.convnext import ConvNeXtBlock
    block = ConvNeXtBlock(8, ls_init_value=1.0).to(device)
    x = torch.randn(2, 8, 9, 7, device=device, requires_grad=True)
    expected = block(x)
    g_expected = torch.autograd.grad(expected.sum(), [x, block.conv_dw.weight])
    fastlayers.accelerate(block)
    assert isinstance(block.conv_dw, DepthwiseConv2d)
    with fastlayers.use_backend("triton"):
        y = block(x)
        g = torch.autograd.grad(y.sum(), [x, block.conv_dw.weight])
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    for a, b in zip(g, g_expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_accelerate_keeps_small_and_non_depthwise_convs():
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1, groups=4), torch.nn.Conv2d(4, 8, 7),
                                torch.nn.Conv2d(4, 4, 7, padding=3, groups=4, padding_mode="reflect"))
    report = fastlayers.accelerate(model)
    assert not report.replaced and len(report.kept) == 2  # the dense conv is not a candidate at all


def test_accelerate_unireplknet_block():
    """UniRepLKNet's block (a stand-in with its class name and attributes) becomes fastlayers'."""
    class DilatedReparamBlock(torch.nn.Module):  # noqa: N801 (the name the rule looks for)
        def __init__(self, C):
            super().__init__()
            self.lk_origin = torch.nn.Conv2d(C, C, 7, padding=3, groups=C, bias=False)
            self.kernel_sizes, self.dilates = [5, 3, 3], [1, 2, 3]
            self.origin_bn = torch.nn.BatchNorm2d(C)
            for k, r in zip(self.kernel_sizes, self.dilates):
                setattr(self, f"dil_conv_k{k}_{r}", torch.nn.Conv2d(C, C, k, padding=r * (k - 1) // 2, dilation=r,
                                                                    groups=C, bias=False))
                setattr(self, f"dil_bn_k{k}_{r}", torch.nn.BatchNorm2d(C))

        def forward(self, x):
            out = self.origin_bn(self.lk_origin(x))
            for k, r in zip(self.kernel_sizes, self.dilates):
                out = out + getattr(self, f"dil_bn_k{k}_{r}")(getattr(self, f"dil_conv_k{k}_{r}")(x))
            return out

    theirs = DilatedReparamBlock(4)
    _randomize_bn(theirs)
    model = torch.nn.Sequential(theirs).eval()
    x = torch.randn(2, 4, 10, 9)
    expected = model(x)
    state = model.state_dict()
    report = fastlayers.accelerate(model)
    assert report.replaced == [("0", "DilatedReparamBlock", "DilatedReparamBlock")]
    assert type(model[0]).__module__ == "fastlayers.nn.depthwise_conv2d"
    assert model.state_dict().keys() == state.keys()
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_examples_run(device):
    from fastlayers.nn.depthwise_conv2d import examples
    for label, m, args in examples(device):
        with fastlayers.use_backend("triton"):
            assert m(*args).shape == args[0].shape, label


# ------------------------------------------------------------------------------------------------ GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("shape", SHAPES + [(4, 64, 28, 28, (31, 31), "same", 1, 1),
                                            (4, 96, 56, 56, (7, 7), "same", 1, 1)], ids=IDS + ["K31", "K7"])
def test_bf16_matches_reference(shape, channels_last):
    B, C, H, W, k, pad, d, s = shape
    inputs = _inputs(B, C, H, W, k, torch.bfloat16, "cuda", channels_last)
    check(_triton(), R.depthwise_conv2d, inputs, {"padding": pad, "dilation": d, "stride": s}, ("y",),
          f"bf16 {shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_more_than_2_31_elements(channels_last):
    """B*C*H*W > 2**31: the launchers split the batch so the kernels' int32 offsets stay in range."""
    B, C, H, W = 9, 256, 1024, 1024
    x = torch.randn(B, C, H, W, device="cuda", dtype=torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, 1, 7, 7, device="cuda", dtype=torch.bfloat16) / 7
    y = fastlayers.depthwise_conv2d(x, w, backend="triton")
    ref = R.depthwise_conv2d(x[-1:, -3:], w[-3:])  # the last image: offsets past 2**31
    torch.testing.assert_close(y[-1:, -3:].float(), ref.float(), rtol=2e-2, atol=2e-2)
