"""fastlayers.halo_attention: the reference against timm's HaloAttn, the Triton kernels (interpreted on CPU)
against the reference for the output and every gradient, layouts, errors, torch.compile, opcheck, the
HaloAttention module against timm's, and accelerate on timm's HaloNet models."""
import copy
import functools

import pytest
import torch

import fastlayers
from fastlayers import reference as R
from fastlayers.nn import HaloAttention

from .conftest import KERNEL_DTYPES, ON_GPU
from .helpers import check, rand

timm = pytest.importorskip("timm")
from timm.layers.halo_attn import HaloAttn  # noqa: E402

# (B, H, Dqk, Dv, Hf, Wf, block, halo, query_stride, mask_padding, scale_pos_embed)
SHAPES = [
    (1, 2, 24, 40, 16, 8, 8, 3, 1, False, False),   # HaloNet's block/halo, Dqk != Dv, blocks at every border
    (2, 1, 7, 5, 8, 12, 4, 1, 1, True, False),      # odd head dims, padding masked
    (1, 1, 16, 16, 16, 16, 16, 4, 1, False, True),  # block 16 (several query tiles), widest window 24
    (1, 1, 8, 24, 16, 16, 8, 2, 2, False, False),   # stride-2 queries
    (1, 1, 16, 8, 8, 8, 4, 4, 2, True, True),       # stride 2, halo = block (3 query blocks cover a key)
    (1, 2, 12, 20, 14, 7, 7, 2, 1, False, True),    # block 7 (haloregnetz), one block wide
    (1, 1, 40, 9, 8, 8, 8, 1, 1, True, False),      # a single block: every window row has padding
]
IDS = ["B{}H{}D{}x{}_{}x{}_b{}h{}s{}{}{}".format(*s[:9], "_mask" if s[9] else "", "_spe" if s[10] else "")
       for s in SHAPES]


def _call(q, k, v, height_rel=None, width_rel=None, *, backend=None, **kw):
    rel = None if height_rel is None else (height_rel, width_rel)
    return fastlayers.halo_attention(q, k, v, rel_pos=rel, backend=backend, **kw)


def _ref(q, k, v, height_rel=None, width_rel=None, *, block_size, halo_size, **kw):
    rel = None if height_rel is None else (height_rel, width_rel)
    return R.halo_attention(q, k, v, block_size, halo_size, rel, **kw)


