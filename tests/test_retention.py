"""fastlayers.retention: Triton (interpreted on CPU) against the reference, gradients and states included; chunk
boundaries, split sequences, recurrent steps, RMT's two-sided decay; RetNet's and RMT's modules against
re-implementations of their papers' code; errors, torch.compile, opcheck."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F

import fastlayers
from fastlayers import reference as R
from fastlayers.nn import ManhattanSelfAttention, MultiScaleRetention
from fastlayers.nn.retention import theta_shift

from .conftest import KERNEL_DTYPES
from .helpers import check, rand

triton_ret = functools.partial(fastlayers.retention, backend="triton")

# (B, H, N, Dk, Dv): N across chunk boundaries, odd sizes, Dk/Dv over one block
SHAPES = [
    (1, 3, 63, 24, 40),
    (1, 2, 197, 32, 16),
    (2, 2, 1, 16, 8),
    (1, 2, 37, 72, 24),
]
IDS = [f"B{b}H{h}N{n}Dk{dk}Dv{dv}" for b, h, n, dk, dv in SHAPES]


def retnet_gamma(H, device="cpu"):
    return (1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float32))).to(device)


def _gamma(H, i, device):
    """RetNet's decays, and on some shapes also γ = 1 (no decay) and fast decays."""
    g = retnet_gamma(H, device)
    if i % 2 and H > 1:
        g[0], g[-1] = 1.0, 0.5
    return g


def _inputs(B, H, N, DK, DV, dtype, device):
    # k scaled by Dk^-0.5 as RetNet does: values of the size the op sees in practice
    return {"q": rand(B, H, N, DK, dtype=dtype, device=device),
            "k": rand(B, H, N, DK, dtype=dtype, device=device, scale=DK ** -0.5),
            "v": rand(B, H, N, DV, dtype=dtype, device=device)}


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("i", range(len(SHAPES)), ids=IDS)
def test_triton_causal_matches_reference(i, dtype, device):
    B, H, N, DK, DV = SHAPES[i]
    inputs = dict(_inputs(B, H, N, DK, DV, dtype, device), gamma=_gamma(H, i, device))
    with_state = i != 2
    if with_state:
        inputs["initial_state"] = rand(B, H, DK, DV, device=device)
    kw = {"causal": True, "return_final_state": with_state}
    check(triton_ret, R.retention, inputs, kw, ("o", "S") if with_state else ("o",), f"{SHAPES[i]}")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("i", range(len(SHAPES)), ids=IDS)
def test_triton_two_sided_matches_reference(i, dtype, device):
    B, H, N, DK, DV = SHAPES[i]
    inputs = dict(_inputs(B, H, N, DK, DV, dtype, device), gamma=_gamma(H, i + 1, device))
    check(triton_ret, R.retention, inputs, {"causal": False}, ("o",), f"two-sided {SHAPES[i]}")


def test_reference_is_the_recurrence_and_the_parallel_form():
    """RetNet: S_n = γ S_{n-1} + k_nᵀ v_n, o_n = q_n S_n; parallel (Q Kᵀ ⊙ D) V, D_nm = γ^(n-m) [m<=n]."""
    B, H, N, DK, DV = 2, 3, 11, 4, 5
    q, k, v = (torch.randn(B, H, N, d, dtype=torch.float64) for d in (DK, DK, DV))
    gamma = torch.tensor([0.9, 0.5, 1.0], dtype=torch.float64)
    S0 = torch.randn(B, H, DK, DV, dtype=torch.float64)
    o, S_N = R.retention(q, k, v, gamma, True, S0, True)
    S = S0
    for n in range(N):
        S = gamma[:, None, None] * S + k[:, :, n, :, None] * v[:, :, n, None, :]
        torch.testing.assert_close(o[:, :, n], (q[:, :, n, None, :] @ S)[:, :, 0])
    torch.testing.assert_close(S_N, S)
    n = torch.arange(N)
    D = torch.where(n[:, None] >= n[None, :], gamma[:, None, None] ** (n[:, None] - n[None, :]).clamp(min=0), 0.0)
    torch.testing.assert_close(R.retention(q, k, v, gamma), ((q @ k.transpose(-1, -2)) * D) @ v)
    # two-sided (RMT's 1-D decay)
    D2 = gamma[:, None, None] ** (n[:, None] - n[None, :]).abs()
    torch.testing.assert_close(R.retention(q, k, v, gamma, causal=False), ((q @ k.transpose(-1, -2)) * D2) @ v)


