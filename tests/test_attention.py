"""fastlayers.attention: the Triton kernels (interpreted on CPU) against the reference, outputs and every gradient
(q, k, v, bias, relative-position table) over odd shapes, broadcast biases, masks, causal and chunked attention,
decay; determinism of the bias gradients; errors; opcheck and torch.compile; the modules against timm's and
fastlayers.accelerate on timm's ViT, DeiT and Swin."""
import functools

import pytest
import torch
import torch.nn.functional as F

import fastlayers
from fastlayers import reference as R
from fastlayers.nn import Attention, WindowAttention
from fastlayers.nn.attention import relative_position_index

from .conftest import KERNEL_DTYPES, ON_GPU
from .helpers import check, rand

triton_attention = functools.partial(fastlayers.attention, backend="triton")

# (B, H, N, M, D): one query, odd/prime sizes, N != M both ways, non-power-of-two head dims, ViT's N = 197
SHAPES = [
    (2, 2, 1, 1, 16),
    (1, 3, 7, 7, 24),
    (2, 2, 63, 50, 40),
    (1, 2, 17, 33, 80),
    (1, 1, 9, 20, 96),
    (1, 2, 197, 197, 64),
]
IDS = [f"B{b}H{h}N{n}M{m}D{d}" for b, h, n, m, d in SHAPES]


def _qkv(B, H, N, M, D, dtype, device, grad=True):
    return {"q": rand(B, H, N, D, dtype=dtype, device=device, grad=grad),
            "k": rand(B, H, M, D, dtype=dtype, device=device, grad=grad),
            "v": rand(B, H, M, D, dtype=dtype, device=device, grad=grad)}


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_triton_matches_reference(shape, dtype, device):
    check(triton_attention, R.attention, _qkv(*shape, dtype, device), {}, ("out",), f"{shape}")


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if ON_GPU else []), ids=str)
def test_head_dim_256(dtype, device):
    check(triton_attention, R.attention, _qkv(1, 2, 11, 13, 256, dtype, device), {"scale": 0.1}, ("out",))


# bias shapes broadcastable to [B=3, H=2, N=19, M=23]; (..., N, 1) is left out: softmax ignores a per-query
# constant, whose true gradient is 0 (its relative error is meaningless)
BIAS_SHAPES = [(3, 2, 19, 23), (1, 2, 19, 23), (2, 19, 23), (3, 1, 19, 23), (3, 1, 1, 23), (19, 23), (1, 1, 1, 23)]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("bias_shape", BIAS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bias_broadcast_and_gradient(bias_shape, dtype, device):
    inputs = _qkv(3, 2, 19, 23, 16, dtype, device)
    inputs["bias"] = rand(*bias_shape, dtype=dtype, device=device)
    check(triton_attention, R.attention, inputs, {}, ("out",), f"bias {bias_shape}")


def test_fp32_bias_with_fp16_inputs(device):
    inputs = _qkv(2, 3, 21, 21, 32, torch.float16, device)
    bias = rand(1, 3, 21, 21, device=device)  # fp32 parameter, fp16 activations (autocast)
    out = triton_attention(**inputs, bias=bias)
    ref = R.attention(**inputs, bias=bias)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    g, g_ref = (torch.autograd.grad(o.float().sum(), bias)[0] for o in (out, ref))
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, g_ref, rtol=1e-2, atol=1e-3)


# (N, M, causal, chunk, padding): top-left causal with N > M and N < M, chunks, padded keys, combinations
MASKS = [
    (29, 29, True, None, False),
    (29, 17, True, None, False),
    (13, 40, True, None, False),
    (37, 37, False, 8, False),
    (37, 37, True, 5, False),
    (23, 41, False, 6, False),
    (26, 31, False, None, True),
    (33, 33, True, 16, True),
]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: f"N{m[0]}M{m[1]}{'c' if m[2] else ''}k{m[3]}{'p' if m[4] else ''}")
def test_masks(mask, dtype, device):
    N, M, causal, chunk, padding = mask
    inputs = _qkv(2, 2, N, M, 24, dtype, device)
    inputs["bias"] = rand(1, 2, N, M, dtype=dtype, device=device)
    kpm = (torch.rand(2, M) < 0.3).to(device) if padding else None
    check(triton_attention, R.attention, inputs,
          {"causal": causal, "chunk_size": chunk, "key_padding_mask": kpm}, ("out",), f"{mask}")


