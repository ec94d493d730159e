"""fastlayers.selective_scan: Triton (interpreted on CPU) and CUDA (GPU) against the reference, every gradient
included; state chunking, decoding steps, the Mamba block (state_dict and numerics against mamba_simple's
reference path), accelerate, errors, torch.compile and opcheck."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F

import fastlayers
from fastlayers import reference as R
from fastlayers.kernels import selective_scan as K
from fastlayers.nn import Mamba
from fastlayers.nn.selective_scan import InferenceParams

from .conftest import KERNEL_DTYPES
from .helpers import check

OPTIONAL = ("D", "z", "delta_bias", "initial_state")


def _inputs(Bsz, Dm, L, N, b_kind, c_kind, dtype, device, opts=OPTIONAL, grad=True):
    """b_kind / c_kind: "fixed" [D, N], "var" [B, N, L] or an int G (grouped [B, G, N, L])."""
    g = torch.Generator().manual_seed(Bsz * 1000 + Dm * 100 + L + N)

    def t(*shape, scale=1.0, positive=False):
        x = torch.rand(*shape, generator=g) if positive else torch.randn(*shape, generator=g)
        return (x * scale).to(device=device, dtype=dtype).requires_grad_(grad)

    def bc(kind):
        return t(Dm, N) if kind == "fixed" else t(Bsz, N, L) if kind == "var" else t(Bsz, kind, N, L)
    # delta > 0 and A < 0 keep |exp(delta A)| <= 1 with or without softplus, as in Mamba
    inputs = {"u": t(Bsz, Dm, L), "delta": t(Bsz, Dm, L, scale=0.5, positive=True),
              "A": (-0.3 - torch.rand(Dm, N, generator=g)).to(device=device, dtype=dtype).requires_grad_(grad),
              "B": bc(b_kind), "C": bc(c_kind)}
    full = {"D": t(Dm), "z": t(Bsz, Dm, L), "delta_bias": t(Dm, scale=0.2, positive=True),
            "initial_state": t(Bsz, Dm, N)}
    inputs.update({k: full[k] for k in opts})
    return inputs


# (Bsz, D, L, N, B kind, C kind, optional inputs, softplus, return_last_state): every argument combination of
# the issue, odd / prime / one-step lengths, N = 1 and N larger than a tile's channels x states at T = 16
CASES = [
    (2, 6, 21, 5, "var", "var", OPTIONAL, True, True),            # Mamba's call
    (2, 8, 30, 16, 2, 2, OPTIONAL, True, True),                   # grouped B, C
    (1, 6, 20, 4, 3, "fixed", ("D", "initial_state"), False, True),
    (2, 5, 7, 3, "fixed", "fixed", ("z",), False, False),         # S4-style fixed B, C
    (1, 4, 1, 1, "fixed", "var", ("delta_bias",), True, True),    # one step, one state
    (3, 3, 19, 7, "var", "fixed", (), False, True),
    (1, 24, 33, 2, 4, "var", ("z", "initial_state"), True, False),
    (1, 12, 5, 32, "var", "var", ("D", "delta_bias"), True, True),  # several channel blocks, N = 32
    (2, 12, 10, 3, 2, 3, ("D",), True, True),                     # different group counts for B and C
]
IDS = [f"B{c[0]}D{c[1]}L{c[2]}N{c[3]}-{c[4]}-{c[5]}-{'+'.join(c[6]) or 'none'}-sp{int(c[7])}-last{int(c[8])}"
       for c in CASES]


def _check_case(case, dtype, device, backend):
    Bsz, Dm, L, N, bk, ck, opts, sp, rls = case
    inputs = _inputs(Bsz, Dm, L, N, bk, ck, dtype, device, opts)
    kw = {"delta_softplus": sp, "return_last_state": rls}
    check(functools.partial(fastlayers.selective_scan, backend=backend), R.selective_scan, inputs, kw,
          ("out", "last_state") if rls else ("out",), f"{backend} {case}")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_triton_matches_reference(case, dtype, device):
    _check_case(case, dtype, device, "triton")


def _small_tiles(monkeypatch):
    """Tiny tiles (2 channels x 4 steps), stored states every 8 steps (2 sub-chunks each) and one partial slice
    per program: the code paths of long sequences and wide models, at interpreter-friendly sizes."""
    for name, value in (("_T_MAX", 4), ("_SEG", 8), ("_TILE", {False: 32, True: 32}), ("_MAX_SLICES", 1)):
        monkeypatch.setattr(K, name, value)


def test_triton_segments_and_channel_sub_blocks(monkeypatch, device):
    _small_tiles(monkeypatch)
    assert K.checkpoint_count(21) == 3 and K.config(4, 21, 5, bwd=True)["KC"] == 2
    inputs = _inputs(2, 10, 21, 4, 2, 2, torch.float32, device)  # 3 channel blocks per group
    check(functools.partial(fastlayers.selective_scan, backend="triton"), R.selective_scan, inputs,
          {"delta_softplus": True, "return_last_state": True}, ("out", "last_state"), "segments")


def _mamba_selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba_ssm's selective_scan_ref semantics, written independently of fastlayers.reference: discretise
    everything up front, repeat grouped B/C over their channels, then loop."""
    dt = delta.double() + (delta_bias.double()[:, None] if delta_bias is not None else 0)
    dt = F.softplus(dt) if delta_softplus else dt
    Dm = u.shape[1]

    def per_channel(M):
        if M.dim() == 2:
            return M.double()[None, :, :, None]                          # [1, D, N, 1]
        if M.dim() == 3:
            return M.double()[:, None]                                   # [B, 1, N, L]
        return M.double().repeat_interleave(Dm // M.shape[1], dim=1)     # [B, D, N, L]
    dA = torch.exp(dt[:, :, None, :] * A.double()[None, :, :, None])     # [B, D, N, L]
    dBu = dt[:, :, None, :] * per_channel(B) * u.double()[:, :, None, :]
    Cc = per_channel(C)
    x = torch.zeros_like(dA[..., 0])
    ys = []
    for i in range(u.shape[2]):
        x = dA[..., i] * x + dBu[..., i]
        ys.append((x * Cc[..., min(i, Cc.shape[-1] - 1)]).sum(-1))
    y = torch.stack(ys, -1)
    y = y + (u.double() * D.double()[:, None] if D is not None else 0)
    return y * F.silu(z.double()) if z is not None else y


@pytest.mark.parametrize("case", CASES[:4], ids=IDS[:4])
def test_reference_matches_mamba_semantics(case):
    Bsz, Dm, L, N, bk, ck, opts, sp, _ = case
    inputs = _inputs(Bsz, Dm, L, N, bk, ck, torch.float64, "cpu", tuple(o for o in opts if o != "initial_state"),
                     grad=False)
    torch.testing.assert_close(R.selective_scan(**inputs, delta_softplus=sp),
                               _mamba_selective_scan_ref(**inputs, delta_softplus=sp))


def test_gradcheck_reference_fp64():
    inputs = _inputs(2, 4, 6, 3, 2, "var", torch.float64, "cpu")
    names = list(inputs)

    def f(*args):
        return R.selective_scan(**dict(zip(names, args)), delta_softplus=True, return_last_state=True)
    assert torch.autograd.gradcheck(f, tuple(inputs.values()))


@pytest.mark.parametrize("backend", ["reference", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_split_sequence_equals_whole(backend, device):
    """Scanning [0, 23) then [23, 41) from the carried state equals scanning [0, 41) (outputs, last state)."""
    inputs = _inputs(2, 6, 41, 4, 2, 2, torch.float32, device, grad=False)
    f = functools.partial(fastlayers.selective_scan, delta_softplus=True, return_last_state=True, backend=backend)
    whole, last = f(**inputs)
    cut = 23

    def part(lo, hi, init):
        p = {k: (v[..., lo:hi] if k in ("u", "delta", "z", "B", "C") else v) for k, v in inputs.items()}
        p["initial_state"] = init
        return f(**p)
    a, mid = part(0, cut, inputs["initial_state"])
    b, end = part(cut, 41, mid)
    torch.testing.assert_close(torch.cat([a, b], 2), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(end, last, rtol=1e-5, atol=1e-5)


def test_split_sequence_gradients_flow_through_the_state(device):
    """The last state's gradient reaches the inputs of the first piece through initial_state."""
    inputs = _inputs(1, 4, 30, 3, "var", "var", torch.float32, device, opts=("D",))
    f = functools.partial(fastlayers.selective_scan, return_last_state=True, backend="triton")
    whole = f(**inputs)[0]
    g_whole = torch.autograd.grad(whole.sum(), [inputs["u"], inputs["A"]])
    p1 = {k: (v[..., :12] if k in ("u", "delta", "B", "C") else v) for k, v in inputs.items()}
    p2 = {k: (v[..., 12:] if k in ("u", "delta", "B", "C") else v) for k, v in inputs.items()}
    a, state = f(**p1)
    b, _ = f(**p2, initial_state=state)
    g_split = torch.autograd.grad(a.sum() + b.sum(), [inputs["u"], inputs["A"]])
    for x, y in zip(g_split, g_whole):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bc", ["var", 2, "fixed"])
def test_steps_equal_whole(bc):
    """Decoding token by token from the state after a prompt equals the full scan."""
    Bsz, Dm, L, N = 2, 6, 12, 4
    inputs = _inputs(Bsz, Dm, L, N, bc, bc, torch.float32, "cpu", grad=False)
    whole, last = fastlayers.selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    p = {k: (v[..., :5] if k in ("u", "delta", "z", "B", "C") and v.dim() > 2 else v) for k, v in inputs.items()}
    _, state = fastlayers.selective_scan(**p, delta_softplus=True, return_last_state=True)
    for t in range(5, L):
        def at(M):
            return M if M.dim() == 2 else M[..., t]
        before = state.clone()
        y, new = fastlayers.selective_scan_step(state, inputs["u"][..., t], inputs["delta"][..., t], inputs["A"],
                                                at(inputs["B"]), at(inputs["C"]), inputs["D"],
                                                inputs["z"][..., t], inputs["delta_bias"], delta_softplus=True)
        assert torch.equal(state, before)  # the caller's state is not modified
        torch.testing.assert_close(y, whole[..., t], rtol=1e-5, atol=1e-5)
        state = new
    torch.testing.assert_close(state, last, rtol=1e-5, atol=1e-5)


def test_backward_is_deterministic(monkeypatch, device):
    _small_tiles(monkeypatch)  # in-place partial sums across channel blocks included
    inputs = _inputs(1, 7, 13, 4, "var", "var", torch.float32, device)
    grads = []
    for _ in range(2):
        out, last = fastlayers.selective_scan(**inputs, delta_softplus=True, return_last_state=True,
                                              backend="triton")
        grads.append(torch.autograd.grad((out * 1.3).sum() + last.sum(), list(inputs.values())))
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("shape", [(0, 3, 5), (2, 0, 5), (2, 3, 0)])
def test_zero_size(shape, device):
    Bsz, Dm, L = shape
    inputs = _inputs(Bsz, Dm, L, 2, "var", "var", torch.float32, device)
    out, last = fastlayers.selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend="triton")
    assert out.shape == (Bsz, Dm, L) and last.shape == (Bsz, Dm, 2)
    if L == 0:
        torch.testing.assert_close(last, inputs["initial_state"].detach())
    (out.sum() + last.sum()).backward()
    for k, v in inputs.items():
        assert v.grad is not None and v.grad.shape == v.shape, k
    if L == 0:
        assert torch.equal(inputs["initial_state"].grad, torch.ones_like(inputs["initial_state"]))


def test_nan_propagates_like_reference(device):
    inputs = _inputs(1, 3, 20, 2, "var", "var", torch.float32, device, opts=(), grad=False)
    inputs["u"][0, 1, 6] = float("nan")
    out = fastlayers.selective_scan(**inputs, backend="triton")
    ref = R.selective_scan(**inputs)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(out[0, 1, 6:]).all() and not torch.isnan(out[0, [0, 2]]).any()


def test_inputs_not_mutated(device):
    inputs = _inputs(2, 4, 10, 3, 2, 2, torch.float32, device)
    before = {k: v.detach().clone() for k, v in inputs.items()}
    out, last = fastlayers.selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend="triton")
    (out.sum() + last.sum()).backward()
    for k, v in inputs.items():
        assert torch.equal(v.detach(), before[k]), k


def _bad(**over):
    x = _inputs(2, 4, 6, 3, "var", "var", torch.float32, "cpu", opts=(), grad=False)
    x.update(over)
    return x


@pytest.mark.parametrize("kwargs, exc, match", [
    (_bad(u=torch.randn(4, 6)), ValueError, "`u` must have 3 dimensions"),
    (_bad(delta=torch.rand(2, 4, 5)), ValueError, r"`delta` must have shape \(2, 4, 6\)"),
    (_bad(A=torch.randn(5, 3)), ValueError, "`A` must have shape"),
    (_bad(A=torch.randn(4, 257), B=torch.randn(4, 257), C=torch.randn(4, 257)), ValueError, "N = A.shape"),
    (_bad(A=torch.randn(4, 3, dtype=torch.complex64)), TypeError, "`A` must have dtype"),
    (_bad(B=torch.randn(2, 3, 5)), ValueError, r"`B` must have shape \(2, 3, 6\)"),
    (_bad(B=torch.randn(2, 3, 3, 6)), ValueError, "must divide D"),
    (_bad(C=torch.randn(2, 3, 6).half()), TypeError, "input-dependent `C` must have u's dtype"),
    (_bad(C=torch.randn(3, 4)), ValueError, r"`C` must have shape \(4, 3\)"),
    (_bad(B=torch.randn(2, 1, 1, 3, 6)), ValueError, "`B` must have 2 or 3 or 4 dimensions"),
    (_bad(D=torch.randn(3)), ValueError, r"`D` must have shape \(4,\)"),
    (_bad(z=torch.randn(2, 4, 5)), ValueError, r"`z` must have shape"),
    (_bad(z=torch.randn(2, 4, 6).half()), TypeError, "`z` has dtype"),
    (_bad(delta_bias=torch.randn(4, 1)), ValueError, "`delta_bias` must have 1 dimensions"),
    (_bad(initial_state=torch.randn(2, 4, 2)), ValueError, r"`initial_state` must have shape \(2, 4, 3\)"),
    (_bad(delta_softplus=1), TypeError, "`delta_softplus` must be a bool"),
    (_bad(return_last_state="yes"), TypeError, "`return_last_state` must be a bool"),
    (_bad(u=torch.randn(2, 4, 6).int()), TypeError, "`u` must have dtype"),
    (_bad(A=torch.randn(4, 3, device="meta")), ValueError, "`A` is on meta"),
    (_bad(backend="fast"), ValueError, "expected one of"),
    (_bad(backend="cuda"), ValueError, "needs CUDA tensors"),
    (dict(_bad(), u=torch.randn(2, 4, 6).double(), delta=torch.rand(2, 4, 6).double(),
          B=torch.randn(2, 3, 6).double(), C=torch.randn(2, 3, 6).double(), backend="triton"),
     ValueError, "float64 runs only on the reference"),
])
def test_bad_input_raises(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastlayers.selective_scan(**kwargs)


@pytest.mark.parametrize("call, match", [
    (lambda s, u, A, B: fastlayers.selective_scan_step(s[:, :, :2], u, u, A, B, B), r"`state` must have shape"),
    (lambda s, u, A, B: fastlayers.selective_scan_step(s, u, u, A, B[:, :2], B), r"`B` must have shape"),
    (lambda s, u, A, B: fastlayers.selective_scan_step(s, u, u[:, :3], A, B, B), r"`delta` must have shape"),
    (lambda s, u, A, B: fastlayers.selective_scan_step(s, u, u, A, B, B[:, None].expand(2, 3, 3)),
     r"G dividing D"),
])
def test_step_bad_input_raises(call, match):
    s, u, A, B = torch.randn(2, 4, 3), torch.randn(2, 4), -torch.rand(4, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match=match):
        call(s, u, A, B)


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck(backend, device):
    x = _inputs(2, 4, 5, 2, 2, 2, torch.float32, device)
    f32 = {k: v.detach().float().contiguous().requires_grad_() for k, v in x.items()}
    args = (f32["u"], f32["delta"], f32["A"], f32["B"], f32["C"], f32["D"], f32["z"], f32["delta_bias"],
            f32["initial_state"], True, backend)
    torch.library.opcheck(torch.ops.fastlayers.selective_scan.default, args)
    fixed = (f32["u"], f32["delta"], f32["A"], f32["A"].detach().clone(), f32["A"].detach().clone(), None, None,
             None, None, False, backend)
    torch.library.opcheck(torch.ops.fastlayers.selective_scan.default, fixed)


def test_torch_compile_fullgraph(device):
    m = Mamba(8, d_state=4, expand=2).to(device)
    x = torch.randn(2, 7, 8, device=device, requires_grad=True)
    with fastlayers.use_backend("triton"):
        eager = m(x)
        g_eager = torch.autograd.grad(eager.sum(), [x, m.A_log, m.x_proj.weight])
        out = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
        g = torch.autograd.grad(out.sum(), [x, m.A_log, m.x_proj.weight])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ the Mamba block

class _MambaSimple(torch.nn.Module):
    """Stand-in for mamba_ssm.modules.mamba_simple.Mamba (not installed here): the same constructor, parameter
    names and shapes, and forward = mamba_simple's reference path (nn.Conv1d + truncation, SiLU, x_proj split,
    dt_proj without bias, selective_scan_ref semantics with delta_bias and softplus, out_proj)."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", conv_bias=True, bias=False,
                 layer_idx=None):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.layer_idx, self.activation, self.use_fast_path = layer_idx, "silu", True
        self.in_proj = torch.nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = torch.nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                      bias=conv_bias)
        self.x_proj = torch.nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = torch.nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = torch.nn.Parameter(torch.log(torch.arange(1, d_state + 1.0).repeat(self.d_inner, 1)))
        self.D = torch.nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = torch.nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, h):
        L = h.shape[1]
        x, z = self.in_proj(h).transpose(1, 2).chunk(2, dim=1)
        x = F.silu(self.conv1d(x)[..., :L])
        dt, B, C = torch.split(self.x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], -1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)
        y = _mamba_selective_scan_ref(x, dt, -torch.exp(self.A_log.float()), B.transpose(1, 2),
                                      C.transpose(1, 2), self.D.float(), z, self.dt_proj.bias.float(), True)
        return self.out_proj(y.to(h.dtype).transpose(1, 2))


_MambaSimple.__module__ = "mamba_ssm.modules.mamba_simple"
_MambaSimple.__qualname__ = _MambaSimple.__name__ = "Mamba"


def _pair(d_model=8, **kw):
    torch.manual_seed(0)
    theirs = _MambaSimple(d_model, **kw)
    with torch.no_grad():  # non-trivial weights everywhere
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = Mamba(d_model, **kw)
    return theirs, ours


@pytest.mark.parametrize("kw", [{"d_state": 4}, {"d_state": 3, "d_conv": 3, "expand": 1, "dt_rank": 2,
                                                  "bias": True, "conv_bias": False}])
def test_mamba_state_dict_and_numerics(kw, device):
    theirs, ours = _pair(**kw)
    sd = theirs.state_dict()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    ours.load_state_dict(sd)
    theirs, ours = theirs.to(device), ours.to(device)
    x = torch.randn(2, 11, 8, device=device, requires_grad=True)
    expected = theirs(x)
    with fastlayers.use_backend("triton"):
        out = ours(x)
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)
    g_theirs = torch.autograd.grad(expected.sum(), [x, theirs.A_log, theirs.x_proj.weight, theirs.conv1d.weight])
    g_ours = torch.autograd.grad(out.sum(), [x, ours.A_log, ours.x_proj.weight, ours.conv1d.weight])
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5)


def test_accelerate_replaces_mamba_simple(device):
    theirs, _ = _pair(d_state=4)
    model = torch.nn.Sequential(theirs, torch.nn.LayerNorm(8)).to(device)
    x = torch.randn(2, 9, 8, device=device)
    expected = model(x)
    report = fastlayers.accelerate(model)
    assert isinstance(model[0], Mamba) and [r[0] for r in report.replaced] == ["0"]
    assert model[0].A_log is theirs.A_log and model[0].in_proj is theirs.in_proj  # weights shared, not copied
    with fastlayers.use_backend("triton"):
        torch.testing.assert_close(model(x), expected.float(), rtol=1e-5, atol=1e-5)
    odd = _MambaSimple(8, d_state=4)
    odd.x_proj = torch.nn.Linear(16, 5, bias=False)  # not Mamba's shapes: kept, with the reason
    report = fastlayers.accelerate(torch.nn.Sequential(odd))
    assert not report.replaced and "shapes" in report.kept[0][2]


def test_mamba_decoding_equals_forward():
    torch.manual_seed(0)
    m = Mamba(8, d_state=4, layer_idx=3).eval()
    x = torch.randn(2, 10, 8)
    with torch.no_grad():
        whole = m(x)
        params = InferenceParams(max_seqlen=10, max_batch_size=2)
        outs = [m(x[:, :4], inference_params=params)]  # prompt: fills the caches
        conv_state, ssm_state = params.key_value_memory_dict[3]
        assert conv_state.shape == (2, 16, 4) and ssm_state.shape == (2, 16, 4)
        params.seqlen_offset = 4
        for t in range(4, 10):
            outs.append(m(x[:, t:t + 1], inference_params=params))
            params.seqlen_offset += 1
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=1e-5, atol=1e-5)
    cache = m.allocate_inference_cache(3, 16)
    assert cache[0].shape == (3, 16, 4) and cache[1].shape == (3, 16, 4)


def test_mamba_prompt_shorter_than_conv():
    torch.manual_seed(0)
    m = Mamba(8, d_state=4, d_conv=4, layer_idx=0).eval()
    x = torch.randn(1, 6, 8)
    with torch.no_grad():
        whole = m(x)
        params = InferenceParams(max_seqlen=6, max_batch_size=1)
        outs = [m(x[:, :2], inference_params=params)]
        for t in range(2, 6):
            params.seqlen_offset = t
            outs.append(m(x[:, t:t + 1], inference_params=params))
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=1e-5, atol=1e-5)


def test_mamba_trains(device):
    torch.manual_seed(0)
    m = Mamba(8, d_state=4).to(device)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x, target = torch.randn(2, 6, 8, device=device), torch.randn(2, 6, 8, device=device)
    losses = []
    with fastlayers.use_backend("triton"):
        for _ in range(3):
            loss = F.mse_loss(m(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------------ GPU only

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cuda_matches_reference(case, dtype):
    _check_case(case, dtype, "cuda", "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("L, N", [(2047, 16), (1500, 64), (1030, 256)])
def test_gpu_long_sequences(backend, L, N):
    """Several CUDA chunks / Triton segments, large states, bf16: outputs and gradients vs the reference."""
    inputs = _inputs(1, 3, L, N, "var", "var", torch.bfloat16, "cuda")
    check(functools.partial(fastlayers.selective_scan, backend=backend), R.selective_scan, inputs,
          {"delta_softplus": True, "return_last_state": True}, ("out", "last_state"), f"{backend} L={L} N={N}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backward_is_deterministic(backend):
    inputs = _inputs(4, 256, 3000, 16, "var", "var", torch.bfloat16, "cuda")
    grads = []
    for _ in range(2):
        out, last = fastlayers.selective_scan(**inputs, delta_softplus=True, return_last_state=True,
                                              backend=backend)
        grads.append(torch.autograd.grad(out.float().sum() + last.sum(), list(inputs.values())))
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_unaligned_and_odd_lengths(backend):
    """A view whose data is not 16-byte aligned and lengths that are not multiples of the vector width."""
    inputs = _inputs(2, 5, 1031, 8, "var", "var", torch.float16, "cuda", grad=False)
    shifted = torch.empty(2 * 5 * 1031 + 1, device="cuda", dtype=torch.float16)[1:].view(2, 5, 1031)
    shifted.copy_(inputs["u"])
    inputs["u"] = shifted
    out = fastlayers.selective_scan(**inputs, delta_softplus=True, backend=backend)
    ref = R.selective_scan(**inputs, delta_softplus=True)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_more_than_2_31_elements(backend):
    """B*D*L > 2**31: offsets overflow int32 unless the index math is 64-bit. The last channels must equal the
    same kernel run on those channels alone (small offsets)."""
    Bsz, Dm, L, N = 2, 16384, 65537, 4
    u = torch.randn(Bsz, Dm, L, device="cuda", dtype=torch.bfloat16)
    delta = torch.rand(Bsz, Dm, L, device="cuda", dtype=torch.bfloat16)
    A = -torch.rand(Dm, N, device="cuda") - 0.5
    B, C = torch.randn(Dm, N, device="cuda"), torch.randn(Dm, N, device="cuda")
    out, last = fastlayers.selective_scan(u, delta, A, B, C, return_last_state=True, backend=backend)
    sl = slice(Dm - 3, Dm)
    small, small_last = fastlayers.selective_scan(u[-1:, sl].contiguous(), delta[-1:, sl].contiguous(), A[sl],
                                                  B[sl], C[sl], return_last_state=True, backend=backend)
    torch.testing.assert_close(out[-1:, sl], small)
    torch.testing.assert_close(last[-1:, sl], small_last)


@pytest.mark.gpu
def test_gpu_auto_backend_and_mamba_block_bf16():
    torch.manual_seed(0)
    m = Mamba(64, d_state=16, layer_idx=0).cuda().to(torch.bfloat16)
    x = torch.randn(2, 300, 64, device="cuda", dtype=torch.bfloat16)
    out = m(x)
    with fastlayers.use_backend("reference"):
        ref = m(x)
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=3e-2)