def test_gamma_one_equals_causal_linear_attention(device):
    q, k, v = (torch.randn(2, 2, 70, d, device=device) for d in (16, 16, 24))
    o = triton_ret(q, k, v, torch.ones(2, device=device))
    ref = fastlayers.linear_attention(q, k, v, causal=True, feature_map=None, normalize=False, backend="triton")
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)


def test_gamma_zero_and_no_gradient(device):
    q, k, v = (torch.randn(1, 2, 40, 8, device=device, requires_grad=True) for _ in range(3))
    gamma = torch.tensor([0.0, 0.8], device=device, requires_grad=True)
    for backend in ("triton", "reference"):
        o = fastlayers.retention(q, k, v, gamma, backend=backend)
        diag = (q * k).sum(-1, keepdim=True) * v  # γ = 0: each position sees only itself
        torch.testing.assert_close(o[:, 0], diag[:, 0], rtol=1e-5, atol=1e-5)
        o.sum().backward()
        assert gamma.grad is None and torch.isfinite(q.grad).all()


def test_split_sequence_equals_whole(device):
    B, H, N, DK, DV = 2, 3, 75, 16, 24
    q, k, v = (rand(B, H, N, d, device=device) for d in (DK, DK, DV))
    gamma = retnet_gamma(H, device)
    whole, whole_state = triton_ret(q, k, v, gamma, return_final_state=True)
    state, outs = None, []
    for lo, hi in ((0, 3), (3, 40), (40, N)):
        o, state = triton_ret(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], gamma, initial_state=state,
                              return_final_state=True)
        outs.append(o)
    pieces = torch.cat(outs, 2)
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, whole_state, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(whole)
    for a, b in zip(torch.autograd.grad(pieces, (q, k, v), g), torch.autograd.grad(whole, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_steps_equal_whole(device):
    B, H, N, DK, DV = 2, 3, 24, 8, 6
    q, k, v = (torch.randn(B, H, N, d, device=device) for d in (DK, DK, DV))
    gamma = retnet_gamma(H, device)
    whole = triton_ret(q, k, v, gamma)
    state = None
    for n in range(N):
        o_n, new = fastlayers.retention_step(q[:, :, n], k[:, :, n], v[:, :, n], gamma, state)
        torch.testing.assert_close(o_n, whole[:, :, n], rtol=1e-5, atol=1e-5)
        if state is not None:
            assert new is not state
        state = new
    _, full_state = triton_ret(q, k, v, gamma, return_final_state=True)
    torch.testing.assert_close(state, full_state, rtol=1e-5, atol=1e-5)


def test_backward_is_deterministic(device):
    inputs = _inputs(1, 2, 70, 72, 80, torch.float16, device)
    gamma = retnet_gamma(2, device)
    for causal in (True, False):
        grads = []
        for _ in range(2):
            o = triton_ret(**inputs, gamma=gamma, causal=causal)
            grads.append(torch.autograd.grad((o * 1.5).sum(), list(inputs.values())))
        for g1, g2 in zip(*grads):
            assert torch.equal(g1, g2)


def test_zero_length_passes_the_state(device):
    q, k, v = (torch.randn(2, 2, 0, 4, device=device, requires_grad=True) for _ in range(3))
    s0 = torch.randn(2, 2, 4, 4, device=device, requires_grad=True)
    o, S = triton_ret(q, k, v, retnet_gamma(2, device), initial_state=s0, return_final_state=True)
    torch.testing.assert_close(S, s0.detach())
    S.sum().backward()
    torch.testing.assert_close(s0.grad, torch.ones_like(s0))


def test_nan_propagates_like_reference(device):
    q, k, v = (torch.randn(1, 2, 50, 8, device=device) for _ in range(3))
    k[0, 1, 20, 0] = float("nan")
    gamma = retnet_gamma(2, device)
    for causal in (True, False):  # a NaN key reaches the outputs that attend to it, no other head
        o = triton_ret(q, k, v, gamma, causal=causal)
        assert torch.equal(torch.isnan(o), torch.isnan(R.retention(q, k, v, gamma, causal))), causal
        assert not torch.isnan(o[0, 0]).any() and torch.isnan(o[0, 1, 20:]).all()
        assert torch.isnan(o[0, 1, :20]).any() != causal


@pytest.mark.parametrize("call, exc, match", [
    (lambda q, v, g: fastlayers.retention(q, q, v, g[:2]), ValueError, r"`gamma` must have shape \(3,\)"),
    (lambda q, v, g: fastlayers.retention(q, q, v, 0.9), TypeError, "`gamma` must be a torch.Tensor"),
    (lambda q, v, g: fastlayers.retention(q, q, v, g.to("meta")), ValueError, "`gamma` is on meta"),
    (lambda q, v, g: fastlayers.retention(q, q, v, g, causal=False, return_final_state=True), ValueError,
     "only defined for causal=True"),
    (lambda q, v, g: fastlayers.retention(q, q, v, g, initial_state=torch.zeros(2, 3, 5, 4)), ValueError,
     r"`initial_state` must have shape \(2, 3, 4, 5\)"),
    (lambda q, v, g: fastlayers.retention(q, q[..., :3], v, g), ValueError, "`k` must have shape"),
    (lambda q, v, g: fastlayers.retention_step(q[:, :, 0], q[:, :, 0], v[:, :, 0], g, torch.zeros(2, 3, 4, 4)),
     ValueError, r"`state` must have shape \(2, 3, 4, 5\)"),
])
def test_bad_input_raises(call, exc, match):
    q, v, g = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 5), retnet_gamma(3)
    with pytest.raises(exc, match=match):
        call(q, v, g)


def test_opcheck(device):
    q, k = (torch.randn(1, 2, 21, 8, dtype=torch.float16, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 21, 12, dtype=torch.float16, requires_grad=True)
    lg = torch.log2(retnet_gamma(2, device))
    s0 = torch.randn(1, 2, 8, 12, requires_grad=True)
    torch.library.opcheck(torch.ops.fastlayers.linear_attention_chunk.default,
                          (q, k, v, lg, s0, None, 0, False, 0.0, False, True))
    torch.library.opcheck(torch.ops.fastlayers.linear_attention_chunk.default,
                          (q, k, v, lg, None, None, 0, False, 0.0, True, False))


def test_torch_compile_fullgraph(device):
    m = MultiScaleRetention(16, 32, 2).to(device)
    x = torch.randn(2, 19, 16, device=device, requires_grad=True)
    with fastlayers.use_backend("triton"):
        eager = m(x)
        g_eager = torch.autograd.grad(eager.sum(), [x, m.q_proj.weight])
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        g = torch.autograd.grad(out.sum(), [x, m.q_proj.weight])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ RetNet's module

class _TorchscaleMSR(torch.nn.Module):
    """torchscale's MultiScaleRetention parallel form, re-implemented from the paper and its code: rotation, k
    scaled by Dk^-0.5, decay mask normalised by sqrt of its row sums, scores by their clamped abs row sums,
    RMSNorm per head, swish gate. Parameter names as torchscale."""

    def __init__(self, embed_dim, value_dim, num_heads, eps=1e-6):
        super().__init__()
        self.h, self.kd, self.hd, self.eps = num_heads, embed_dim // num_heads, value_dim // num_heads, eps
        self.q_proj, self.k_proj = (torch.nn.Linear(embed_dim, embed_dim, bias=False) for _ in range(2))
        self.v_proj, self.g_proj = (torch.nn.Linear(embed_dim, value_dim, bias=False) for _ in range(2))
        self.out_proj = torch.nn.Linear(value_dim, embed_dim, bias=False)
        self.group_norm = torch.nn.Identity()

    def forward(self, x):
        B, N, _ = x.shape
        angle = (1.0 / (10000 ** torch.linspace(0, 1, self.kd // 2))).repeat_interleave(2)
        idx = torch.arange(N, dtype=torch.float32)
        sin, cos = torch.sin(idx[:, None] * angle), torch.cos(idx[:, None] * angle)
        decay = torch.log(1 - 2 ** (-5 - torch.arange(self.h, dtype=torch.float32)))
        mask = torch.tril(torch.ones(N, N))
        mask = torch.masked_fill(idx[:, None] - idx[None, :], ~mask.bool(), float("inf"))
        mask = torch.nan_to_num(torch.exp(mask * decay[:, None, None]))
        mask = mask / mask.sum(-1, keepdim=True).sqrt()
        q = self.q_proj(x).view(B, N, self.h, self.kd).transpose(1, 2)
        k = (self.k_proj(x) * self.kd ** -0.5).view(B, N, self.h, self.kd).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.h, self.hd).transpose(1, 2)
        qr, kr = theta_shift(q, sin, cos), theta_shift(k, sin, cos)
        qk = (qr @ kr.transpose(-1, -2)) * mask
        qk = qk / qk.detach().sum(-1, keepdim=True).abs().clamp(min=1)
        o = (qk @ v).transpose(1, 2)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.out_proj(F.silu(self.g_proj(x)) * o.reshape(B, N, -1))


def test_multiscale_retention_matches_torchscale_form(device):
    ref = _TorchscaleMSR(32, 64, 4)
    ours = MultiScaleRetention(32, 64, 4)
    ours.load_state_dict(ref.state_dict())
    assert set(ours.state_dict()) == set(ref.state_dict())
    x = torch.randn(2, 45, 32)
    expected = ref(x)
    # row scalings before the RMS norm cancel (up to its eps): same outputs
    torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-5)
    with fastlayers.use_backend("triton"):
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-5)


def test_multiscale_retention_recurrent_decoding(device):
    m = MultiScaleRetention(16, 32, 2).to(device)
    x = torch.randn(2, 23, 16, device=device)
    with fastlayers.use_backend("triton"):
        full = m(x)
        state = {}
        prefill = m(x[:, :9], incremental_state=state)
        steps = [m(x[:, n:n + 1], incremental_state=state) for n in range(9, 23)]
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), full, rtol=1e-5, atol=1e-5)
    assert state["offset"] == 23


