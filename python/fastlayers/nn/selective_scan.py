"""The Mamba block over fastlayers.selective_scan and fastlayers' causal depthwise conv.

`Mamba` has the constructor arguments, parameter names and inference-cache layout of
mamba_ssm.modules.mamba_simple.Mamba, so its checkpoints load unchanged and `fastlayers.accelerate` can swap it in.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import patch
from ..ops.selective_scan import selective_scan, selective_scan_step
from .dilated_conv1d import CausalConv1d


@dataclasses.dataclass
class InferenceParams:
    """The decoding state container mamba_ssm's blocks read (mamba_ssm.utils.generation.InferenceParams): each
    block keeps (conv_state, ssm_state) under its layer_idx; seqlen_offset > 0 means "one token at a time"."""
    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = dataclasses.field(default_factory=dict)
    lengths_per_sample: Optional[Tensor] = None

    def reset(self, max_seqlen: int, max_batch_size: int) -> None:
        self.max_seqlen, self.max_batch_size, self.seqlen_offset = max_seqlen, max_batch_size, 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()


class Mamba(nn.Module):
    """Mamba's selective-SSM block: in_proj -> causal depthwise conv + SiLU -> x_proj (dt, B, C) -> dt_proj ->
    selective scan (softplus dt, D skip, SiLU(z) gate) -> out_proj.

    hidden_states: [B, L, d_model] -> [B, L, d_model]. Parameters (names and shapes as mamba_ssm):
    in_proj [2*d_inner, d_model], conv1d (depthwise Conv1d, [d_inner, 1, d_conv]), x_proj
    [dt_rank + 2*d_state, d_inner], dt_proj ([d_inner, dt_rank] + bias), A_log [d_inner, d_state] (fp32),
    D [d_inner] (fp32), out_proj [d_model, d_inner]. `use_fast_path` is accepted for compatibility; the fast path
    is always fastlayers' kernels. Decoding: pass an InferenceParams (this module's or mamba_ssm's); with
    seqlen_offset == 0 the prompt is processed whole and the caches filled, afterwards one token per call.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2, dt_rank="auto",
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random", dt_scale: float = 1.0,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 use_fast_path: bool = True, layer_idx: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        f = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.use_fast_path, self.layer_idx = use_fast_path, layer_idx
        self.activation = "silu"
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **f)
        self.conv1d = CausalConv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                   bias=conv_bias, activation="silu", **f)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **f)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **f)
        # dt_proj initialised so that softplus(dt_proj(x)) starts in [dt_min, dt_max] (as mamba_ssm)
        std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise NotImplementedError(f"Mamba: dt_init must be 'constant' or 'random', got {dt_init!r}")
        dt = torch.exp(torch.rand(self.d_inner, **f) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.dt_proj.bias._no_reinit = True
        # S4D-real initialisation A = -(1, 2, ..., N), kept as log in fp32
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **f)

    def _ssm_inputs(self, x_dbl: Tensor):
        """x_dbl [..., dt_rank + 2N] -> dt [..., d_inner] (without bias), B, C [..., N]."""
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C

    def forward(self, hidden_states: Tensor, inference_params=None) -> Tensor:
        batch, seqlen, _ = hidden_states.shape
        conv_state = ssm_state = None
        if inference_params is not None:
            conv_state, ssm_state = self._get_states_from_cache(inference_params, batch)
            if inference_params.seqlen_offset > 0:  # the caches are updated in place
                out, _, _ = self.step(hidden_states, conv_state, ssm_state)
                return out
        xz = self.in_proj(hidden_states).transpose(1, 2)          # [B, 2*d_inner, L]
        x, z = xz.chunk(2, dim=1)
        if conv_state is not None:  # the last d_conv inputs (zero-padded on the left when L < d_conv)
            conv_state.copy_(F.pad(x, (self.d_conv - seqlen, 0)))
        x = self.conv1d(x)                                          # causal conv + SiLU, [B, d_inner, L]
        dt, B, C = self._ssm_inputs(self.x_proj(x.transpose(1, 2)))  # [B, L, *]
        A = -torch.exp(self.A_log.float())
        y = selective_scan(x, dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z=z,
                           delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                           return_last_state=ssm_state is not None)
        if ssm_state is not None:
            y, last_state = y
            ssm_state.copy_(last_state)
        return self.out_proj(y.transpose(1, 2))

    def step(self, hidden_states: Tensor, conv_state: Tensor, ssm_state: Tensor):
        """One token: hidden_states [B, 1, d_model]; conv_state [B, d_inner, d_conv] (the last d_conv conv inputs)
        and ssm_state [B, d_inner, d_state] are updated in place. Returns (out [B, 1, d_model], conv_state,
        ssm_state)."""
        if hidden_states.shape[1] != 1:
            raise ValueError(f"Mamba.step: decodes one token at a time, got hidden_states of shape "
                             f"{tuple(hidden_states.shape)}")
        x, z = self.in_proj(hidden_states.squeeze(1)).chunk(2, dim=-1)  # [B, d_inner] each
        x_conv, _ = self.conv1d.step(x.to(conv_state.dtype), conv_state[:, :, 1:])
        conv_state.copy_(torch.cat([conv_state[:, :, 1:], x.to(conv_state.dtype)[:, :, None]], dim=-1))
        x = x_conv.to(hidden_states.dtype)
        dt, B, C = self._ssm_inputs(self.x_proj(x))
        A = -torch.exp(self.A_log.float())
        y, new_state = selective_scan_step(ssm_state, x, dt, A, B, C, self.D.float(), z=z,
                                           delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        ssm_state.copy_(new_state)
        return self.out_proj(y).unsqueeze(1), conv_state, ssm_state

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        """(conv_state [B, d_inner, d_conv], ssm_state [B, d_inner, d_state]), zeros, as mamba_ssm."""
        device = self.out_proj.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        ssm_dtype = self.dt_proj.weight.dtype if dtype is None else dtype
        return (torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=conv_dtype),
                torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=ssm_dtype))

    def _get_states_from_cache(self, inference_params, batch_size: int, initialize_states: bool = False):
        if self.layer_idx is None:
            raise ValueError("Mamba: decoding with inference_params needs the block's layer_idx")
        cache = inference_params.key_value_memory_dict
        if self.layer_idx not in cache:
            cache[self.layer_idx] = (
                torch.zeros(batch_size, self.d_inner, self.d_conv, device=self.conv1d.weight.device,
                            dtype=self.conv1d.weight.dtype),
                torch.zeros(batch_size, self.d_inner, self.d_state, device=self.dt_proj.weight.device,
                            dtype=self.dt_proj.weight.dtype))
        conv_state, ssm_state = cache[self.layer_idx]
        if initialize_states:
            conv_state.zero_()
            ssm_state.zero_()
        return conv_state, ssm_state

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, d_inner={self.d_inner}, "
                f"dt_rank={self.dt_rank}, layer_idx={self.layer_idx}")