def _inputs(B, H, Dqk, Dv, Hf, Wf, b, h, s, dtype=torch.float32, device="cpu", rel=True):
    n_rel = 2 * (b + 2 * h) - 1
    inputs = {"q": rand(B, H, Dqk, Hf // s, Wf // s, dtype=dtype, device=device),
              "k": rand(B, H, Dqk, Hf, Wf, dtype=dtype, device=device),
              "v": rand(B, H, Dv, Hf, Wf, dtype=dtype, device=device)}
    if rel:
        inputs["height_rel"] = rand(n_rel, Dqk, dtype=dtype, device=device, scale=Dqk ** -0.5)
        inputs["width_rel"] = rand(n_rel, Dqk, dtype=dtype, device=device, scale=Dqk ** -0.5)
    return inputs


def _kw(b, h, s, mask, spe):
    return {"block_size": b, "halo_size": h, "query_stride": s, "mask_padding": mask, "scale_pos_embed": spe}


# ------------------------------------------------------------------------------------------------ reference

@pytest.mark.parametrize("kw, hw", [
    (dict(dim=32, num_heads=4, block_size=8, halo_size=3), (16, 24)),
    (dict(dim=32, dim_out=48, stride=2, num_heads=2, dim_head=12, block_size=8, halo_size=2,
          scale_pos_embed=True), (16, 16)),
    (dict(dim=24, num_heads=3, block_size=4, halo_size=4, qk_ratio=0.5), (12, 8)),
    (dict(dim=24, stride=2, num_heads=3, block_size=4, halo_size=1, avg_down=True), (8, 8)),
    (dict(dim=16, stride=2, num_heads=2, block_size=7, halo_size=2), (14, 14)),  # 7 % 2: timm pools
])
def test_reference_equals_timm_halo_attn(kw, hw):
    """The reference is timm's HaloAttn core: same unfolding, zero padding, rel logits, scales, stride."""
    m = HaloAttn(**kw).double()
    x = torch.randn(2, kw["dim"], *hw, dtype=torch.float64)
    nh, dqk, dv = m.num_heads, m.dim_head_qk, m.dim_head_v
    q = m.q(x).unflatten(1, (nh, dqk))
    k, v = m.kv(x).unflatten(1, (nh, dqk + dv)).split([dqk, dv], 2)
    out = R.halo_attention(q, k, v, m.block_size, m.halo_size, (m.pos_embed.height_rel, m.pos_embed.width_rel),
                           m.scale, m.block_stride, False, m.scale_pos_embed)
    torch.testing.assert_close(m.pool(out.flatten(1, 2)), m(x), rtol=1e-12, atol=1e-12)


def test_reference_mask_padding_excludes_outside_keys():
    """mask_padding=True equals attention over the in-image keys of each window only (written out densely)."""
    B, H, D, S, b, h = 1, 2, 6, 8, 4, 2
    q, k, v = (torch.randn(B, H, D, S, S, dtype=torch.float64) for _ in range(3))
    out = R.halo_attention(q, k, v, b, h, mask_padding=True)
    ys, xs = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    by, bx = ys.flatten() // b, xs.flatten() // b
    ky, kx = ys.flatten(), xs.flatten()
    allowed = ((ky[None] >= by[:, None] * b - h) & (ky[None] < by[:, None] * b + b + h)
               & (kx[None] >= bx[:, None] * b - h) & (kx[None] < bx[:, None] * b + b + h))
    logits = torch.einsum("bhdq,bhdk->bhqk", q.flatten(3), k.flatten(3)) * D ** -0.5
    dense = torch.einsum("bhqk,bhdk->bhdq", logits.masked_fill(~allowed, float("-inf")).softmax(-1), v.flatten(3))
    torch.testing.assert_close(out, dense.unflatten(3, (S, S)))


def test_gradcheck_reference_fp64():
    inputs = _inputs(1, 1, 2, 2, 4, 2, 2, 1, 1, dtype=torch.float64)
    for mask, spe in ((False, True), (True, False)):
        f = functools.partial(_ref, block_size=2, halo_size=1, mask_padding=mask, scale_pos_embed=spe)
        assert torch.autograd.gradcheck(lambda *a: f(*a), tuple(inputs.values()))


# ------------------------------------------------------------------------------------------------ kernels

@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_triton_matches_reference(shape, dtype, device):
    B, H, Dqk, Dv, Hf, Wf, b, h, s, mask, spe = shape
    inputs = _inputs(B, H, Dqk, Dv, Hf, Wf, b, h, s, dtype, device)
    check(functools.partial(_call, backend="triton"), _ref, inputs, _kw(b, h, s, mask, spe), ("out",),
          IDS[SHAPES.index(shape)])


@pytest.mark.parametrize("mask", [False, True], ids=["zeros", "masked"])
def test_triton_without_rel_pos(mask, device):
    inputs = _inputs(2, 1, 9, 11, 8, 16, 8, 3, 1, device=device, rel=False)
    check(functools.partial(_call, backend="triton"), _ref, inputs, _kw(8, 3, 1, mask, False), ("out",), "no rel")


def test_channels_last_and_kv_views(device):
    """q, k, v as the views of NHWC conv outputs (D innermost; k and v two halves of one kv tensor) are read in
    place; the output follows q's layout; values equal the contiguous inputs'."""
    B, H, Dqk, Dv, S, b, h = 1, 2, 8, 12, 8, 4, 2
    q = torch.randn(B, S, S, H * Dqk, device=device).permute(0, 3, 1, 2).unflatten(1, (H, Dqk)).requires_grad_()
    kv = torch.randn(B, S, S, H * (Dqk + Dv), device=device).permute(0, 3, 1, 2).requires_grad_()
    k, v = kv.unflatten(1, (H, Dqk + Dv)).split([Dqk, Dv], 2)
    rel = (torch.randn(2 * (b + 2 * h) - 1, Dqk, device=device) * 0.3).requires_grad_()
    kw = dict(block_size=b, halo_size=h, rel_pos=(rel, rel * 0.5))
    out = fastlayers.halo_attention(q, k, v, backend="triton", **kw)
    assert out.stride(2) == 1 and out.flatten(1, 2).is_contiguous(memory_format=torch.channels_last)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, kv, rel), dout)
    leaves = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    rel2 = rel.detach().clone().requires_grad_()
    ref = fastlayers.halo_attention(*leaves, block_size=b, halo_size=h, rel_pos=(rel2, rel2 * 0.5), backend="triton")
    assert ref.is_contiguous()
    ref_grads = torch.autograd.grad(ref, leaves + [rel2], dout)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], torch.cat([ref_grads[1], ref_grads[2]], 2).flatten(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[2], ref_grads[3], rtol=1e-5, atol=1e-5)


