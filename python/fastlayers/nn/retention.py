"""Retention modules: RetNet's MultiScaleRetention (torchscale) and RMT's Manhattan self-attention (MaSA).

Parameter names follow torchscale's `MultiScaleRetention` (q_proj, k_proj, v_proj, g_proj, out_proj; the group
norm has no parameters) and RMT's `VisionRetentionAll` / `VisionRetentionChunk` (q_proj, k_proj, v_proj,
lepe.conv, out_proj), so their state_dicts load unchanged. The decays and rotation angles those codebases keep in
a separate relative-position module (RetNetRelPos, RetNetRelPos2d) are non-persistent buffers here.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import patch
from ..ops.attention import attention
from ..ops.retention import retention


def _rotate_every_two(x: Tensor) -> Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def theta_shift(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """RetNet's rotation of q and k (RoPE on interleaved pairs): x cos + rotate_every_two(x) sin."""
    return x * cos + _rotate_every_two(x) * sin


def _angles(key_dim: int, device=None) -> Tensor:
    """[key_dim] rotation frequencies, each repeated for the two members of a pair (as RetNetRelPos)."""
    a = 1.0 / (10000 ** torch.linspace(0, 1, key_dim // 2, device=device))
    return a.unsqueeze(-1).repeat(1, 2).flatten()


def _rms_norm(x: Tensor, eps: float) -> Tensor:
    """torchscale's RMSNorm without affine parameters (the "group norm" over each head)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


_GATES = {"swish": F.silu, "gelu": F.gelu}


class MultiScaleRetention(nn.Module):
    """RetNet's multi-scale retention (torchscale.component.multiscale_retention.MultiScaleRetention).

    y = out_proj(gate(g_proj(x)) * GroupNorm_h(Retention_h(x))), per head h:
      Retention(x) = (Q Kᵀ ⊙ D) V, Q = θ(x W_Q), K = θ(x W_K) Dk^-0.5, D_nm = γ_h^(n-m) for m <= n,
      γ_h = 1 - 2^(-5-h) (decay), θ the rotation of RetNetRelPos, GroupNorm = RMSNorm over each head (no affine).
    torchscale takes an `args` config first; here its fields are arguments (layernorm_eps). torchscale divides the
    retention scores by row sums for numerical range (before its group norm, which undoes any per-row scale);
    this module computes the unscaled retention in fp32 accumulation, so outputs agree up to the norm's eps.

    forward(x [B, N, embed_dim], rel_pos=None, chunkwise_recurrent=False, incremental_state=None):
      rel_pos: torchscale's ((sin, cos), mask) from RetNetRelPos; only (sin, cos) is used (the decay is the
        module's own). None: the rotation is computed here, starting at position incremental_state["offset"] (0).
      incremental_state (dict): recurrent decoding / chunked prefill. Continues from its "prev_key_value"
        (the state [B, H, key_dim, head_dim] of fastlayers.retention, unscaled: not torchscale's scaled state) and
        stores the new one; any number of tokens per call.
      chunkwise_recurrent: accepted for the signature; the kernel is chunkwise whatever its value.
    """

    def __init__(self, embed_dim: int, value_dim: Optional[int] = None, num_heads: int = 1, gate_fn: str = "swish",
                 layernorm_eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        value_dim = embed_dim if value_dim is None else value_dim
        if embed_dim % num_heads or value_dim % num_heads:
            raise ValueError(f"MultiScaleRetention: embed_dim={embed_dim} and value_dim={value_dim} must be "
                             f"divisible by num_heads={num_heads}")
        if gate_fn not in _GATES:
            raise ValueError(f"MultiScaleRetention: gate_fn must be one of {tuple(_GATES)}, got {gate_fn!r}")
        f = {"device": device, "dtype": dtype}
        self.embed_dim, self.value_dim, self.num_heads = embed_dim, value_dim, num_heads
        self.head_dim = value_dim // num_heads
        self.key_dim = embed_dim // num_heads
        self.scaling = self.key_dim ** -0.5
        self.gate_fn_name = gate_fn
        self.gate_fn = _GATES[gate_fn]
        self.layernorm_eps = layernorm_eps
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=False, **f)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=False, **f)
        self.v_proj = nn.Linear(embed_dim, value_dim, bias=False, **f)
        self.g_proj = nn.Linear(embed_dim, value_dim, bias=False, **f)
        self.out_proj = nn.Linear(value_dim, embed_dim, bias=False, **f)
        gamma = 1 - 2.0 ** (-5 - torch.arange(num_heads, dtype=torch.float32, device=device))
        self.register_buffer("gamma", gamma, persistent=False)
        self.register_buffer("angle", _angles(self.key_dim, device), persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.g_proj):
            nn.init.xavier_uniform_(lin.weight, gain=2 ** -2.5)
        nn.init.xavier_uniform_(self.out_proj.weight)

    def rotation(self, start: int, n: int) -> tuple[Tensor, Tensor]:
        """(sin, cos) [n, key_dim] of positions start .. start+n-1."""
        pos = torch.arange(start, start + n, device=self.angle.device, dtype=self.angle.dtype)
        ang = pos[:, None] * self.angle[None, :]
        return torch.sin(ang), torch.cos(ang)

    def forward(self, x: Tensor, rel_pos=None, chunkwise_recurrent: bool = False, incremental_state=None):
        B, N, _ = x.shape
        H = self.num_heads
        offset = incremental_state.get("offset", 0) if incremental_state is not None else 0
        sin, cos = rel_pos[0] if rel_pos is not None else self.rotation(offset, N)
        q = self.q_proj(x).view(B, N, H, self.key_dim).transpose(1, 2)
        k = (self.k_proj(x) * self.scaling).view(B, N, H, self.key_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, N, H, self.head_dim).transpose(1, 2)
        g = self.g_proj(x)
        qr, kr = theta_shift(q, sin.to(q.dtype), cos.to(q.dtype)), theta_shift(k, sin.to(k.dtype), cos.to(k.dtype))
        if incremental_state is not None:
            o, state = retention(qr, kr, v, self.gamma, causal=True,
                                 initial_state=incremental_state.get("prev_key_value"), return_final_state=True)
            incremental_state["prev_key_value"] = state
            incremental_state["offset"] = offset + N
        else:
            o = retention(qr, kr, v, self.gamma, causal=True)
        # torchscale's scale 1/sqrt(Σ_{m<=n} γ^(n-m)) per position (its recurrent form exactly; its parallel form
        # when its score clamp is inactive): undone by the norm but for its eps, which then acts alike
        pos = torch.arange(offset, offset + N, device=o.device, dtype=torch.float32)
        gm = self.gamma.float()[:, None]
        o = o * torch.rsqrt((1 - gm ** (pos + 1)) / (1 - gm))[:, :, None].to(o.dtype)
        o = _rms_norm(o.transpose(1, 2), self.layernorm_eps).reshape(B, N, self.value_dim)
        return self.out_proj(self.gate_fn(g) * o)

    @classmethod
    def from_module(cls, m: nn.Module) -> "MultiScaleRetention":
        """A MultiScaleRetention sharing the parameters of torchscale's (without multiway)."""
        eps = getattr(getattr(m, "group_norm", None), "eps", 1e-6)
        gate = "gelu" if getattr(m, "gate_fn", None) is F.gelu else "swish"
        new = cls(m.embed_dim, m.value_dim, m.num_heads, gate, eps, device="meta")
        for name in ("q_proj", "k_proj", "v_proj", "g_proj", "out_proj"):
            setattr(new, name, getattr(m, name))
        dev = m.q_proj.weight.device
        new.gamma = 1 - 2.0 ** (-5 - torch.arange(m.num_heads, dtype=torch.float32, device=dev))
        new.angle = _angles(new.key_dim, dev)
        return new

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, value_dim={self.value_dim}, num_heads={self.num_heads}, "
                f"gate_fn={self.gate_fn_name}")


class _DWConv2d(nn.Module):
    """RMT's DWConv2d: a depthwise Conv2d on channels-last maps [B, H, W, C] (parameter names conv.*)."""

    def __init__(self, dim: int, kernel_size: int, stride: int, padding: int, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, stride, padding, groups=dim, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def rmt_decay(num_heads: int, initial_value: float, heads_range: float, device=None) -> Tensor:
    """RMT's per-head decay γ_h = 1 - 2^(-initial_value - heads_range * h / num_heads) [H] (fp32)."""
    h = torch.arange(num_heads, dtype=torch.float32, device=device)
    return 1 - 2.0 ** (-initial_value - heads_range * h / num_heads)


def manhattan_log_decay(gamma: Tensor, Hs: int, Ws: int) -> Tensor:
    """[H, L, L] (L = Hs*Ws, row-major grid): log γ_h times the Manhattan distance between grid positions."""
    ih = torch.arange(Hs, device=gamma.device, dtype=torch.float32)
    iw = torch.arange(Ws, device=gamma.device, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(ih, iw, indexing="ij"), -1).reshape(-1, 2)
    dist = (grid[:, None, :] - grid[None, :, :]).abs().sum(-1)
    return dist * torch.log(gamma.float())[:, None, None]


def axis_log_decay(gamma: Tensor, n: int) -> Tensor:
    """[H, n, n]: log γ_h |i - j| (RMT's 1-D decay along one axis)."""
    i = torch.arange(n, device=gamma.device, dtype=torch.float32)
    return (i[:, None] - i[None, :]).abs() * torch.log(gamma.float())[:, None, None]


class ManhattanSelfAttention(nn.Module):
    """RMT's Manhattan self-attention (MaSA): RMT's VisionRetentionAll (decomposed=False) and
    VisionRetentionChunk (decomposed=True), with their parameters and the decays of RetNetRelPos2d.

    x: [B, H, W, C] (channels-last, as RMT). q, k, v = projections; k scaled by key_dim^-0.5; q, k rotated (θ over
    the flattened grid index); lepe = depthwise 5x5 conv of v; y = out_proj(attention + lepe). Per head h with
    decay γ_h = 1 - 2^(-initial_value - heads_range h / num_heads):
      kernel="softmax" (RMT's released code, the default: checkpoints reproduce):
        full:        softmax(q kᵀ + log γ · |Δrow| + |Δcol|) v over all H*W tokens (the Manhattan decay as an
                     additive log-bias, renormalised by the softmax);
        decomposed:  the same with the 1-D bias along each row (width), then along each column (height).
      kernel="retention" (RetNet's retention with RMT's decay, linear in the sequence along an axis):
        full:        (q kᵀ ⊙ γ^(|Δrow| + |Δcol|)) v;
        decomposed:  fastlayers.retention(causal=False), the two-sided γ^|i-j|, along the width, then along the
                     height (the chunkwise Triton kernel on GPUs).
    The softmax forms run fastlayers.attention with its in-kernel Manhattan `decay` (never materialised); with
    value_factor > 1 (v's head dim differs from q's) they materialise the decay and call SDPA. The full
    retention form materialises the [H, L, L] decay in PyTorch.
    forward(x, rel_pos=None, chunkwise_recurrent=False, incremental_state=None): RMT's call signature; rel_pos, when
    given, is RetNetRelPos2d's ((sin, cos), mask) and its (sin, cos) are used; the decays are the module's own.
    """

    def __init__(self, embed_dim: int, num_heads: int, value_factor: int = 1, decomposed: bool = False,
                 initial_value: float = 2.0, heads_range: float = 4.0, kernel: str = "softmax", device=None,
                 dtype=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"ManhattanSelfAttention: embed_dim={embed_dim} must be divisible by num_heads="
                             f"{num_heads}")
        if kernel not in ("softmax", "retention"):
            raise ValueError(f"ManhattanSelfAttention: kernel must be 'softmax' or 'retention', got {kernel!r}")
        f = {"device": device, "dtype": dtype}
        self.factor = value_factor
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim * value_factor // num_heads
        self.key_dim = embed_dim // num_heads
        self.scaling = self.key_dim ** -0.5
        self.decomposed, self.kernel = decomposed, kernel
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=True, **f)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=True, **f)
        self.v_proj = nn.Linear(embed_dim, embed_dim * value_factor, bias=True, **f)
        self.lepe = _DWConv2d(embed_dim, 5, 1, 2, **f)
        self.out_proj = nn.Linear(embed_dim * value_factor, embed_dim, bias=True, **f)
        self.register_buffer("gamma", rmt_decay(num_heads, initial_value, heads_range, device), persistent=False)
        self.register_buffer("angle", _angles(self.key_dim, device), persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_normal_(lin.weight, gain=2 ** -2.5)
        nn.init.xavier_normal_(self.out_proj.weight)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def rotation(self, Hs: int, Ws: int) -> tuple[Tensor, Tensor]:
        """(sin, cos) [Hs, Ws, key_dim] over the flattened grid index (as RetNetRelPos2d)."""
        idx = torch.arange(Hs * Ws, device=self.angle.device, dtype=self.angle.dtype)
        ang = (idx[:, None] * self.angle[None, :]).reshape(Hs, Ws, -1)
        return torch.sin(ang), torch.cos(ang)

    def forward(self, x: Tensor, rel_pos=None, chunkwise_recurrent: bool = False, incremental_state=None) -> Tensor:
        B, Hs, Ws, _ = x.shape
        nh = self.num_heads
        sin, cos = rel_pos[0] if rel_pos is not None else self.rotation(Hs, Ws)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        lepe = self.lepe(v)
        k = k * self.scaling
        q = q.view(B, Hs, Ws, nh, self.key_dim).permute(0, 3, 1, 2, 4)  # [B, nh, Hs, Ws, d]
        k = k.view(B, Hs, Ws, nh, self.key_dim).permute(0, 3, 1, 2, 4)
        qr = theta_shift(q, sin.to(q.dtype), cos.to(q.dtype))
        kr = theta_shift(k, sin.to(k.dtype), cos.to(k.dtype))
        v = v.view(B, Hs, Ws, nh, self.head_dim).permute(0, 3, 1, 2, 4)  # [B, nh, Hs, Ws, dv]
        out = self._decomposed(qr, kr, v) if self.decomposed else self._full(qr, kr, v)  # [B, nh, Hs, Ws, dv]
        out = out.permute(0, 2, 3, 1, 4).reshape(B, Hs, Ws, nh * self.head_dim)
        return self.out_proj(out + lepe)

    def _full(self, qr: Tensor, kr: Tensor, v: Tensor) -> Tensor:
        B, nh, Hs, Ws, d = qr.shape
        L = Hs * Ws
        q, k, vv = qr.reshape(B, nh, L, d), kr.reshape(B, nh, L, d), v.reshape(B, nh, L, -1)
        if self.kernel == "softmax" and vv.shape[-1] == d:  # the fused attention computes the decay in-kernel
            o = attention(q, k, vv, scale=1.0, decay=(self.gamma, (Hs, Ws)))
        else:
            logd = manhattan_log_decay(self.gamma, Hs, Ws)  # [nh, L, L]
            if self.kernel == "softmax":  # value_factor > 1: the fused op needs one head dim for q, k and v
                o = F.scaled_dot_product_attention(q, k, vv, attn_mask=logd.to(q.dtype), scale=1.0)
            else:
                o = (((q.float() @ k.float().transpose(-1, -2)) * logd.exp()) @ vv.float()).to(v.dtype)
        return o.reshape(B, nh, Hs, Ws, -1)

    def _decomposed(self, qr: Tensor, kr: Tensor, v: Tensor) -> Tensor:
        B, nh, Hs, Ws, d = qr.shape
        # along the width: sequences of length Ws, batched over (B, Hs)
        qw, kw, vw = (t.permute(0, 2, 1, 3, 4).reshape(B * Hs, nh, Ws, -1) for t in (qr, kr, v))
        vw = self._axis(qw, kw, vw, Ws).reshape(B, Hs, nh, Ws, -1)
        # then along the height: sequences of length Hs, batched over (B, Ws)
        qh, kh = (t.permute(0, 3, 1, 2, 4).reshape(B * Ws, nh, Hs, -1) for t in (qr, kr))
        vh = vw.permute(0, 3, 2, 1, 4).reshape(B * Ws, nh, Hs, -1)
        out = self._axis(qh, kh, vh, Hs).reshape(B, Ws, nh, Hs, -1)
        return out.permute(0, 2, 3, 1, 4)

    def _axis(self, q: Tensor, k: Tensor, v: Tensor, n: int) -> Tensor:
        if self.kernel == "softmax" and v.shape[-1] == q.shape[-1]:  # 1-D decay: the grid is one row of n
            return attention(q, k, v, scale=1.0, decay=(self.gamma, (1, n)))
        if self.kernel == "softmax":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=axis_log_decay(self.gamma, n).to(q.dtype),
                                                  scale=1.0)
        return retention(q.contiguous(), k.contiguous(), v.contiguous(), self.gamma, causal=False)

    @classmethod
    def from_module(cls, m: nn.Module, decomposed: bool, initial_value: float = 2.0, heads_range: float = 4.0
                    ) -> "ManhattanSelfAttention":
        """Share the parameters of RMT's VisionRetentionAll (decomposed=False) / VisionRetentionChunk (True);
        initial_value / heads_range are those of the stage's RetNetRelPos2d."""
        new = cls(m.embed_dim, m.num_heads, m.factor, decomposed, initial_value, heads_range, device="meta")
        for name in ("q_proj", "k_proj", "v_proj", "lepe", "out_proj"):
            setattr(new, name, getattr(m, name))
        dev = m.q_proj.weight.device
        new.gamma = rmt_decay(m.num_heads, initial_value, heads_range, dev)
        new.angle = _angles(new.key_dim, dev)
        return new

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, decomposed={self.decomposed}, "
                f"kernel={self.kernel}")