# ---------------------------------------------------------------------------------------------------------------
# accelerate: mamba_ssm's Mamba -> fastlayers' Mamba (same parameter objects)

def _from_mamba_ssm(m: nn.Module):
    parts = ("in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj")
    missing = [p for p in parts if not hasattr(m, p)]
    if missing:
        return f"not the mamba_simple.Mamba structure (missing {', '.join(missing)})"
    if getattr(m, "activation", "silu") not in ("silu", "swish"):
        return f"activation {m.activation!r} is not silu"
    in_proj, conv, x_proj, dt_proj = m.in_proj, m.conv1d, m.x_proj, m.dt_proj
    if not all(isinstance(l, nn.Linear) for l in (in_proj, x_proj, dt_proj, m.out_proj)) or \
            not isinstance(conv, nn.Conv1d):
        return "in_proj/x_proj/dt_proj/out_proj are not nn.Linear or conv1d is not nn.Conv1d"
    d_model, d_inner = in_proj.in_features, in_proj.out_features // 2
    d_state, d_conv, dt_rank = m.A_log.shape[-1], conv.kernel_size[0], dt_proj.in_features
    ok = (tuple(m.A_log.shape) == (d_inner, d_state) and tuple(m.D.shape) == (d_inner,)
          and conv.in_channels == conv.out_channels == conv.groups == d_inner and conv.stride == (1,)
          and conv.dilation == (1,) and conv.padding == (d_conv - 1,) and conv.padding_mode == "zeros"
          and x_proj.in_features == d_inner and x_proj.out_features == dt_rank + 2 * d_state
          and dt_proj.out_features == d_inner and dt_proj.bias is not None
          and m.out_proj.in_features == d_inner and m.out_proj.out_features == d_model)
    if not ok:
        return "layer shapes differ from mamba_simple.Mamba's"
    new = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=d_inner / d_model, dt_rank=dt_rank,
                conv_bias=conv.bias is not None, bias=in_proj.bias is not None,
                use_fast_path=getattr(m, "use_fast_path", True), layer_idx=getattr(m, "layer_idx", None),
                device="meta")
    new.d_inner, new.expand = d_inner, getattr(m, "expand", d_inner / d_model)
    new.in_proj, new.x_proj, new.dt_proj, new.out_proj = in_proj, x_proj, dt_proj, m.out_proj
    new.conv1d = CausalConv1d.from_conv1d(conv, activation="silu")
    new.A_log, new.D = m.A_log, m.D
    return new


patch.register("mamba_ssm.Mamba", patch.class_is("mamba_ssm.modules.mamba_simple.Mamba"), _from_mamba_ssm)


def examples(device):
    """Tiny (label, module, args) examples for the generic compile / checkpoint / DDP tests."""
    torch.manual_seed(0)
    m = Mamba(16, d_state=4, d_conv=4, expand=2, layer_idx=0).to(device)
    return [("Mamba d_model=16 d_state=4", m, (torch.randn(2, 9, 16, device=device),))]
