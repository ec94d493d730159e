"""The registry of ops: what the CLI (`info`, `check`, `bench`), the CI compile check and the support matrix
iterate over. Adding an op = one OpInfo here plus its files in each layer."""
from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class OpInfo:
    name: str
    kernels: str | None          # module under fastlayers.kernels with aot_cases() (None: no Triton kernel)
    cuda_ops: tuple = ()         # torch.ops.fastlayers.<name> entry points from the CUDA extension
    bench: str | None = None     # module under fastlayers.benchmarks
    dtypes: tuple = ("fp32", "fp16", "bf16")
    backward: bool = True
    notes: str = ""

    def ops_module(self):
        return importlib.import_module(f"fastlayers.ops.{self.name}")

    def kernels_module(self):
        return importlib.import_module(f"fastlayers.kernels.{self.kernels}") if self.kernels else None

    def bench_module(self):
        return importlib.import_module(f"fastlayers.benchmarks.{self.bench}") if self.bench else None

    def check_cases(self, device):
        """Small cases comparing the kernel backend(s) with the reference (see fastlayers.testing)."""
        return self.ops_module().check_cases(device)


OPS: dict[str, OpInfo] = {
    "dilated_conv1d": OpInfo(
        "dilated_conv1d", kernels="dilated_conv1d",
        cuda_ops=("dilated_conv1d_fwd_cuda", "dilated_conv1d_bwd_cuda"), bench="bench_dilated_conv1d",
        notes="CUDA kernel: channels-first only (channels-last runs on Triton)"),
    "sparse_conv2d": OpInfo(
        "sparse_conv2d", kernels="sparse_conv2d", bench="bench_sparse_conv2d",
        notes="SparK masked conv on active pixels only: gather-GEMM (dense/grouped), direct (depthwise)"),
    "sparse_norm2d": OpInfo(
        "sparse_norm2d", kernels="sparse_norm2d",
        notes="SparK sparse BatchNorm2d / LayerNorm2d over active pixels (benchmarked in bench_sparse_conv2d)"),
}


def get(names=None) -> list[OpInfo]:
    if not names:
        return list(OPS.values())
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; known: {sorted(OPS)}")
    return [OPS[n] for n in names]
