"""Modules over fastlayers.dilated_conv1d: DilatedConv1d, CausalConv1d (Mamba's conv1d), TemporalConvNet (TCNCA)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..ops.dilated_conv1d import ACTIVATIONS, dilated_conv1d, dilated_conv1d_step


def _init_depthwise(weight: Tensor, bias: Optional[Tensor]) -> None:
    # nn.Conv1d's default initialisation (fan_in = K for a depthwise filter)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1.0 / math.sqrt(weight.shape[-1])
        nn.init.uniform_(bias, -bound, bound)


class DilatedConv1d(nn.Module):
    """Depthwise dilated 1-D convolution. Parameters shaped and named like nn.Conv1d(C, C, K, groups=C,
    dilation=d): `weight` [C, 1, K], `bias` [C], so a depthwise Conv1d checkpoint loads unchanged.

    forward(x [B, C, L], initial_state=None, return_final_state=False) -> y [B, C, L] (and the final state).
    causal=True: left padding (K-1)*dilation; causal=False: "same" padding. activation: None or "silu".
    """

    def __init__(self, channels: int, kernel_size: int, dilation: int = 1, causal: bool = True, bias: bool = True,
                 activation: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"DilatedConv1d: `activation` must be one of {ACTIVATIONS}, got {activation!r}")
        self.channels, self.kernel_size, self.dilation = channels, kernel_size, dilation
        self.causal, self.activation = causal, activation
        f = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size, **f))
        self.bias = nn.Parameter(torch.empty(channels, **f)) if bias else None
        _init_depthwise(self.weight, self.bias)

    @property
    def state_size(self) -> int:
        return (self.kernel_size - 1) * self.dilation

    def forward(self, x: Tensor, initial_state: Optional[Tensor] = None, return_final_state: bool = False):
        return dilated_conv1d(x, self.weight[:, 0], self.bias, self.dilation, self.causal, self.activation,
                              initial_state, return_final_state)

    def step(self, x_t: Tensor, state: Tensor):
        """One decoding step: x_t [B, C], state [B, C, (K-1)*dilation] -> (y_t, new_state)."""
        return dilated_conv1d_step(x_t, state, self.weight[:, 0], self.bias, self.dilation, self.activation)

    @classmethod
    def from_conv1d(cls, conv: nn.Conv1d, causal: bool = True, activation: Optional[str] = None):
        """A DilatedConv1d sharing the weights of a depthwise nn.Conv1d."""
        C = conv.in_channels
        if conv.groups != C or conv.out_channels != C or conv.stride != (1,):
            raise ValueError("DilatedConv1d.from_conv1d: the Conv1d must be depthwise (groups = in = out channels) "
                             f"with stride 1, got {conv}")
        m = cls(C, conv.kernel_size[0], conv.dilation[0], causal, conv.bias is not None, activation,
                device="meta")
        m.weight, m.bias = conv.weight, conv.bias
        return m

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, dilation={self.dilation}, causal={self.causal}, "
                f"bias={self.bias is not None}, activation={self.activation}")


class CausalConv1d(nn.Conv1d):
    """The conv1d of mamba_ssm's Mamba block, nn.Conv1d(C, C, K, groups=C, padding=(K-1)*dilation), followed by
    the truncation to the first L outputs that Mamba applies: forward returns [B, C, L] directly (Mamba's
    `conv1d(x)[..., :L]` is then a no-op). Same constructor and parameters as nn.Conv1d; it is one.

    `activation="silu"` fuses Mamba's following SiLU. `step(x_t, state)` is the decoding path.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=None, dilation=1,
                 groups: Optional[int] = None, bias: bool = True, padding_mode: str = "zeros", device=None,
                 dtype=None, *, activation: Optional[str] = None):
        k = kernel_size if isinstance(kernel_size, int) else kernel_size[0]
        d = dilation if isinstance(dilation, int) else dilation[0]
        groups = in_channels if groups is None else groups
        padding = (k - 1) * d if padding is None else padding
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        p = self.padding[0] if isinstance(self.padding, tuple) else self.padding
        if not (in_channels == out_channels == groups):
            raise ValueError(f"CausalConv1d: must be depthwise (in_channels == out_channels == groups), got "
                             f"{in_channels}, {out_channels}, {groups}")
        if self.stride != (1,) or padding_mode != "zeros" or p != (k - 1) * d:
            raise ValueError(f"CausalConv1d: needs stride 1, zero padding of (K-1)*dilation = {(k - 1) * d}; got "
                             f"stride={self.stride}, padding={self.padding}, padding_mode={padding_mode!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"CausalConv1d: `activation` must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation

    def forward(self, x: Tensor, initial_state: Optional[Tensor] = None, return_final_state: bool = False):
        return dilated_conv1d(x, self.weight[:, 0], self.bias, self.dilation[0], True, self.activation,
                              initial_state, return_final_state)

    def step(self, x_t: Tensor, state: Tensor):
        return dilated_conv1d_step(x_t, state, self.weight[:, 0], self.bias, self.dilation[0], self.activation)

    @classmethod
    def from_conv1d(cls, conv: nn.Conv1d, activation: Optional[str] = None) -> "CausalConv1d":
        """Same parameters (shared, not copied) as a Mamba-style causal nn.Conv1d."""
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device="meta", activation=activation)
        m.weight, m.bias = conv.weight, conv.bias
        return m