def test_fully_masked_rows_give_zeros(device):
    B, H, N, M, D = 2, 2, 9, 12, 16
    inputs = _qkv(B, H, N, M, D, torch.float32, device)
    bias = rand(1, H, N, M, device=device)
    kpm = torch.zeros(B, M, dtype=torch.bool, device=device)
    kpm[1] = True  # every key of batch 1 is padding
    for fn in (triton_attention, R.attention):
        out = fn(**inputs, bias=bias, key_padding_mask=kpm)
        assert torch.isfinite(out).all() and (out[1] == 0).all()
        grads = torch.autograd.grad(out.sum(), [inputs["q"], inputs["k"], inputs["v"], bias])
        assert all(torch.isfinite(g).all() for g in grads)
        assert (grads[0][1] == 0).all() and (grads[1][1] == 0).all() and (grads[2][1] == 0).all()
    # causal with N > M: queries past... all see key 0; chunks past the last key see nothing
    q, k, v = inputs["q"][:, :, :9], inputs["k"][:, :, :4], inputs["v"][:, :, :4]
    out = triton_attention(q, k, v, chunk_size=4)
    assert (out[:, :, 4:] == 0).all() and torch.isfinite(out).all()
    torch.testing.assert_close(out, R.attention(q, k, v, chunk_size=4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("window, heads, with_bias, index_dtype", [
    ((4, 4), 3, False, torch.int64),
    ((3, 5), 2, True, torch.int32),
], ids=["swin4x4", "win3x5+bias"])
def test_rel_pos_table_and_gradient(window, heads, with_bias, index_dtype, dtype, device):
    wh, ww = window
    N = wh * ww
    index = relative_position_index(wh, ww).to(device=device, dtype=index_dtype)
    T = (2 * wh - 1) * (2 * ww - 1)
    inputs = _qkv(3, heads, N, N, 16, dtype, device)
    inputs["table"] = rand(T, heads, dtype=dtype, device=device)
    if with_bias:
        inputs["bias"] = rand(1, heads, N, N, dtype=dtype, device=device)

    def fn(table, be=None, **kw):
        return fastlayers.attention(**kw, rel_pos=(table, index), backend=be)

    check(functools.partial(fn, be="triton"), fn, inputs, {}, ("out",), f"rel_pos {window}")


def test_rel_pos_equals_timm_swin_bias():
    from timm.models.swin_transformer import get_relative_position_index
    assert torch.equal(relative_position_index(3, 5), get_relative_position_index(3, 5))
    table, index = torch.randn(45, 2, dtype=torch.float64), relative_position_index(3, 5)
    q, k, v = (torch.randn(1, 2, 15, 8, dtype=torch.float64) for _ in range(3))
    explicit = table[index.reshape(-1)].reshape(15, 15, 2).permute(2, 0, 1)
    torch.testing.assert_close(R.attention(q, k, v, rel_pos=(table, index)), R.attention(q, k, v, explicit))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("grid, causal", [((3, 4), False), ((5, 3), True)], ids=["3x4", "5x3causal"])
def test_decay(grid, causal, dtype, device):
    n = grid[0] * grid[1]
    gamma = (1 - 2.0 ** (-5 - torch.arange(3, dtype=torch.float32))).to(device)  # RetNet's per-head decay
    inputs = _qkv(2, 3, n, n, 16, dtype, device)
    check(triton_attention, R.attention, inputs, {"decay": (gamma, grid), "causal": causal}, ("out",), f"{grid}")


def test_reference_decay_is_manhattan_distance():
    gamma = torch.tensor([0.5, 0.9], dtype=torch.float64)
    bias = R.decay_bias(gamma, (2, 3), torch.float64)
    # token 0 = (0, 0), token 5 = (1, 2): distance 3
    assert bias.shape == (2, 6, 6)
    torch.testing.assert_close(bias[:, 0, 5], 3 * gamma.log())
    torch.testing.assert_close(bias[:, 4, 1], 1 * gamma.log())  # (1, 1) -> (0, 1)


def test_reference_equals_sdpa():
    q, k, v = (torch.randn(2, 3, 11, 8, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(1, 3, 11, 11, dtype=torch.float64)
    torch.testing.assert_close(R.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(R.attention(q, k, v, bias, scale=0.3),
                               F.scaled_dot_product_attention(q, k, v, bias, scale=0.3))
    torch.testing.assert_close(R.attention(q, k, v[:, :, :], causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))
    kpm = torch.rand(2, 11) < 0.3
    kpm[:, 0] = False
    torch.testing.assert_close(R.attention(q, k, v, key_padding_mask=kpm),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=~kpm[:, None, None, :]))


def test_gradcheck_reference_fp64():
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    table = torch.randn(9, 2, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 9, (5, 5))
    f = functools.partial(fastlayers.attention, causal=True, backend="reference")
    assert torch.autograd.gradcheck(lambda q, k, v, b, t: f(q, k, v, b, rel_pos=(t, index)), (q, k, v, bias, table))


def test_bias_and_table_gradients_are_deterministic(device):
    # several (b, h) pairs per program sum dS in their partial tiles; two runs must agree bit for bit
    B, H, N = 5, 2, 24
    index = relative_position_index(4, 6).to(device)
    inputs = _qkv(B, H, N, N, 16, torch.float32, device)
    bias = rand(1, H, N, N, device=device)
    table = rand(77, H, device=device)
    do = torch.randn(B, H, N, 16, device=device)
    grads = []
    for _ in range(2):
        out = triton_attention(**inputs, bias=bias, rel_pos=(table, index))
        grads.append(torch.autograd.grad(out, [bias, table, inputs["q"]], do))
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)


def test_qkv_views_are_read_in_place(device):
    """timm's q, k, v are strided views of one qkv tensor; the output is laid out [B, N, H, D]."""
    B, N, H, D = 2, 13, 3, 16
    qkv = torch.randn(B, N, 3, H, D, device=device).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    out = triton_attention(q, k, v)
    torch.testing.assert_close(out, R.attention(q, k, v), rtol=1e-5, atol=1e-5)
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("shape", [(0, 2, 5, 5, 16), (2, 2, 0, 5, 16), (2, 2, 5, 0, 16)], ids=["B0", "N0", "M0"])
def test_zero_size(shape, device):
    B, H, N, M, D = shape
    inputs = _qkv(B, H, N, M, D, torch.float32, device)
    bias = rand(1, H, N, M, device=device)
    out = triton_attention(**inputs, bias=bias)
    assert out.shape == (B, H, N, D) and (out == 0).all()
    grads = torch.autograd.grad(out.sum(), [*inputs.values(), bias])
    assert all(g.shape == t.shape and (g == 0).all() for g, t in zip(grads, [*inputs.values(), bias]))


def test_nan_propagates_like_reference(device):
    inputs = _qkv(1, 2, 10, 12, 16, torch.float32, device, grad=False)
    inputs["q"][0, 0, 3, 5] = float("nan")  # one query row of head 0
    inputs["v"][0, 1, 7, 2] = float("nan")  # one value of head 1: every query of head 1, column 2
    out = triton_attention(**inputs)
    ref = R.attention(**inputs)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(out[0, 0, 3]).all() and torch.isnan(out[0, 1, :, 2]).all() and not torch.isnan(out[0, 0, 4]).any()


def test_inputs_not_mutated(device):
    inputs = _qkv(2, 2, 9, 11, 16, torch.float32, device)
    inputs["bias"] = rand(2, 1, 9, 11, device=device)
    table, index, gamma = rand(4, 2, device=device), torch.randint(0, 4, (9, 11), device=device), None
    before = {k: v.detach().clone() for k, v in inputs.items()}
    t_before, i_before = table.detach().clone(), index.clone()
    out = triton_attention(**inputs, rel_pos=(table, index), causal=True)
    out.sum().backward()
    for k, v in inputs.items():
        assert torch.equal(v.detach(), before[k]), k
    assert torch.equal(table.detach(), t_before) and torch.equal(index, i_before) and gamma is None


def _bad(**kw):
    q = torch.randn(2, 3, 5, 8)
    args = {"q": q, "k": torch.randn(2, 3, 6, 8), "v": torch.randn(2, 3, 6, 8)}
    args.update(kw)
    return fastlayers.attention(**args)


@pytest.mark.parametrize("kw, exc, match", [
    ({"q": torch.randn(3, 5, 8)}, ValueError, "`q` must have 4 dimensions"),
    ({"k": torch.randn(2, 3, 6, 7)}, ValueError, r"`k` and `v` must have shape \[B, H, M, D\]"),
    ({"v": torch.randn(2, 3, 7, 8)}, ValueError, r"`k` and `v` must have shape"),
    ({"k": torch.randn(2, 2, 6, 8)}, ValueError, r"`k` and `v` must have shape"),
    ({"k": torch.randn(2, 3, 6, 8).half()}, TypeError, "`k` has dtype"),
    ({"q": torch.randn(2, 3, 5, 8).int()}, TypeError, "`q` must have dtype"),
    ({"q": torch.randn(2, 3, 5, 0), "k": torch.randn(2, 3, 6, 0), "v": torch.randn(2, 3, 6, 0)}, ValueError,
     "head dim D"),
    ({"bias": torch.randn(2, 3, 5, 5)}, ValueError, "`bias` must be broadcastable"),
    ({"bias": torch.randn(1, 2, 3, 5, 6)}, ValueError, "`bias` must have 1 or 2 or 3 or 4 dimensions"),
    ({"bias": torch.randn(5, 6).half()}, TypeError, "`bias` must have dtype"),
    ({"bias": torch.randn(5, 6, device="meta")}, ValueError, "`bias` is on meta"),
    ({"causal": 1}, TypeError, "`causal` must be a bool"),
    ({"scale": "0.1"}, TypeError, "`scale` must be a float"),
    ({"chunk_size": 0}, ValueError, "`chunk_size` must be >= 1"),
    ({"key_padding_mask": torch.zeros(2, 6)}, TypeError, "`key_padding_mask` must have dtype"),
    ({"key_padding_mask": torch.zeros(2, 5, dtype=torch.bool)}, ValueError, r"`key_padding_mask` must have shape"),
    ({"rel_pos": torch.randn(4, 3)}, TypeError, "`rel_pos` must be a pair"),
    ({"rel_pos": (torch.randn(4, 2), torch.zeros(5, 6, dtype=torch.long))}, ValueError, r"table must have shape \[T, H\]"),
    ({"rel_pos": (torch.randn(4, 3), torch.zeros(5, 5, dtype=torch.long))}, ValueError, "`rel_pos index` must have shape"),
    ({"rel_pos": (torch.randn(4, 3), torch.zeros(5, 6))}, TypeError, "`rel_pos index` must have dtype"),
    ({"rel_pos": (torch.randn(4, 3), torch.full((5, 6), 4))}, ValueError, r"must lie in \[0, T\)"),
    ({"rel_pos": (torch.randn(4, 3), torch.full((5, 6), -1))}, ValueError, r"must lie in \[0, T\)"),
    ({"decay": (torch.rand(3), (2, 3))}, ValueError, "`decay` needs N == M == h\\*w"),
    ({"decay": (torch.rand(2), (1, 5))}, ValueError, r"`decay gamma` must have shape \(3,\)"),
    ({"decay": (torch.rand(3), 5)}, TypeError, "grid must be a pair"),
    ({"backend": "fast"}, ValueError, "expected one of"),
    ({"backend": "cuda"}, ValueError, "needs CUDA tensors"),
    ({"q": torch.randn(2, 3, 5, 8).double(), "k": torch.randn(2, 3, 6, 8).double(),
      "v": torch.randn(2, 3, 6, 8).double(), "backend": "triton"}, ValueError, "float64 runs only on the reference"),
    ({"q": torch.randn(1, 1, 5, 300), "k": torch.randn(1, 1, 6, 300), "v": torch.randn(1, 1, 6, 300),
      "backend": "triton"}, NotImplementedError, "head dim D = 300 > 256"),
    ({"q": torch.randn(1, 1, 5, 160), "k": torch.randn(1, 1, 6, 160), "v": torch.randn(1, 1, 6, 160),
      "backend": "triton"}, NotImplementedError, "float32 with head dim D = 160 > 128"),
])
def test_bad_input_raises(kw, exc, match):
    with pytest.raises(exc, match=match):
        _bad(**kw)


def test_opcheck(device):
    B, H, N, M, D = 2, 2, 7, 9, 16
    q = torch.randn(B, H, N, D, device=device, requires_grad=True)
    k = torch.randn(B, H, M, D, device=device, requires_grad=True)
    v = torch.randn(B, H, M, D, device=device, requires_grad=True)
    bias = torch.randn(1, H, N, M, device=device, requires_grad=True)
    table = torch.randn(5, H, device=device, requires_grad=True)
    index = torch.randint(0, 5, (N, M), device=device)
    kpm = torch.rand(B, M, device=device) < 0.3
    op = torch.ops.fastlayers.attention.default
    torch.library.opcheck(op, (q, k, v, bias, table, index, None, kpm, 0.25, True, 0, 0, "triton"))
    torch.library.opcheck(op, (q, k, v, None, None, None, None, None, 0.25, False, 3, 0, "triton"))


def test_torch_compile_fullgraph(device):
    m = Attention(32, num_heads=2, qkv_bias=True).to(device)
    x = torch.randn(2, 11, 32, device=device, requires_grad=True)
    with fastlayers.use_backend("triton"):
        eager = m(x)
        g_eager = torch.autograd.grad(eager.sum(), [x, m.qkv.weight])
        out = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
        g = torch.autograd.grad(out.sum(), [x, m.qkv.weight])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ modules

def _timm_attention(dim, heads, **kw):
    from timm.models.vision_transformer import Attention as TimmAttention
    return TimmAttention(dim, num_heads=heads, **kw)


@pytest.mark.parametrize("kw", [{"qkv_bias": True}, {"qk_norm": True, "norm_layer": torch.nn.LayerNorm}],
                         ids=["qkv_bias", "qk_norm"])
def test_attention_module_matches_timm(kw, device):
    torch.manual_seed(1)
    ref = _timm_attention(48, 3, **kw).to(device)
    ours = Attention(48, num_heads=3, **kw).to(device)
    ours.load_state_dict(ref.state_dict())
    assert set(ours.state_dict()) == set(ref.state_dict())
    x = torch.randn(2, 17, 48, device=device, requires_grad=True)
    with fastlayers.use_backend("triton"):
        out = ours(x)
        g = torch.autograd.grad(out.sum(), [x, ours.qkv.weight])
    expected = ref(x)
    g_ref = torch.autograd.grad(expected.sum(), [x, ref.qkv.weight])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    mask = torch.rand(2, 1, 17, 17, device=device) > 0.2
    mask[..., 0] = True
    with fastlayers.use_backend("triton"):
        torch.testing.assert_close(ours(x, attn_mask=mask), ref(x, attn_mask=mask), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours(x, is_causal=True), ref(x, is_causal=True), rtol=1e-4, atol=1e-5)


def test_attention_module_signature_matches_installed_timm():
    import inspect

    from timm.models.vision_transformer import Attention as TimmAttention
    theirs = inspect.signature(TimmAttention.__init__).parameters
    ours = inspect.signature(Attention.__init__).parameters
    assert set(theirs) <= set(ours), set(theirs) - set(ours)
    assert all(ours[n].default == theirs[n].default for n in theirs if n not in ("self", "norm_layer"))


def test_attention_module_under_autocast():
    """qk_norm's LayerNorm returns fp32 under autocast while v stays bf16: the module casts as SDPA would."""
    m = Attention(32, num_heads=2, qk_norm=True, norm_layer=torch.nn.LayerNorm)
    x = torch.randn(2, 7, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16), fastlayers.use_backend("reference"):
        out = m(x)
        expected = _timm_attention(32, 2, qk_norm=True, norm_layer=torch.nn.LayerNorm)
        expected.load_state_dict(m.state_dict())
        torch.testing.assert_close(out.float(), expected(x).float(), rtol=2e-2, atol=2e-2)


def _swin_mask(nW_h, nW_w, win, shift):
    """timm's shifted-window mask for a (nW_h*win) x (nW_w*win) map."""
    from timm.models.swin_transformer import window_partition
    Hh, Ww = nW_h * win, nW_w * win
    img = torch.zeros(1, Hh, Ww, 1)
    cnt = 0
    for h in ((0, -win), (-win, -shift), (-shift, None)):
        for w in ((0, -win), (-win, -shift), (-shift, None)):
            img[:, h[0]:h[1], w[0]:w[1], :] = cnt
            cnt += 1
    mw = window_partition(img, (win, win)).reshape(-1, win * win)
    m = mw[:, None, :] - mw[:, :, None]
    return m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)


@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "shifted"])
def test_window_attention_matches_timm(shifted, device):
    from timm.models.swin_transformer import WindowAttention as TimmWindowAttention
    torch.manual_seed(2)
    ref = TimmWindowAttention(32, num_heads=2, window_size=4).to(device)
    ours = WindowAttention(32, num_heads=2, window_size=4).to(device)
    ours.load_state_dict(ref.state_dict())
    assert set(ours.state_dict()) == set(ref.state_dict()) == {"relative_position_bias_table", "qkv.weight",
                                                              "qkv.bias", "proj.weight", "proj.bias"}
    assert torch.equal(ours.relative_position_index, ref.relative_position_index.cpu().to(device))
    mask = _swin_mask(2, 2, 4, 2).to(device) if shifted else None
    x = torch.randn(2 * 4, 16, 32, device=device, requires_grad=True)
    with fastlayers.use_backend("triton"):
        out = ours(x, mask)
        g = torch.autograd.grad(out.sum(), [x, ours.relative_position_bias_table, ours.qkv.weight])
    expected = ref(x, mask)
    g_ref = torch.autograd.grad(expected.sum(), [x, ref.relative_position_bias_table, ref.qkv.weight])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_modules_fall_back_to_sdpa_for_attention_dropout(device):
    m = Attention(32, num_heads=2, attn_drop=0.5).to(device).train()
    x = torch.randn(2, 5, 32, device=device)
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(0)
    assert torch.equal(a, m(x))  # dropout on, seeded
    m.eval()
    with fastlayers.use_backend("triton"):
        twin = Attention.from_timm(m)
        assert not twin.training and twin.qkv is m.qkv
        torch.testing.assert_close(twin(x), m(x))
        torch.testing.assert_close(m(x), F.scaled_dot_product_attention(
            *m.qkv(x).reshape(2, 5, 3, 2, 16).permute(2, 0, 3, 1, 4)).transpose(1, 2).reshape(2, 5, 32).matmul(
            m.proj.weight.T) + m.proj.bias, rtol=1e-5, atol=1e-5)


