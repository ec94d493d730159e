"""fastlayers.linear_attention: Triton (interpreted on CPU) against the reference, gradients and states included;
odd sizes and chunk boundaries, split sequences, decoding steps, SLAB's module, errors, torch.compile, opcheck."""
import functools

import pytest
import torch
import torch.nn.functional as F

import fastlayers
from fastlayers import reference as R
from fastlayers.nn import SimplifiedLinearAttention

from .conftest import KERNEL_DTYPES
from .helpers import check, rand

triton_la = functools.partial(fastlayers.linear_attention, backend="triton")

# (B, H, N, Dk, Dv): odd, prime and smaller-than-a-block sizes; N across chunk boundaries (chunks of 16..64);
# Dk, Dv above 64 (several blocks: partial sums over DK and DV)
SHAPES = [
    (2, 2, 63, 24, 40),
    (1, 3, 197, 32, 32),
    (2, 1, 1, 16, 8),
    (1, 2, 7, 40, 24),
    (1, 1, 70, 72, 130),
]
IDS = [f"B{b}H{h}N{n}Dk{dk}Dv{dv}" for b, h, n, dk, dv in SHAPES]
# (feature_map, normalize) combinations, cycled over the shapes
VARIANTS = [("relu", True), ("elu1", False), (None, False), ("elu1", True), ("relu", False)]


def _qkv(B, H, N, DK, DV, dtype, device):
    return {"q": rand(B, H, N, DK, dtype=dtype, device=device), "k": rand(B, H, N, DK, dtype=dtype, device=device),
            "v": rand(B, H, N, DV, dtype=dtype, device=device)}


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("i", range(len(SHAPES)), ids=IDS)
def test_triton_noncausal_matches_reference(i, dtype, device):
    fmap, norm = VARIANTS[i]
    kw = {"causal": False, "feature_map": fmap, "normalize": norm}
    check(triton_la, R.linear_attention, _qkv(*SHAPES[i], dtype, device), kw, ("o",), f"{SHAPES[i]} {kw}")


def _causal_ref(q, k, v, s0=None, z0=None, **kw):
    init = None if s0 is None else ((s0, z0) if kw["normalize"] else s0)
    out = R.linear_attention(q, k, v, initial_state=init, **kw)
    return _flat_state(out, kw)


def _causal_triton(q, k, v, s0=None, z0=None, **kw):
    init = None if s0 is None else ((s0, z0) if kw["normalize"] else s0)
    return _flat_state(triton_la(q, k, v, initial_state=init, **kw), kw)


def _flat_state(out, kw):
    if not kw.get("return_final_state"):
        return out
    o, st = out
    return (o, *st) if kw["normalize"] else (o, st)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("i", range(len(SHAPES)), ids=IDS)
def test_triton_causal_matches_reference(i, dtype, device):
    B, H, N, DK, DV = SHAPES[i]
    fmap, norm = VARIANTS[i]
    with_state = i % 2 == 0
    inputs = _qkv(B, H, N, DK, DV, dtype, device)
    if with_state:
        inputs["s0"] = rand(B, H, DK, DV, dtype=torch.float32, device=device)
        if norm:  # a positive running normaliser, as a previous chunk's Σφ(k) would be
            inputs["z0"] = (torch.rand(B, H, DK, device=device) * 3 + 1).requires_grad_()
    kw = {"causal": True, "feature_map": fmap, "normalize": norm, "return_final_state": with_state}
    names = ("o", "S", "z") if with_state and norm else (("o", "S") if with_state else ("o",))
    check(_causal_triton, _causal_ref, inputs, kw, names, f"{SHAPES[i]} {kw}")


def test_reference_noncausal_is_slab_formula():
    """SLAB's formula: z = 1 / (q·Σk + 1e-6); x = q (kᵀv) z with ReLU kernels, and its N² branch."""
    q, k, v = (torch.randn(3, 2, 50, 16, dtype=torch.float64) for _ in range(3))
    qf, kf = F.relu(q), F.relu(k)
    z = 1 / (torch.einsum("bhic,bhc->bhi", qf, kf.sum(2)) + 1e-6)
    slab = torch.einsum("bhic,bhcd,bhi->bhid", qf, torch.einsum("bhjc,bhjd->bhcd", kf, v), z)
    quadratic = torch.einsum("bhij,bhjd,bhi->bhid", qf @ kf.transpose(-1, -2), v, z)
    ours = R.linear_attention(q, k, v)
    torch.testing.assert_close(ours, slab)
    torch.testing.assert_close(ours, quadratic)


