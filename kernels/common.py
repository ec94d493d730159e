"""What the Triton kernels share: output allocation (NaN-poisoned in tests), launch helpers and the
ahead-of-time sm_90 compile check used by CI and `fastlayers check --compile-only`."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile

import torch
import triton

# Tests set FASTLAYERS_POISON=1 so every output the launchers allocate starts as NaN: an unwritten element fails.
_POISON = os.environ.get("FASTLAYERS_POISON", "0") not in ("", "0")

TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def empty(shape, *, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if _POISON and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def empty_like(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """Same shape and strides as x (x must be dense: contiguous or a permutation of contiguous)."""
    t = torch.empty_like(x, dtype=dtype)
    if _POISON and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def empty_format(shape, *, dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """`empty` in a given memory format (e.g. torch.channels_last), NaN-poisoned in tests like `empty`."""
    t = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if _POISON and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile for the H100 (sm_90) without a GPU.

H100_SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90


@dataclasses.dataclass
class AotCase:
    """One configuration a launcher may compile: kernel, argument types, constexpr values, launch options."""
    name: str
    fn: object
    signature: dict          # arg name -> "*fp16" | "i32" | "fp32" | "constexpr" ...
    constexprs: dict         # constexpr name -> value
    options: dict = dataclasses.field(default_factory=dict)  # num_warps, num_stages
    aligned: tuple = ()      # arg names the JIT would specialise as 16-divisible (pointers, strides): vector loads


def signature(fn, pointers: dict, constexprs: dict, scalars: dict | None = None) -> dict:
    """Build a Triton signature from the kernel's argument names.

    pointers: name -> pointee type ("fp16", "fp32", ...); constexprs: name -> value;
    scalars: name -> type for non-pointer runtime args other than i32 (default i32).
    """
    scalars = scalars or {}
    sig = {}
    for a in fn.arg_names:
        if a in constexprs:
            sig[a] = "constexpr"
        elif a in pointers:
            sig[a] = "*" + pointers[a]
        else:
            sig[a] = scalars.get(a, "i32")
    return sig


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def _ptxas() -> str:
    import triton.backends.nvidia as nv
    return os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")


def compile_sm90(case: AotCase) -> dict:
    """Compile one case for sm_90; returns registers, spills, shared memory and whether it fits an H100."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # Pointers from torch's allocator are 16-byte aligned, and the JIT specialises them so (vector loads, more
    # registers): compile that variant, plus whatever else the case marks (strides, sizes).
    aligned = set(case.aligned) | {a for a, t in case.signature.items() if t.startswith("*")}
    attrs = {(list(case.signature).index(a),): [["tt.divisibility", 16]] for a in aligned} or None
    src = ASTSource(fn=case.fn, signature=case.signature, constexprs=case.constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(case.options))
    shared = int(compiled.metadata.shared)
    row = {"kernel": case.name, "shared": shared, "num_warps": compiled.metadata.num_warps,
           "registers": None, "spill_stores": None, "spill_loads": None, "stack": None}
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        res = subprocess.run([_ptxas(), "-arch=sm_90a", "-v", ptx, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"ptxas failed for {case.name}: {res.stderr[-2000:]}")
        for key, rx in _PTXAS_RE.items():
            m = rx.findall(res.stderr)
            row[key] = max(int(v) for v in m) if m else 0
    spills = (row["spill_stores"] or 0) + (row["spill_loads"] or 0)
    row["ok"] = shared <= H100_SMEM_LIMIT and spills == 0
    row["why"] = "" if row["ok"] else (
        f"shared {shared} B > {H100_SMEM_LIMIT} B" if shared > H100_SMEM_LIMIT else f"{spills} B of register spills")
    return row
