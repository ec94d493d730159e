"""fastlayers.dilated_conv1d: Triton (interpreted on CPU) and CUDA (GPU) against the reference, gradients
included; chunked streaming, decoding steps, modules, errors, torch.compile and opcheck."""
import functools

import pytest
import torch
import torch.nn.functional as F

import fastlayers
from fastlayers import reference as R
from fastlayers.nn import CausalConv1d, DilatedConv1d, TemporalConvNet

from .conftest import KERNEL_DTYPES
from .helpers import check, rand

# (B, C, L, K, dilation): odd, prime and smaller-than-one-block sizes; L < (K-1)*d; K=1 and K=32
SHAPES = [
    (2, 7, 63, 4, 1),
    (1, 5, 197, 3, 8),
    (3, 24, 7, 5, 3),      # L < (K-1)*d
    (2, 40, 1, 4, 2),      # one time step
    (1, 3, 131, 32, 2),    # the longest filter
    (2, 9, 37, 1, 1),      # K = 1: no state
    (1, 130, 66, 2, 5),    # more channels than one channel block
]
IDS = [f"B{b}C{c}L{l}K{k}d{d}" for b, c, l, k, d in SHAPES]


def _inputs(B, C, L, K, d, dtype, device, channels_last=False, init=True, bias=True):
    x = rand(B, L, C, dtype=dtype, device=device, grad=False).transpose(1, 2) if channels_last else \
        rand(B, C, L, dtype=dtype, device=device, grad=False)
    inputs = {"x": x.requires_grad_(), "weight": rand(C, K, dtype=dtype, device=device, scale=K ** -0.5)}
    inputs["bias"] = rand(C, dtype=dtype, device=device) if bias else None
    if init:
        inputs["initial_state"] = rand(B, C, (K - 1) * d, dtype=dtype, device=device)
    return inputs


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_triton_causal_matches_reference(shape, channels_last, dtype, device):
    B, C, L, K, d = shape
    act = "silu" if (B + K) % 2 else None
    inputs = _inputs(B, C, L, K, d, dtype, device, channels_last)
    kw = {"dilation": d, "causal": True, "activation": act, "return_final_state": True}
    check(functools.partial(fastlayers.dilated_conv1d, backend="triton"), R.dilated_conv1d, inputs, kw,
          ("y", "final_state"), f"{shape} {act}")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:5], ids=IDS[:5])
def test_triton_same_padding_matches_reference(shape, dtype, device):
    B, C, L, K, d = shape
    inputs = _inputs(B, C, L, K, d, dtype, device, channels_last=bool(L % 2), init=False, bias=bool(C % 2))
    for act in (None, "silu"):
        kw = {"dilation": d, "causal": False, "activation": act}
        check(functools.partial(fastlayers.dilated_conv1d, backend="triton"), R.dilated_conv1d, inputs, kw,
              ("y",), f"{shape} same {act}")


def test_reference_same_padding_equals_torch_same():
    x, w = torch.randn(2, 6, 50, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    for d in (1, 3):
        y = R.dilated_conv1d(x, w, None, d, causal=False)
        torch.testing.assert_close(y, F.conv1d(x, w[:, None], padding="same", dilation=d, groups=6))


def test_reference_causal_equals_mamba_conv():
    """Mamba: nn.Conv1d(groups=C, padding=K-1) then [..., :L]."""
    x, w, b = torch.randn(2, 6, 50, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    y = R.dilated_conv1d(x, w, b, 1, True, "silu")
    torch.testing.assert_close(y, F.silu(F.conv1d(x, w[:, None], b, padding=3, groups=6)[..., :50]))


def test_gradcheck_reference_fp64():
    x = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    f = functools.partial(fastlayers.dilated_conv1d, dilation=2, causal=True, activation="silu",
                          return_final_state=True, backend="reference")
    assert torch.autograd.gradcheck(lambda *a: f(*a[:3], initial_state=a[3]), (x, w, b, s))


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_chunked_equals_whole(backend, device):
    B, C, L, K, d = 2, 6, 90, 4, 7
    x = torch.randn(B, C, L, device=device)
    w, b = torch.randn(C, K, device=device), torch.randn(C, device=device)
    whole, whole_final = fastlayers.dilated_conv1d(x, w, b, d, True, "silu", return_final_state=True, backend=backend)
    state, ys = None, []
    for lo, hi in ((0, 5), (5, 40), (40, 90)):  # a chunk shorter than the state, then longer ones
        y, state = fastlayers.dilated_conv1d(x[:, :, lo:hi], w, b, d, True, "silu", state, True, backend=backend)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 2), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, whole_final)