def test_reference_causal_is_the_recurrence():
    """The quadratic masked form equals the running sums S_n = S_{n-1} + φk_nᵀ v_n, z_n = z_{n-1} + φk_n."""
    B, H, N, DK, DV = 2, 2, 9, 5, 3
    q, k, v = torch.randn(B, H, N, DK, dtype=torch.float64), torch.randn(B, H, N, DK, dtype=torch.float64), \
        torch.randn(B, H, N, DV, dtype=torch.float64)
    S, z = torch.randn(B, H, DK, DV, dtype=torch.float64), torch.rand(B, H, DK, dtype=torch.float64)
    o, (S_N, z_N) = R.linear_attention(q, k, v, True, "elu1", True, 1e-6, (S, z), True)
    for n in range(N):
        kn = F.elu(k[:, :, n]) + 1
        S = S + kn[..., None] * v[:, :, n, None, :]
        z = z + kn
        qn = F.elu(q[:, :, n]) + 1
        expected = (qn[:, :, None, :] @ S)[:, :, 0] / ((qn * z).sum(-1, keepdim=True) + 1e-6)
        torch.testing.assert_close(o[:, :, n], expected)
    torch.testing.assert_close(S_N, S)
    torch.testing.assert_close(z_N, z)


def test_gradcheck_reference_fp64():
    B, H, N, DK, DV = 1, 2, 6, 3, 4
    t = [torch.randn(*s, dtype=torch.float64, requires_grad=True)
         for s in ((B, H, N, DK), (B, H, N, DK), (B, H, N, DV), (B, H, DK, DV))]
    z0 = (torch.rand(B, H, DK, dtype=torch.float64) + 1).requires_grad_()

    def f(q, k, v, s, z):
        o, (S, zz) = fastlayers.linear_attention(q, k, v, causal=True, feature_map="elu1", initial_state=(s, z),
                                                 return_final_state=True, backend="reference")
        return o, S, zz
    assert torch.autograd.gradcheck(f, (*t, z0))


@pytest.mark.parametrize("normalize", [True, False])
def test_split_sequence_equals_whole(normalize, device):
    """Causal chunks of 5, 32 and 33 tokens with the state carried equal one pass (chunk boundaries of the kernel
    fall inside the pieces); the gradients through the carried state equal the whole pass's."""
    B, H, N, DK, DV = 1, 2, 70, 24, 16
    q, k, v = (rand(B, H, N, d, device=device) for d in (DK, DK, DV))
    kw = {"causal": True, "feature_map": "relu", "normalize": normalize, "backend": "triton"}
    whole, whole_state = fastlayers.linear_attention(q, k, v, return_final_state=True, **kw)
    state, outs = None, []
    for lo, hi in ((0, 5), (5, 37), (37, N)):
        o, state = fastlayers.linear_attention(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], initial_state=state,
                                               return_final_state=True, **kw)
        outs.append(o)
    pieces = torch.cat(outs, 2)
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-5)
    for a, b in zip(state if normalize else (state,), whole_state if normalize else (whole_state,)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(whole)
    g_whole = torch.autograd.grad(whole, (q, k, v), g)
    g_pieces = torch.autograd.grad(pieces, (q, k, v), g)
    for a, b in zip(g_pieces, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_steps_equal_whole(normalize, device):
    B, H, N, DK, DV = 2, 3, 20, 8, 6
    q, k, v = torch.randn(B, H, N, DK), torch.randn(B, H, N, DK), torch.randn(B, H, N, DV)
    kw = {"feature_map": "elu1", "normalize": normalize}
    whole = fastlayers.linear_attention(q, k, v, causal=True, backend="triton", **kw)
    _, state = fastlayers.linear_attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], causal=True,
                                           return_final_state=True, backend="triton", **kw)
    saved = [t.clone() for t in (state if normalize else (state,))]
    for n in range(8, N):
        o_n, new = fastlayers.linear_attention_step(q[:, :, n], k[:, :, n], v[:, :, n], state, **kw)
        torch.testing.assert_close(o_n, whole[:, :, n], rtol=1e-5, atol=1e-5)
        if n == 8:  # the caller's state is not modified
            for a, b in zip(state if normalize else (state,), saved):
                assert torch.equal(a, b)
        state = new