class _ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over C of x [B, C, L]; works on the channels-last view, which dilated_conv1d reads without a
    copy."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class TemporalConvNet(nn.Module):
    """A TCNCA-style stack of depthwise dilated causal convolutions with exponentially growing dilation.

    Layer i: x = x + dropout(act(conv_i(norm_i(x)))), conv_i: kernel K, dilation dilation_base**i
    (or `dilations`), so the receptive field grows to 1 + (K-1) * sum(dilations) with few layers.
    x: [B, C, L] (or the channels-last view of [B, L, C]). norm: "layer" (over channels, per position),
    "batch" or None. Streaming: forward(x, states, return_states=True) continues a sequence chunk by chunk
    (exactly, with norm="layer"/None, or "batch" in eval mode).
    """

    def __init__(self, channels: int, num_layers: int = 4, kernel_size: int = 3, dilation_base: int = 2,
                 dilations: Optional[Sequence[int]] = None, activation: Optional[str] = "silu",
                 norm: Optional[str] = "layer", dropout: float = 0.0, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if norm not in ("layer", "batch", None):
            raise ValueError(f"TemporalConvNet: `norm` must be 'layer', 'batch' or None, got {norm!r}")
        dil = list(dilations) if dilations is not None else [dilation_base ** i for i in range(num_layers)]
        f = {"device": device, "dtype": dtype}
        self.dilations = dil
        self.convs = nn.ModuleList(DilatedConv1d(channels, kernel_size, d, True, bias, activation, **f) for d in dil)
        if norm == "layer":
            self.norms = nn.ModuleList(_ChannelLayerNorm(channels, **f) for _ in dil)
        elif norm == "batch":
            self.norms = nn.ModuleList(nn.BatchNorm1d(channels, **f) for _ in dil)
        else:
            self.norms = nn.ModuleList(nn.Identity() for _ in dil)
        self.dropout = nn.Dropout(dropout)

    @property
    def receptive_field(self) -> int:
        return 1 + sum((c.kernel_size - 1) * c.dilation for c in self.convs)

    def forward(self, x: Tensor, states: Optional[Sequence[Tensor]] = None, return_states: bool = False):
        new_states = []
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = norm(x)
            init = states[i] if states is not None else None
            if return_states:
                h, s = conv(h, init, True)
                new_states.append(s)
            else:
                h = conv(h, init)
            x = x + self.dropout(h)
        return (x, new_states) if return_states else x


def examples(device):
    """Tiny module examples for the generic composability tests: [(label, module, args)]."""
    x = torch.randn(2, 6, 21, device=device)
    return [
        ("DilatedConv1d", DilatedConv1d(6, 3, dilation=2, activation="silu").to(device), (x,)),
        ("CausalConv1d", CausalConv1d(6, 6, 4, groups=6, padding=3).to(device), (x,)),
        ("TemporalConvNet", TemporalConvNet(6, num_layers=2).to(device), (x,)),
    ]
