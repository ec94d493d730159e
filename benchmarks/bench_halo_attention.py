"""Benchmark of fastlayers.nn.HaloAttention (HaloNet) at the issue's shapes (../shared/ANCHORS.md), bf16.

Every implementation runs the whole timm HaloAttn layer (1x1 q / kv convs + blocked attention) with the same
weights, which are benchmark inputs (their gradients are part of fwd+bwd): fastlayers (Triton, NCHW and
channels-last input), timm's HaloAttn, FlexAttention over the flattened feature map with the equivalent block
mask (relative logits as a score_mod; a mask-only variant as the local-attention anchor; FlexAttention cannot
see timm's zero keys outside the image, so it computes the mask_padding=True variant), the eager reference and
torch.compile(reference). Throughput: useful flops of the convs and of the win^2 window per query.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from fastlayers import reference as R
from fastlayers.nn import HaloAttention

from .common import Case, optional_import

# (name, B, C, H=W, heads, block, halo)
GPU_SHAPES = [("HaloNet stage", 64, 256, 32, 8, 8, 3), ("local attention", 32, 128, 64, 4, 8, 3)]
CPU_SHAPES = [("small", 2, 32, 16, 4, 8, 3)]
PARAMS = ("q.weight", "kv.weight", "pos_embed.height_rel", "pos_embed.width_rel")


def _reference_layer(x, wq, wkv, hrel, wrel, m: HaloAttention):
    """The layer in plain PyTorch: convs, then the reference attention."""
    nh, dqk, dv = m.num_heads, m.dim_head_qk, m.dim_head_v
    q = F.conv2d(x, wq).unflatten(1, (nh, dqk))
    k, v = F.conv2d(x, wkv).unflatten(1, (nh, dqk + dv)).split([dqk, dv], 2)
    out = R.halo_attention(q, k, v, m.block_size, m.halo_size, (hrel, wrel), m.scale)
    return out.flatten(1, 2)


def _flex(m: HaloAttention, H: int, W: int, device, rel: bool):
    """HaloNet attention as FlexAttention over the H*W tokens in block-major order (the b*b tokens of a block
    are consecutive, so a query block meets few key blocks): a block mask for the windows, relative logits
    gathered in a score_mod. None when FlexAttention does not import."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception:
        return None
    b, h, win = m.block_size, m.halo_size, m.win_size
    nh, dqk, dv = m.num_heads, m.dim_head_qk, m.dim_head_v
    nby, nbx = H // b, W // b

    def coords(t):  # token -> (block row, block column, row in block, column in block)
        blk, i = t // (b * b), t % (b * b)
        return blk // nbx, blk % nbx, i // b, i % b

    def window(q_idx, kv_idx):  # window row / column of key kv_idx for query q_idx (inside iff in [0, win))
        qby, qbx, _, _ = coords(q_idx)
        kby, kbx, ky, kx = coords(kv_idx)
        return (kby - qby) * b + ky + h, (kbx - qbx) * b + kx + h

    def mask_mod(bi, hi, q_idx, kv_idx):
        r, c = window(q_idx, kv_idx)
        return (r >= 0) & (r < win) & (c >= 0) & (c < win)

    block_mask = create_block_mask(mask_mod, None, None, H * W, H * W, device=device)
    flex = torch.compile(flex_attention, dynamic=False)
    idx = torch.arange(win, device=device)[None, :] - torch.arange(b, device=device)[:, None] + win - 1  # [b, win]
    _, _, ya, xa = coords(torch.arange(H * W, device=device))

    def tokens(t, d):  # [B, nh*d, H, W] -> [B, nh, H*W, d], block-major
        t = t.unflatten(1, (nh, d)).unflatten(3, (nby, b)).unflatten(5, (nbx, b))  # [B, nh, d, nby, b, nbx, b]
        return t.permute(0, 1, 3, 5, 4, 6, 2).reshape(t.shape[0], nh, H * W, d)

    def run(x, wq, wkv, hrel, wrel):
        B = x.shape[0]
        q = tokens(F.conv2d(x, wq), dqk)
        k, v = tokens(F.conv2d(x, wkv), dqk + dv).split([dqk, dv], 3)
        k, v = k.contiguous(), v.contiguous()
        if rel:
            rh = (q @ hrel.t()).gather(3, idx[ya][None, None].expand(B, nh, -1, -1))  # [B, nh, N, win]
            rw = (q @ wrel.t()).gather(3, idx[xa][None, None].expand(B, nh, -1, -1))

            def score_mod(score, bi, hi, q_idx, kv_idx):
                r, c = window(q_idx, kv_idx)  # clamped: score_mod also runs on masked-out entries
                r, c = torch.clamp(r, 0, win - 1), torch.clamp(c, 0, win - 1)
                return score + rh[bi, hi, q_idx, r] + rw[bi, hi, q_idx, c]
        else:
            score_mod = None
        out = flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=m.scale)  # [B, nh, N, dv]
        out = out.reshape(B, nh, nby, nbx, b, b, dv).permute(0, 1, 6, 2, 4, 3, 5)
        return out.reshape(B, nh * dv, H, W)
    return run


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    on_gpu = device.type == "cuda"
    shapes = (GPU_SHAPES[:1] if quick else GPU_SHAPES) if on_gpu else CPU_SHAPES
    dtype = torch.bfloat16 if on_gpu else torch.float32
    out = []
    for name, B, C, S, heads, block, halo in shapes:
        m = HaloAttention(C, num_heads=heads, block_size=block, halo_size=halo).to(device, dtype)
        layouts = [False, True] if (on_gpu and name == "HaloNet stage") else [False]
        for channels_last in layouts:
            def make(B=B, C=C, S=S, m=m, channels_last=channels_last):
                x = torch.randn(B, C, S, S, device=device, dtype=dtype)
                if channels_last:
                    x = x.to(memory_format=torch.channels_last)
                inputs = {"x": x.requires_grad_()}
                for key, p in zip(("wq", "wkv", "hrel", "wrel"), PARAMS):
                    ref = m.get_parameter(p)
                    inputs[key] = (torch.randn_like(ref) * ref.float().std()).requires_grad_()
                return inputs

            def module_fn(mod):
                def fn(x, wq, wkv, hrel, wrel):
                    return functional_call(mod, dict(zip(PARAMS, (wq, wkv, hrel, wrel))), (x,))
                return fn

            def ref(x, wq, wkv, hrel, wrel, m=m):
                return _reference_layer(x, wq, wkv, hrel, wrel, m)

            impls = {}
            if on_gpu:
                impls["fastlayers"] = module_fn(m)
                HaloAttn = optional_import("timm.layers.halo_attn", "HaloAttn")
                if HaloAttn is not None:
                    t = HaloAttn(C, num_heads=heads, block_size=block, halo_size=halo).to(device, dtype)
                    impls["timm HaloAttn"] = module_fn(t)
                if not channels_last:
                    for label, rel in (("flex_attention", True), ("flex_attention mask-only", False)):
                        f = _flex(m, S, S, device, rel)
                        if f is not None:
                            impls[label] = f
            if not channels_last:
                impls["reference"] = ref
                impls["reference+compile"] = torch.compile(ref, dynamic=False)
            nh, dqk, dv, win = m.num_heads, m.dim_head_qk, m.dim_head_v, m.win_size
            n = B * S * S
            conv = 2 * n * C * (2 * nh * dqk + nh * dv)
            attn = 2 * n * nh * win * win * (dqk + dv) + 2 * n * nh * 2 * (2 * win - 1) * dqk
            flops = {"fwd": conv + attn, "bwd": 2 * conv + 2.5 * attn, "fwd+bwd": 3 * conv + 3.5 * attn}
            out.append(Case(op="halo_attention",
                            name=f"{name} B={B} C={C} {S}x{S} heads={heads} block={block} halo={halo}"
                                 + (" channels-last" if channels_last else ""),
                            dtype=dtype, make_inputs=make, impls=impls,
                            grad_inputs=("x", "wq", "wkv", "hrel", "wrel"), flops=flops.__getitem__,
                            params=dict(B=B, C=C, H=S, W=S, heads=heads, block=block, halo=halo,
                                        channels_last=channels_last)))
    return out