def test_backward_is_deterministic(device):
    inputs = _inputs(1, 1, 8, 8, 8, 8, 4, 3, 1, device=device)
    grads = []
    for _ in range(2):
        out = _call(**inputs, block_size=4, halo_size=3, backend="triton")
        grads.append(torch.autograd.grad((out * 1.7).sum(), list(inputs.values())))
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)


def test_zero_size(device):
    inputs = _inputs(0, 2, 4, 4, 8, 8, 4, 1, 1, device=device)
    out = _call(**inputs, block_size=4, halo_size=1, backend="triton")
    assert out.shape == (0, 2, 4, 8, 8)
    out.sum().backward()
    assert inputs["q"].grad.shape == inputs["q"].shape
    assert torch.equal(inputs["height_rel"].grad, torch.zeros_like(inputs["height_rel"]))


def test_nan_propagates_like_reference(device):
    inputs = {k: v.detach() for k, v in _inputs(1, 1, 4, 4, 16, 16, 4, 1, 1, device=device).items()}
    inputs["k"][0, 0, 1, 5, 6] = float("nan")  # key in block (1, 1); windows of blocks (0..2, 1) see it
    inputs["v"][0, 0, 2, 12, 0] = float("nan")
    for mask in (False, True):
        out = _call(**inputs, block_size=4, halo_size=1, mask_padding=mask, backend="triton")
        ref = _ref(**inputs, block_size=4, halo_size=1, mask_padding=mask)
        assert torch.equal(torch.isnan(out), torch.isnan(ref))
        assert torch.isnan(out).any() and not torch.isnan(out).all()


def test_inputs_not_mutated(device):
    inputs = _inputs(1, 2, 8, 8, 8, 8, 4, 2, 1, device=device)
    before = {k: v.detach().clone() for k, v in inputs.items()}
    _call(**inputs, block_size=4, halo_size=2, backend="triton").sum().backward()
    for k, v in inputs.items():
        assert torch.equal(v.detach(), before[k]), k


def _bad(**over):
    q, k, v = torch.randn(1, 2, 4, 8, 8), torch.randn(1, 2, 4, 8, 8), torch.randn(1, 2, 6, 8, 8)
    rel = torch.randn(2 * (4 + 2) - 1, 4)
    args = dict(q=q, k=k, v=v, block_size=4, halo_size=1, rel_pos=(rel, rel))
    args.update(over)
    return lambda: fastlayers.halo_attention(**args)