def test_backward_is_deterministic(device):
    B, H, N, DK, DV = 1, 2, 100, 72, 80  # several DK / DV blocks and N splits: partial sums
    for causal in (False, True):
        inputs = _qkv(B, H, N, DK, DV, torch.float16, device)
        grads = []
        for _ in range(2):
            o = triton_la(**inputs, causal=causal)
            grads.append(torch.autograd.grad((o * 1.5).sum(), list(inputs.values())))
        for g1, g2 in zip(*grads):
            assert torch.equal(g1, g2)


@pytest.mark.parametrize("shape", [(0, 2, 5, 4, 4), (2, 0, 5, 4, 4), (2, 2, 0, 4, 4)])
def test_zero_size(shape, device):
    B, H, N, DK, DV = shape
    q, k, v = (torch.randn(B, H, N, d, device=device, requires_grad=True) for d in (DK, DK, DV))
    o = triton_la(q, k, v)
    assert o.shape == (B, H, N, DV)
    s0 = torch.randn(B, H, DK, DV, device=device, requires_grad=True)
    o, S = triton_la(q, k, v, causal=True, normalize=False, initial_state=s0, return_final_state=True)
    if N == 0:
        torch.testing.assert_close(S, s0.detach())
    (o.sum() + S.sum()).backward()
    assert q.grad.shape == q.shape and s0.grad.shape == s0.shape


def test_nan_propagates_like_reference(device):
    """A NaN key reaches the outputs that attend to it (causal: later positions only), no other head."""
    q, k, v = torch.randn(1, 2, 70, 8), torch.randn(1, 2, 70, 8), torch.randn(1, 2, 70, 8)
    k[0, 1, 37, 3] = float("nan")
    for causal in (False, True):
        o = triton_la(q, k, v, causal=causal, feature_map="elu1")
        ref = R.linear_attention(q, k, v, causal, "elu1")
        assert torch.equal(torch.isnan(o), torch.isnan(ref)), causal
        assert not torch.isnan(o[0, 0]).any() and torch.isnan(o[0, 1, 37:]).all()
        assert torch.isnan(o[0, 1, :37]).any() != causal


def test_inputs_not_mutated(device):
    inputs = _qkv(2, 2, 30, 8, 8, torch.float32, device)
    s0 = torch.randn(2, 2, 8, 8, requires_grad=True)
    z0 = torch.rand(2, 2, 8, requires_grad=True)
    before = [t.detach().clone() for t in (*inputs.values(), s0, z0)]
    o, (S, z) = triton_la(**inputs, causal=True, initial_state=(s0, z0), return_final_state=True)
    (o.sum() + S.sum() + z.sum()).backward()
    for t, b in zip((*inputs.values(), s0, z0), before):
        assert torch.equal(t.detach(), b)