def _is_torchscale_msr(m: nn.Module) -> bool:
    return (type(m).__name__ == "MultiScaleRetention" and not isinstance(m, MultiScaleRetention)
            and all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "g_proj", "out_proj", "group_norm")))


def _convert_msr(m: nn.Module):
    if not all(isinstance(getattr(m, a), nn.Linear) for a in ("q_proj", "k_proj", "v_proj", "g_proj", "out_proj")):
        return "multiway projections (MultiwayWrapper) are not supported"
    if getattr(m, "gate_fn", None) not in (F.silu, F.gelu):
        return "unknown gate function"
    if type(m.group_norm).__name__ != "RMSNorm" or getattr(m.group_norm, "weight", None) is not None:
        return "the group norm is not an RMSNorm without affine parameters"
    return MultiScaleRetention.from_module(m)


# RMT's modules take their decays from the stage's RetNetRelPos2d: they are replaced only through
# ManhattanSelfAttention.from_module, where the caller gives initial_value / heads_range.
patch.register("torchscale.MultiScaleRetention", _is_torchscale_msr, _convert_msr)


def examples(device) -> Sequence[tuple]:
    """Tiny (label, module, args) examples for the generic compile / checkpoint / DDP tests."""
    return [
        ("MultiScaleRetention", MultiScaleRetention(32, 64, 4).to(device), (torch.randn(2, 19, 32, device=device),)),
        ("ManhattanSelfAttention decomposed retention",
         ManhattanSelfAttention(16, 2, decomposed=True, kernel="retention").to(device),
         (torch.randn(2, 5, 7, 16, device=device),)),
    ]