@pytest.mark.parametrize("call, exc, match", [
    (_bad(q=torch.randn(1, 2, 4, 8)), ValueError, "`q` must have 5 dimensions"),
    (_bad(k=torch.randn(1, 2, 5, 8, 8)), ValueError, "`k` must have shape"),
    (_bad(v=torch.randn(1, 2, 6, 8, 4)), ValueError, "`v` must have shape"),
    (_bad(block_size=3), ValueError, "multiple of `block_size`"),
    (_bad(block_size=0), ValueError, "`block_size` must be >= 1"),
    (_bad(halo_size=-1), ValueError, "`halo_size` must be >= 0"),
    (_bad(halo_size=1.0), TypeError, "`halo_size` must be an int"),
    (_bad(query_stride=3), ValueError, "`query_stride` must be <= 2"),
    (_bad(query_stride=2), ValueError, r"\(Hq, Wq\) must be \(4, 4\)"),
    (_bad(rel_pos=torch.randn(11, 4)), TypeError, "`rel_pos` must be a pair"),
    (_bad(rel_pos=(torch.randn(9, 4), torch.randn(11, 4))), ValueError, r"height_rel\)` must have shape \(11, 4\)"),
    (_bad(v=torch.randn(1, 2, 6, 8, 8).half()), TypeError, "`v` has dtype"),
    (_bad(q=torch.randn(1, 2, 4, 8, 8).int()), TypeError, "`q` must have dtype"),
    (_bad(k=torch.randn(1, 2, 4, 8, 8, device="meta")), ValueError, "`k` is on meta"),
    (_bad(mask_padding=1), TypeError, "`mask_padding` must be a bool"),
    (_bad(scale="1"), TypeError, "`scale` must be a float"),
    (_bad(backend="fast"), ValueError, "expected one of"),
    (_bad(q=torch.randn(1, 2, 4, 8, 8).double()), TypeError, "`k` has dtype"),
    (_bad(q=torch.randn(1, 2, 4, 8, 8).double(), k=torch.randn(1, 2, 4, 8, 8).double(),
          v=torch.randn(1, 2, 6, 8, 8).double(), rel_pos=None, backend="triton"), ValueError,
     "float64 runs only on the reference"),
    (_bad(halo_size=15, rel_pos=None, backend="triton"), NotImplementedError, "window side"),
])
def test_bad_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_opcheck(device):
    inputs = _inputs(1, 1, 5, 7, 4, 8, 4, 2, 1, device=device)
    hr, wr = inputs["height_rel"], inputs["width_rel"]
    op = torch.ops.fastlayers.halo_attention.default
    torch.library.opcheck(op, (inputs["q"], inputs["k"], inputs["v"], hr, wr, 4, 2, 1, 0.5, 1.0, False, "triton"))
    # channels-last views (D innermost), k and v halves of one tensor, stride-2 queries, no rel_pos
    q2 = torch.randn(1, 2, 4, 5, device=device).permute(0, 3, 1, 2).unflatten(1, (1, 5)).requires_grad_()
    kv = torch.randn(1, 4, 8, 12, device=device).permute(0, 3, 1, 2).unflatten(1, (1, 12)).requires_grad_()
    torch.library.opcheck(op, (q2, kv[:, :, :5], kv[:, :, 5:], None, None, 4, 1, 2, 0.3, 0.3, True, "triton"))


def test_torch_compile_fullgraph(device):
    m = HaloAttention(8, num_heads=2, block_size=4, halo_size=1).to(device)
    x = torch.randn(1, 8, 8, 8, device=device, requires_grad=True)
    with fastlayers.use_backend("triton"):
        eager = m(x)
        g_eager = torch.autograd.grad(eager.sum(), [x, m.pos_embed.height_rel])
        out = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
        g = torch.autograd.grad(out.sum(), [x, m.pos_embed.height_rel])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ modules

MODULE_CONFIGS = [
    (dict(dim=16, num_heads=2, block_size=4, halo_size=1), (8, 8)),
    (dict(dim=8, dim_out=16, stride=2, num_heads=2, dim_head=8, block_size=4, halo_size=2, scale_pos_embed=True),
     (8, 12)),
    (dict(dim=12, stride=2, num_heads=3, block_size=4, halo_size=1, avg_down=True, qkv_bias=True), (8, 8)),
]