def test_noncontiguous_inputs(device):
    base = torch.randn(2, 30, 3, 16, device=device)  # [B, N, H, D] viewed as [B, H, N, D]
    q = k = v = base.transpose(1, 2)
    torch.testing.assert_close(triton_la(q, k, v), R.linear_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_large_head_dims_fall_back_or_refuse():
    q = torch.randn(1, 1, 4, 300)
    v = torch.randn(1, 1, 4, 8)
    torch.testing.assert_close(fastlayers.linear_attention(q, q, v), R.linear_attention(q, q, v))  # auto: reference
    with pytest.raises(NotImplementedError, match="at most 256"):
        triton_la(q, q, v)


@pytest.mark.parametrize("call, exc, match", [
    (lambda q, v: fastlayers.linear_attention(q[0], q[0], v[0]), ValueError, "`q` must have 4 dimensions"),
    (lambda q, v: fastlayers.linear_attention(q, q[:, :, :3], v), ValueError, "`k` must have shape"),
    (lambda q, v: fastlayers.linear_attention(q, q, v[:, :, :3]), ValueError, "`v` must have shape"),
    (lambda q, v: fastlayers.linear_attention(q, q, v.half()), TypeError, "`v` has dtype"),
    (lambda q, v: fastlayers.linear_attention(q, q.to("meta"), v), ValueError, "`k` is on meta"),
    (lambda q, v: fastlayers.linear_attention(q.int(), q.int(), v), TypeError, "`q` must have dtype"),
    (lambda q, v: fastlayers.linear_attention(q, q, v, feature_map="gelu"), ValueError, "`feature_map` must be"),
    (lambda q, v: fastlayers.linear_attention(q, q, v, eps=-1.0), ValueError, "`eps` must be a number >= 0"),
    (lambda q, v: fastlayers.linear_attention(q, q, v, causal=1), TypeError, "`causal` must be a bool"),
    (lambda q, v: fastlayers.linear_attention(q, q, v, return_final_state=True), ValueError,
     "only defined for causal=True"),
    (lambda q, v: fastlayers.linear_attention(q, q, v, causal=True, initial_state=torch.zeros(2, 3, 4, 5)),
     TypeError, "must be a tuple"),
    (lambda q, v: fastlayers.linear_attention(q, q, v, causal=True, normalize=False,
                                              initial_state=torch.zeros(2, 3, 5, 4)), ValueError,
     r"`initial_state` must have shape \(2, 3, 4, 5\)"),
    (lambda q, v: fastlayers.linear_attention(q, q, v, causal=True,
                                              initial_state=(torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 5))),
     ValueError, r"`initial_state\[1\] \(z\)` must have shape \(2, 3, 4\)"),
    (lambda q, v: fastlayers.linear_attention(q, q, v, backend="cuda"), ValueError, "needs CUDA tensors"),
    (lambda q, v: fastlayers.linear_attention(q.double(), q.double(), v.double(), backend="triton"), ValueError,
     "float64 runs only on the reference"),
    (lambda q, v: fastlayers.linear_attention_step(q[:, :, 0], q[:, :, 0], v[:, :, 0], torch.zeros(2, 3, 4, 5)),
     TypeError, "must be a tuple"),
])
def test_bad_input_raises(call, exc, match):
    q, v = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 5)
    with pytest.raises(exc, match=match):
        call(q, v)