def _compare_models(ref, model, x, train):
    ref.train(train), model.train(train)
    torch.manual_seed(0)
    expected = ref(x)
    torch.manual_seed(0)
    out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "deit_small_patch16_224", "swin_tiny_patch4_window7_224"])
def test_accelerate_timm_models(name):
    """The full-size models on the reference backend (CPU): every attention swapped, same outputs."""
    import copy

    import timm
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, drop_path_rate=0.0).eval()
    model = copy.deepcopy(ref)
    report = fastlayers.accelerate(model)
    want = {"vit_base_patch16_224": 12, "deit_small_patch16_224": 12, "swin_tiny_patch4_window7_224": 12}[name]
    assert len(report.replaced) == want, str(report)
    new = WindowAttention if "swin" in name else Attention
    assert sum(isinstance(m, new) for m in model.modules()) == want
    assert model.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad(), fastlayers.use_backend("reference"):
        for train in (False, True):
            _compare_models(ref, model, x, train)


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_accelerate_tiny_timm_models_on_triton(kind, device):
    """Tiny ViT / Swin (shifted windows included) through the Triton kernels, train mode, outputs and grads."""
    import copy

    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    if kind == "vit":
        ref = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    else:
        ref = SwinTransformer(img_size=32, patch_size=4, embed_dim=16, depths=(2,), num_heads=(2,), window_size=4,
                              num_classes=10, drop_path_rate=0.0)  # 8x8 tokens: 4 windows, shifted in block 2
    ref = ref.to(device)
    model = copy.deepcopy(ref)
    report = fastlayers.accelerate(model)
    assert len(report.replaced) == 2, str(report)
    x = torch.randn(2, 3, 32, 32, device=device)
    with fastlayers.use_backend("triton"):
        for train in (True, False):
            _compare_models(ref, model, x, train)
        model.train(), ref.train()
        out = model(x)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    g_ref = torch.autograd.grad(ref(x).square().sum(), list(ref.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), grads, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_examples_run(device):
    from fastlayers.nn.attention import examples
    with fastlayers.use_backend("triton"):
        for label, module, args in examples(device):
            out = module(*args)
            assert out.shape == args[0].shape and torch.isfinite(out).all(), label


# ------------------------------------------------------------------------------------------------ GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_vit_shapes_bf16(D):
    B, H, N = 4, 12 if D == 64 else 16, 197 if D == 64 else 1024
    inputs = _qkv(B, H, N, N, D, torch.bfloat16, "cuda")
    inputs["bias"] = rand(1, H, N, N, dtype=torch.bfloat16, device="cuda")
    check(triton_attention, R.attention, inputs, {}, ("out",), f"D={D}")


@pytest.mark.gpu
def test_gpu_bias_gradient_deterministic_bf16():
    B, H, N, D = 16, 12, 197, 64
    inputs = _qkv(B, H, N, N, D, torch.bfloat16, "cuda")
    bias = rand(1, H, N, N, dtype=torch.bfloat16, device="cuda")
    index = relative_position_index(7, 7).to("cuda")
    table = rand(169, H, dtype=torch.bfloat16, device="cuda")
    q, k, v = inputs["q"][:, :, :49], inputs["k"][:, :, :49], inputs["v"][:, :, :49]
    runs = []
    for _ in range(3):
        out = triton_attention(**inputs, bias=bias)
        out2 = triton_attention(q, k, v, rel_pos=(table, index))
        runs.append(torch.autograd.grad(out.float().sum() + out2.float().square().sum(), [bias, table]))
    for r in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, runs[0]))


@pytest.mark.gpu
def test_gpu_more_than_2_31_elements():
    """B*H*N*D > 2**31: offsets overflow int32 unless the batch/head index math is 64-bit."""
    B, H, N, D = 8200, 16, 128, 128
    q = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
    out = triton_attention(q, q, q)
    ref = R.attention(q[-1:], q[-1:], q[-1:])
    torch.testing.assert_close(out[-1:].float(), ref.float(), rtol=2e-2, atol=2e-2)