def test_steps_equal_whole(device):
    B, C, L, K, d = 2, 5, 30, 3, 4
    x, w, b = torch.randn(B, C, L), torch.randn(C, K), torch.randn(C)
    whole = fastlayers.dilated_conv1d(x, w, b, d, True, "silu")
    _, state = fastlayers.dilated_conv1d(x[:, :, :10], w, b, d, True, "silu", return_final_state=True)
    saved = state.clone()
    for t in range(10, L):
        y_t, new_state = fastlayers.dilated_conv1d_step(x[:, :, t], state, w, b, d, "silu")
        torch.testing.assert_close(y_t, whole[:, :, t], rtol=1e-5, atol=1e-5)
        if t == 10:
            torch.testing.assert_close(state, saved)  # the caller's state is not mutated
        state = new_state


def test_backward_is_deterministic(device):
    inputs = _inputs(2, 33, 300, 4, 3, torch.float32, device)
    grads = []
    for _ in range(2):
        y, f = fastlayers.dilated_conv1d(**inputs, dilation=3, activation="silu", return_final_state=True,
                                         backend="triton")
        grads.append(torch.autograd.grad((y * 1.3).sum() + f.sum(), list(inputs.values())))
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)


def test_output_layout_follows_input(device):
    x = torch.randn(2, 40, 8, device=device).transpose(1, 2)  # channels-last view [B, C, L]
    y = fastlayers.dilated_conv1d(x, torch.randn(8, 3, device=device), backend="triton")
    assert y.stride() == x.stride()
    torch.testing.assert_close(fastlayers.dilated_conv1d(x.contiguous(), y.new_ones(8, 3), backend="triton"),
                               fastlayers.dilated_conv1d(x, y.new_ones(8, 3), backend="triton"))


def test_strided_input_is_copied_not_misread(device):
    base = torch.randn(2, 6, 80, device=device)
    x = base[:, ::2, ::3]  # neither layout
    w = torch.randn(3, 4, device=device)
    torch.testing.assert_close(fastlayers.dilated_conv1d(x, w, backend="triton"), R.dilated_conv1d(x, w),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 4, 10), (2, 0, 10), (2, 4, 0)])
def test_zero_size(shape, device):
    B, C, L = shape
    x = torch.randn(B, C, L, device=device, requires_grad=True)
    w = torch.randn(C, 3, device=device, requires_grad=True)
    s = torch.randn(B, C, 4, device=device, requires_grad=True)
    y, f = fastlayers.dilated_conv1d(x, w, None, 2, True, None, s, True, backend="triton")
    assert y.shape == x.shape and f.shape == (B, C, 4)
    torch.testing.assert_close(f, s.detach() if L == 0 else f)
    (y.sum() + f.sum()).backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and s.grad.shape == s.shape


def test_nan_propagates_like_reference(device):
    x = torch.randn(1, 2, 20, device=device)
    x[0, 1, 5] = float("nan")
    w = torch.randn(2, 3, device=device)
    y = fastlayers.dilated_conv1d(x, w, None, 2, backend="triton")
    ref = R.dilated_conv1d(x, w, None, 2)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.isnan(y[0, 1, [5, 7, 9]]).all() and not torch.isnan(y[0, 0]).any()


def test_inputs_not_mutated(device):
    inputs = _inputs(2, 5, 30, 3, 2, torch.float32, device)
    before = {k: v.detach().clone() for k, v in inputs.items()}
    y, f = fastlayers.dilated_conv1d(**inputs, dilation=2, activation="silu", return_final_state=True,
                                     backend="triton")
    (y.sum() + f.sum()).backward()
    for k, v in inputs.items():
        assert torch.equal(v.detach(), before[k]), k


