"""The CUDA extension builds and loads on the CPU machine with its op schemas, and every Triton kernel
configuration compiles for sm_90 without spills or too much shared memory."""
import os
import subprocess
import sys

import pytest
import torch

from fastlayers import _ext, registry

REQUIRE_EXT = os.environ.get("FASTLAYERS_REQUIRE_CUDA_EXT", "0") not in ("", "0")

# The schema each CUDA entry point must have (so Python and C++ agree on arguments).
CUDA_SCHEMAS = {
    "dilated_conv1d_fwd_cuda": "fastlayers::dilated_conv1d_fwd_cuda(Tensor x, Tensor weight, Tensor? bias, "
                               "Tensor? initial_state, int dilation, int pad, bool silu, Tensor? dy) -> Tensor",
    "dilated_conv1d_bwd_cuda": "fastlayers::dilated_conv1d_bwd_cuda(Tensor x, Tensor weight, Tensor? initial_state, "
                               "Tensor g, int dilation, int pad) -> (Tensor, Tensor, Tensor, Tensor)",
    "selective_scan_fwd_cuda": "fastlayers::selective_scan_fwd_cuda(Tensor u, Tensor delta, Tensor A, Tensor B, "
                               "Tensor C, Tensor D, Tensor? z, Tensor delta_bias, Tensor initial_state, "
                               "bool delta_softplus) -> (Tensor, Tensor, Tensor)",
    "selective_scan_bwd_cuda": "fastlayers::selective_scan_bwd_cuda(Tensor u, Tensor delta, Tensor A, Tensor B, "
                               "Tensor C, Tensor D, Tensor? z, Tensor delta_bias, Tensor chk, Tensor dout, "
                               "Tensor dlast, bool delta_softplus) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
                               "Tensor, Tensor, Tensor, Tensor)",
}


def test_cuda_extension_loads_with_schemas():
    if not _ext.load():
        if REQUIRE_EXT:
            pytest.fail(f"FASTLAYERS_REQUIRE_CUDA_EXT=1 but the extension did not load: {_ext.error()}")
        pytest.skip(f"CUDA extension not built ({_ext.error()})")
    declared = {n for op in registry.get() for n in op.cuda_ops}
    assert declared == set(CUDA_SCHEMAS), "registry.cuda_ops and the expected schemas disagree"
    for name, schema in CUDA_SCHEMAS.items():
        assert _ext.has_op(name), name
        got = str(getattr(torch.ops.fastlayers, name).default._schema)
        assert got == schema, f"{name}: {got}"


def test_cuda_ops_refuse_cpu_tensors():
    if not _ext.load():
        pytest.skip("CUDA extension not built")
    x, w = torch.randn(1, 2, 8), torch.randn(2, 3)
    with pytest.raises(Exception):  # no CPU kernel is registered: the dispatcher refuses, nothing crashes
        torch.ops.fastlayers.dilated_conv1d_fwd_cuda(x, w, None, None, 1, 2, False, None)


def test_triton_kernels_compile_for_sm90():
    """fastlayers check --compile-only in a fresh process (the interpreter must be off to compile)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "fastlayers.cli", "check", "--compile-only"], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert " 0 failed" in res.stdout