def test_accelerate_replaces_torchscale_msr(device):
    class RMSNorm(torch.nn.Module):  # torchscale's, without affine parameters
        def __init__(self, dim, eps):
            super().__init__()
            self.eps, self.weight = eps, None

    MSR = type("MultiScaleRetention", (_TorchscaleMSR,), {})
    ref = MSR(16, 32, 2)
    ref.embed_dim, ref.value_dim, ref.num_heads, ref.gate_fn = 16, 32, 2, F.silu
    ref.group_norm = RMSNorm(16, 1e-6)
    model = torch.nn.Sequential(ref)
    x = torch.randn(1, 12, 16)
    expected = model(x)  # (the re-implementation applies its RMS norm inline)
    report = fastlayers.accelerate(model)
    assert isinstance(model[0], MultiScaleRetention), report
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ RMT's MaSA

def _rmt_masa(m: ManhattanSelfAttention, x, decomposed: bool, kernel: str):
    """RMT's VisionRetentionAll / VisionRetentionChunk from its formulas, on m's parameters."""
    B, Hs, Ws, C = x.shape
    nh, d = m.num_heads, m.key_dim
    decay = torch.log(1 - 2 ** (-2.0 - 4.0 * torch.arange(nh, dtype=torch.float32) / nh))  # RetNetRelPos2d(2, 4)
    angle = (1.0 / (10000 ** torch.linspace(0, 1, d // 2))).repeat_interleave(2)
    idx = torch.arange(Hs * Ws, dtype=torch.float32)
    sin = torch.sin(idx[:, None] * angle).reshape(Hs, Ws, -1)
    cos = torch.cos(idx[:, None] * angle).reshape(Hs, Ws, -1)
    q, k, v = m.q_proj(x), m.k_proj(x) * d ** -0.5, m.v_proj(x)
    lepe = m.lepe.conv(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    qr = theta_shift(q.view(B, Hs, Ws, nh, d).permute(0, 3, 1, 2, 4), sin, cos)  # [B, nh, Hs, Ws, d]
    kr = theta_shift(k.view(B, Hs, Ws, nh, d).permute(0, 3, 1, 2, 4), sin, cos)
    vr = v.view(B, Hs, Ws, nh, -1).permute(0, 3, 1, 2, 4)

    def attend(q, k, v, logd):  # [.., n, d] with the additive log-decay [nh, n, n]
        s = q @ k.transpose(-1, -2)
        return (torch.softmax(s + logd, -1) if kernel == "softmax" else s * logd.exp()) @ v

    def dist1(n):
        i = torch.arange(n, dtype=torch.float32)
        return (i[:, None] - i[None, :]).abs() * decay[:, None, None]

    if not decomposed:
        grid = torch.stack(torch.meshgrid(torch.arange(Hs), torch.arange(Ws), indexing="ij"), -1).reshape(-1, 2)
        logd = (grid[:, None] - grid[None]).abs().sum(-1).float() * decay[:, None, None]
        out = attend(qr.flatten(2, 3), kr.flatten(2, 3), vr.flatten(2, 3), logd).reshape(B, nh, Hs, Ws, -1)
    else:
        w = attend(qr.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2), dist1(Ws))  # [B, Hs, nh, Ws, dv]
        out = attend(qr.permute(0, 3, 1, 2, 4), kr.permute(0, 3, 1, 2, 4), w.permute(0, 3, 2, 1, 4), dist1(Hs))
        out = out.permute(0, 2, 3, 1, 4)  # [B, nh, Hs, Ws, dv]
    out = out.permute(0, 2, 3, 1, 4).reshape(B, Hs, Ws, -1)
    return m.out_proj(out + lepe)


@pytest.mark.parametrize("decomposed", [False, True], ids=["full", "decomposed"])
@pytest.mark.parametrize("kernel", ["softmax", "retention"])
def test_manhattan_self_attention_matches_rmt_formulas(decomposed, kernel, device):
    m = ManhattanSelfAttention(16, 2, decomposed=decomposed, kernel=kernel)
    assert set(m.state_dict()) == {"q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight",
                                   "v_proj.bias", "lepe.conv.weight", "lepe.conv.bias", "out_proj.weight",
                                   "out_proj.bias"}
    x = torch.randn(1, 5, 7, 16)
    expected = _rmt_masa(m, x, decomposed, kernel)
    torch.testing.assert_close(m(x), expected, rtol=1e-4, atol=1e-5)
    with fastlayers.use_backend("triton"):
        y = m(x)
        y.sum().backward()
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(m.q_proj.weight.grad).all()


# ------------------------------------------------------------------------------------------------ GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(2, 4, 1000, 64, 64), (1, 2, 333, 128, 256)])
def test_bf16_gpu(shape, causal):
    B, H, N, DK, DV = shape
    inputs = dict(_inputs(B, H, N, DK, DV, torch.bfloat16, "cuda"), gamma=retnet_gamma(H, "cuda"))
    if causal:
        inputs["initial_state"] = rand(B, H, DK, DV, device="cuda")
    kw = {"causal": causal, "return_final_state": causal}
    check(triton_ret, R.retention, inputs, kw, ("o", "S") if causal else ("o",), f"bf16 {shape} causal={causal}")


@pytest.mark.gpu
def test_long_sequence_state_gpu():
    """RetNet's slowest decay over 16k tokens: fp32 state, no drift against the reference."""
    q, k, v = (torch.randn(1, 2, 16384, 64, device="cuda", dtype=torch.bfloat16) / 8 for _ in range(3))
    gamma = retnet_gamma(2, "cuda")
    o, S = triton_ret(q, k, v, gamma, return_final_state=True)
    _, S_ref = R.retention(q[:, :, -4096:], k[:, :, -4096:], v[:, :, -4096:], gamma, True, None, True)
    # the state forgets: γ^12288 < 1e-80 for both heads, so only the last 4096 tokens matter
    assert math.isfinite(float(o.float().abs().max()))
    torch.testing.assert_close(S, S_ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("decomposed", [False, True])
def test_manhattan_softmax_runs_the_fused_attention_decay(decomposed):
    """The softmax MaSA goes through fastlayers.attention's in-kernel decay: Triton equals the reference."""
    from fastlayers.nn import ManhattanSelfAttention
    torch.manual_seed(0)
    m = ManhattanSelfAttention(16, 2, decomposed=decomposed)
    x = torch.randn(2, 3, 5, 16, requires_grad=True)
    ref = m(x)
    g_ref = torch.autograd.grad(ref.sum(), [x, m.q_proj.weight])
    with fastlayers.use_backend("triton"):
        out = m(x)
        g = torch.autograd.grad(out.sum(), [x, m.q_proj.weight])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