@pytest.mark.parametrize("call, exc, match", [
    (lambda x, w: fastlayers.dilated_conv1d(x[0], w), ValueError, "`x` must have 3 dimensions"),
    (lambda x, w: fastlayers.dilated_conv1d(x, w[:, :0]), ValueError, "K = weight.shape"),
    (lambda x, w: fastlayers.dilated_conv1d(x, torch.randn(4, 33)), ValueError, "K = weight.shape"),
    (lambda x, w: fastlayers.dilated_conv1d(x, torch.randn(5, 3)), ValueError, "`weight` must have shape"),
    (lambda x, w: fastlayers.dilated_conv1d(x, w, dilation=0), ValueError, "`dilation` must be >= 1"),
    (lambda x, w: fastlayers.dilated_conv1d(x, w, dilation=True), TypeError, "`dilation` must be an int"),
    (lambda x, w: fastlayers.dilated_conv1d(x, w, dilation=1.0), TypeError, "`dilation` must be an int"),
    (lambda x, w: fastlayers.dilated_conv1d(x, w.half()), TypeError, "`weight` has dtype"),
    (lambda x, w: fastlayers.dilated_conv1d(x, w.to("meta")), ValueError, "`weight` is on meta"),
    (lambda x, w: fastlayers.dilated_conv1d(x.int(), w), TypeError, "`x` must have dtype"),
    (lambda x, w: fastlayers.dilated_conv1d(x.numpy(), w), TypeError, "`x` must be a torch.Tensor"),
    (lambda x, w: fastlayers.dilated_conv1d(x, w, torch.randn(3)), ValueError, "`bias` must have shape"),
    (lambda x, w: fastlayers.dilated_conv1d(x, w, activation="gelu"), ValueError, "`activation` must be one of"),
    (lambda x, w: fastlayers.dilated_conv1d(x, w, causal=False, initial_state=torch.randn(2, 4, 2)),
     ValueError, "only defined for causal=True"),
    (lambda x, w: fastlayers.dilated_conv1d(x, w, causal=False, return_final_state=True), ValueError,
     "only defined for causal=True"),
    (lambda x, w: fastlayers.dilated_conv1d(x, w, initial_state=torch.randn(2, 4, 3)), ValueError,
     r"`initial_state` must have shape \(2, 4, 2\)"),
    (lambda x, w: fastlayers.dilated_conv1d(x, w, backend="fast"), ValueError, "expected one of"),
    (lambda x, w: fastlayers.dilated_conv1d(x, w, backend="cuda"), ValueError, "needs CUDA tensors"),
    (lambda x, w: fastlayers.dilated_conv1d(x.double(), w.double(), backend="triton"), ValueError,
     "float64 runs only on the reference"),
    (lambda x, w: fastlayers.dilated_conv1d_step(x[:, :, 0], torch.randn(2, 4, 1), w), ValueError,
     r"`state` must have shape \(2, 4, 2\)"),
])
def test_bad_input_raises(call, exc, match):
    x, w = torch.randn(2, 4, 10), torch.randn(4, 3)
    with pytest.raises(exc, match=match):
        call(x, w)


def test_cuda_backend_on_cpu_machine_explains_how_to_build(monkeypatch):
    from fastlayers import _ext
    monkeypatch.setattr(_ext, "has_op", lambda name: False)
    x = torch.randn(1, 2, 5)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        fastlayers.dilated_conv1d(x, torch.randn(2, 3), backend="cuda")
    from fastlayers import _backend
    with pytest.raises(RuntimeError, match="FASTLAYERS_BUILD_CUDA=1"):
        _backend.choose("dilated_conv1d", torch.device("cuda"), backend="cuda", cuda_op="dilated_conv1d_fwd_cuda")


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck(backend, device):
    x = torch.randn(2, 5, 19, device=device, requires_grad=True)
    w = torch.randn(5, 3, device=device, requires_grad=True)
    b = torch.randn(5, device=device, requires_grad=True)
    s = torch.randn(2, 5, 4, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastlayers.dilated_conv1d.default, (x, w, b, s, 2, True, True, True, backend))
    torch.library.opcheck(torch.ops.fastlayers.dilated_conv1d.default, (x, w, None, None, 3, False, False, False,
                                                                         backend))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend, device):
    m = TemporalConvNet(6, num_layers=2, kernel_size=3).to(device)
    x = torch.randn(2, 6, 33, device=device, requires_grad=True)
    with fastlayers.use_backend("triton"):
        eager = m(x)
        g_eager = torch.autograd.grad(eager.sum(), [x, m.convs[0].weight])
        compiled = torch.compile(m, fullgraph=True, backend=compile_backend)
        out = compiled(x)
        g = torch.autograd.grad(out.sum(), [x, m.convs[0].weight])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ modules