def test_opcheck(device):
    q, k = (torch.randn(1, 2, 19, 8, dtype=torch.float16, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 19, 12, dtype=torch.float16, requires_grad=True)
    s0, z0 = torch.randn(1, 2, 8, 12, requires_grad=True), torch.rand(1, 2, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.fastlayers.linear_attention_global.default, (q, k, v, 1, True, 1e-6))
    torch.library.opcheck(torch.ops.fastlayers.linear_attention_chunk.default,
                          (q, k, v, None, s0, z0, 2, True, 1e-6, False, True))


def test_torch_compile_fullgraph(device):
    m = SimplifiedLinearAttention(16, 4, 2, kernel_size=3).to(device)
    x = torch.randn(3, 16, 16, device=device, requires_grad=True)
    with fastlayers.use_backend("triton"):
        eager = m(x)
        g_eager = torch.autograd.grad(eager.sum(), [x, m.qkv.weight])
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        g = torch.autograd.grad(out.sum(), [x, m.qkv.weight])

        def causal(q, k, v, s):
            o, st = fastlayers.linear_attention(q, k, v, causal=True, normalize=False, initial_state=s,
                                                return_final_state=True)
            return o.sum() + st.sum()
        args = [torch.randn(1, 2, 20, 8, device=device) for _ in range(3)] + [torch.randn(1, 2, 8, 8)]
        torch.testing.assert_close(torch.compile(causal, fullgraph=True, backend="aot_eager")(*args), causal(*args))
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ SLAB's module

class _SlabSLA(torch.nn.Module):
    """SLAB's SLA written from the paper's formula, with SLAB's parameter names (the module users run)."""

    def __init__(self, dim, window_size, num_heads, kernel_size=5):
        super().__init__()
        self.num_heads, self.window_size = num_heads, window_size
        self.qkv = torch.nn.Linear(dim, dim * 3)
        self.proj = torch.nn.Linear(dim, dim)
        hd = dim // num_heads
        self.dwc = torch.nn.Conv2d(hd, hd, kernel_size, groups=hd, padding=kernel_size // 2)
        self.positional_encoding = torch.nn.Parameter(torch.randn(1, window_size * window_size, dim))

    def forward(self, x):
        B, N, C = x.shape
        h, d = self.num_heads, C // self.num_heads
        q, k, v = self.qkv(x).reshape(B, N, 3, C).permute(2, 0, 1, 3)
        k = k + self.positional_encoding
        q, k = F.relu(q), F.relu(k)
        q, k, v = (t.reshape(B, N, h, d).permute(0, 2, 1, 3).reshape(B * h, N, d) for t in (q, k, v))
        z = 1 / (q @ k.sum(1)[:, :, None] + 1e-6)
        out = (q @ (k.transpose(1, 2) @ v)) * z
        w = self.window_size
        out = out + self.dwc(v.transpose(1, 2).reshape(B * h, d, w, w)).reshape(B * h, d, N).transpose(1, 2)
        out = out.reshape(B, h, N, d).permute(0, 2, 1, 3).reshape(B, N, C)
        return self.proj(out)


def test_sla_module_matches_slab_formula_and_loads_its_state_dict(device):
    slab = _SlabSLA(32, 4, 4, kernel_size=3).to(device)
    ours = SimplifiedLinearAttention(32, 4, 4, kernel_size=3).to(device)
    ours.load_state_dict(slab.state_dict())
    assert set(ours.state_dict()) == set(slab.state_dict())
    x = torch.randn(5, 16, 32, device=device)
    expected = slab(x)
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
    with fastlayers.use_backend("triton"):
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
    converted = SimplifiedLinearAttention.from_module(slab_like(slab))
    assert converted.qkv is slab.qkv
    torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-5)


def slab_like(m):
    """Attach the attributes SLAB's module carries, so from_module / accelerate can read them."""
    m.dim, m.focusing_factor = m.qkv.in_features, 3
    m.attn_drop, m.proj_drop = torch.nn.Dropout(0.0), torch.nn.Dropout(0.0)
    return m


def test_accelerate_replaces_slab_module(device):
    SimplifiedLinearAttention_ = type("SimplifiedLinearAttention", (_SlabSLA,), {})  # SLAB's class name
    model = torch.nn.Sequential(slab_like(SimplifiedLinearAttention_(16, 4, 2, kernel_size=3))).to(device)
    x = torch.randn(2, 16, 16, device=device)
    expected = model(x)
    report = fastlayers.accelerate(model)
    assert isinstance(model[0], SimplifiedLinearAttention), report
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_sla_in_a_timm_swin_block(device):
    """SLA as the window attention of timm's (shifted) Swin block: same call, trains."""
    from timm.models.swin_transformer import SwinTransformerBlock
    block = SwinTransformerBlock(32, (8, 8), num_heads=2, window_size=4, shift_size=2).to(device)
    block.attn = SimplifiedLinearAttention(32, 4, 2).to(device)
    x = torch.randn(2, 8, 8, 32, device=device, requires_grad=True)
    with fastlayers.use_backend("triton"):
        y = block(x)
        y.square().mean().backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all()
    assert block.attn.positional_encoding.grad is not None


# ------------------------------------------------------------------------------------------------ GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 1000, 64, 64), (1, 2, 333, 256, 256), (64, 8, 3136 // 16, 32, 32)])
def test_bf16_gpu(shape, causal):
    B, H, N, DK, DV = shape
    inputs = _qkv(B, H, N, DK, DV, torch.bfloat16, "cuda")
    check(triton_la, R.linear_attention, inputs, {"causal": causal}, ("o",), f"bf16 {shape} causal={causal}")


@pytest.mark.gpu
def test_inductor_compile_gpu():
    m = SimplifiedLinearAttention(64, 7, 2).cuda()
    x = torch.randn(8, 49, 64, device="cuda")
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x), rtol=1e-4, atol=1e-4)