@pytest.mark.parametrize("kw, hw", MODULE_CONFIGS, ids=["s1", "s2", "avg_down"])
def test_module_loads_timm_state_dict_and_matches(kw, hw, device, request):
    t = HaloAttn(**kw).to(device)
    m = HaloAttention(**kw).to(device)
    assert set(m.state_dict()) == set(t.state_dict())
    m.load_state_dict(t.state_dict())
    x = torch.randn(1, kw["dim"], *hw, device=device)
    dy = torch.randn_like(t(x))
    layouts = {"s1": (torch.contiguous_format, torch.channels_last), "s2": (torch.channels_last,),
               "avg_down": (torch.contiguous_format,)}[request.node.callspec.id]
    with fastlayers.use_backend("triton"):
        for fmt in layouts:
            xin = x.to(memory_format=fmt).requires_grad_()
            out = m(xin)
            torch.testing.assert_close(out, t(x), rtol=1e-5, atol=1e-5)
            ours = torch.autograd.grad(out, [xin, *m.parameters()], dy)
            x2 = x.detach().requires_grad_()
            theirs = torch.autograd.grad(t(x2), [x2, *t.parameters()], dy)
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_module_from_timm_shares_parameters(device):
    t = HaloAttn(8, stride=2, num_heads=2, block_size=4, halo_size=1).to(device)
    m = HaloAttention.from_timm(t)
    assert m.q is t.q and m.pos_embed.height_rel is t.pos_embed.height_rel
    assert m.block_stride == 2 and m.block_size_ds == 2
    x = torch.randn(1, 8, 8, 8, device=device)
    with fastlayers.use_backend("triton"):
        torch.testing.assert_close(m(x), t(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of block_size"):
        m(torch.randn(1, 8, 6, 8, device=device))


def test_module_mask_padding(device):
    m = HaloAttention(8, num_heads=2, block_size=4, halo_size=2, mask_padding=True).to(device)
    x = torch.randn(1, 8, 8, 8, device=device)
    with fastlayers.use_backend("triton"):
        out = m(x)
    with fastlayers.use_backend("reference"):
        torch.testing.assert_close(out, m(x), rtol=1e-5, atol=1e-5)
        m.mask_padding = False
        assert not torch.allclose(out, m(x))


@pytest.mark.parametrize("name", ["halonet26t", "sehalonet33ts", "halo2botnet50ts_256"])
def test_accelerate_timm_halonets(name, device):
    """accelerate swaps every HaloAttn; the whole model's output is unchanged. On CPU the models run the
    reference backend (the interpreter is too slow for whole models); on a GPU the Triton kernels."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).to(device).eval()
    for mod in model.modules():  # timm zero-inits the last norm of each residual branch: undo that
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            torch.nn.init.uniform_(mod.weight, 0.5, 1.5)
    n_halo = sum(isinstance(mod, HaloAttn) for mod in model.modules())
    ref = copy.deepcopy(model)
    report = fastlayers.accelerate(model)
    assert len(report.replaced) == n_halo > 0
    assert not any(isinstance(mod, HaloAttn) for mod in model.modules())
    assert model.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(1, 3, 256, 256, device=device)
    with torch.no_grad(), fastlayers.use_backend("triton" if ON_GPU else "reference"):
        out, expected = model.forward_features(x), ref.forward_features(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


# ------------------------------------------------------------------------------------------------ GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_triton_bf16_matches_reference(shape):
    B, H, Dqk, Dv, Hf, Wf, b, h, s, mask, spe = shape
    inputs = _inputs(B, H, Dqk, Dv, Hf, Wf, b, h, s, torch.bfloat16, "cuda")
    check(functools.partial(_call, backend="triton"), _ref, inputs, _kw(b, h, s, mask, spe), ("out",), "bf16")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_benchmark_shape_matches_reference(dtype):
    """The issue's shape (B=64 C=256 32x32, block 8, halo 3, 8 heads), NCHW and channels-last."""
    m = HaloAttention(256, num_heads=8, block_size=8, halo_size=3).cuda().to(dtype)
    x = torch.randn(64, 256, 32, 32, device="cuda", dtype=dtype)
    with fastlayers.use_backend("reference"):
        ref = m(x).float()
    for xin in (x, x.to(memory_format=torch.channels_last)):
        out = m(xin).float()
        assert (out - ref).norm() / ref.norm() < (2e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.gpu
def test_more_than_2_31_elements():
    """k and v with B*H*D*Hf*Wf > 2**31 elements: offsets overflow int32 unless the index math is 64-bit."""
    B, H, D, S = 1025, 8, 64, 64  # 2**31 + 2**21 elements
    kv = torch.randn(B, H, D, S, S, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, H, D, S, S, device="cuda", dtype=torch.bfloat16)
    out = fastlayers.halo_attention(q.expand(B, -1, -1, -1, -1), kv, kv, block_size=8, halo_size=3)
    ref = R.halo_attention(q, kv[-1:], kv[-1:], 8, 3)
    torch.testing.assert_close(out[-1:].float(), ref.float(), rtol=2e-2, atol=2e-2)