def test_dilated_conv1d_module_loads_conv1d_checkpoint(device):
    conv = torch.nn.Conv1d(8, 8, 3, groups=8, dilation=4, padding="same")
    m = DilatedConv1d(8, 3, dilation=4, causal=False)
    m.load_state_dict(conv.state_dict())
    x = torch.randn(2, 8, 40)
    torch.testing.assert_close(m(x), conv(x), rtol=1e-5, atol=1e-5)
    assert set(m.state_dict()) == {"weight", "bias"}
    m2 = DilatedConv1d.from_conv1d(conv, causal=False)
    assert m2.weight is conv.weight
    torch.testing.assert_close(m2(x), conv(x), rtol=1e-5, atol=1e-5)


def test_causal_conv1d_matches_mamba_conv(device):
    d_inner, d_conv = 12, 4
    mamba_conv = torch.nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
    ours = CausalConv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
    ours.load_state_dict(mamba_conv.state_dict())
    assert isinstance(ours, torch.nn.Conv1d)
    x = torch.randn(2, d_inner, 25)
    expected = mamba_conv(x)[..., :25]
    with fastlayers.use_backend("triton"):
        torch.testing.assert_close(ours(x)[..., :25], expected, rtol=1e-5, atol=1e-5)
        fused = CausalConv1d.from_conv1d(mamba_conv, activation="silu")
        torch.testing.assert_close(fused(x), F.silu(expected), rtol=1e-5, atol=1e-5)
    state = torch.zeros(2, d_inner, d_conv - 1)
    for t in range(25):
        y_t, state = ours.step(x[:, :, t], state)
        torch.testing.assert_close(y_t, expected[:, :, t], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="depthwise"):
        CausalConv1d(4, 8, 3, groups=4)
    with pytest.raises(ValueError, match="zero padding"):
        CausalConv1d(4, 4, 3, padding=1)


@pytest.mark.parametrize("norm", ["layer", None])
def test_temporal_conv_net_streaming(norm, device):
    m = TemporalConvNet(5, num_layers=3, kernel_size=3, dilation_base=2, norm=norm).to(device).eval()
    assert m.receptive_field == 1 + 2 * (1 + 2 + 4)
    x = torch.randn(2, 5, 50, device=device)
    with fastlayers.use_backend("triton"):
        whole = m(x)
        a, states = m(x[:, :, :17], return_states=True)
        b, _ = m(x[:, :, 17:], states, return_states=True)
    torch.testing.assert_close(torch.cat([a, b], 2), whole, rtol=1e-5, atol=1e-5)
    # causal: the first outputs do not depend on later inputs
    x2 = x.clone()
    x2[:, :, 30:] = 0
    torch.testing.assert_close(m(x2)[:, :, :30], whole[:, :, :30], rtol=1e-5, atol=1e-5)


def test_temporal_conv_net_trains(device):
    m = TemporalConvNet(4, num_layers=2, norm="batch").to(device)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(3, 4, 20, device=device)
    target = torch.randn(3, 4, 20, device=device)
    losses = []
    for _ in range(5):
        loss = F.mse_loss(m(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------------ GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_cuda_matches_reference(shape, dtype):
    B, C, L, K, d = shape
    act = "silu" if (B + K) % 2 else None
    inputs = _inputs(B, C, L, K, d, dtype, "cuda")
    kw = {"dilation": d, "causal": True, "activation": act, "return_final_state": True}
    check(functools.partial(fastlayers.dilated_conv1d, backend="cuda"), R.dilated_conv1d, inputs, kw,
          ("y", "final_state"), f"cuda {shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_more_than_2_31_elements(backend):
    """B*C*L > 2**31: element offsets overflow int32 unless the index math is 64-bit."""
    B, C, L = 2, 8192, 131073
    x = torch.randn(B, C, L, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(C, 4, device="cuda", dtype=torch.bfloat16)
    y = fastlayers.dilated_conv1d(x, w, None, 1, True, None, backend=backend)
    ref = R.dilated_conv1d(x[-1:, -3:], w[-3:], None, 1)  # the last rows: offsets past 2**31
    torch.testing.assert_close(y[-1:, -3:].float(), ref.float(), rtol=2e-2, atol=2e-2)
