"""The registry of ops: what the CLI (`info`, `check`, `bench`, `matrix`), the CI compile check, the generic
composability / reliability tests and the README's support matrix iterate over.
Adding an op = one OpInfo here plus its files in each layer."""
from __future__ import annotations

import dataclasses
import importlib

ALL_DTYPES = ("fp32", "fp16", "bf16")


@dataclasses.dataclass(frozen=True)
class Support:
    """What one backend of an op supports (the rows of the README's support matrix)."""
    backend: str                       # "triton" | "cuda" | "reference"
    dtypes: tuple = ALL_DTYPES
    fwd: bool = True
    bwd: bool = True
    compile: bool = True               # torch.compile(fullgraph=True) without graph breaks
    gpu_verified: bool = False         # numerics checked on a real GPU (scripts/gpu_check.sh); False: CPU only
    notes: str = ""


@dataclasses.dataclass(frozen=True)
class OpInfo:
    name: str
    kernels: str | None                # module under fastlayers.kernels with aot_cases() (None: no Triton kernel)
    cuda_ops: tuple = ()               # torch.ops.fastlayers.<name> entry points from the CUDA extension
    bench: str | None = None           # module under fastlayers.benchmarks
    modules: str | None = None         # module under fastlayers.nn with examples(device)
    support: tuple = ()                # Support rows
    prefer: tuple = ("triton", "cuda")  # automatic choice's order on a GPU (set from benchmarks)
    autocast: str = "lower"            # how activations are cast under torch.autocast: "lower" | "fp32"
    # "exact": NaN/Inf outputs are exactly the reference's; "superset": every output the reference makes
    # non-finite is non-finite, and a non-finite input may spread further (the reason is in `notes`)
    nonfinite: str = "exact"
    functions: tuple = ()              # its public functions, when not just fastlayers.<name>
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

    def module_examples(self, device):
        """[(label, module, args)] tiny examples of the op's nn modules."""
        return importlib.import_module(f"fastlayers.nn.{self.modules}").examples(device) if self.modules else []


OPS: dict[str, OpInfo] = {
    "attention": OpInfo(
        "attention", kernels="attention", bench="bench_attention", modules="attention",
        support=(
            Support("triton", notes="any N, M; head dims ≤ 256 (fp32: ≤ 128); broadcast bias, rel-pos table, "
                                    "RMT decay, causal, chunked, key padding; bias / table gradients deterministic"),
            Support("reference", ALL_DTYPES + ("fp64",), gpu_verified=True,
                    notes="CPU path; head dims beyond the Triton limits"),
        ),
        notes="Triton only; D <= 256 (fp32: D <= 128); learnable bias / rel-pos table grads deterministic"),
    "dilated_conv1d": OpInfo(
        "dilated_conv1d", kernels="dilated_conv1d",
        cuda_ops=("dilated_conv1d_fwd_cuda", "dilated_conv1d_bwd_cuda"), bench="bench_dilated_conv1d",
        modules="dilated_conv1d",
        support=(
            Support("triton", notes="channels-first and channels-last; K ≤ 32, any dilation; causal or same"),
            Support("cuda", notes="channels-first only (channels-last runs on Triton)"),
            Support("reference", ALL_DTYPES + ("fp64",), gpu_verified=True,
                    notes="CPU path; autograd; plain PyTorch ops, so it runs on a GPU as is"),
        ),
        notes="CUDA kernel: channels-first only (channels-last runs on Triton)"),
    "depthwise_conv2d": OpInfo(
        "depthwise_conv2d", kernels="depthwise_conv2d", bench="bench_depthwise_conv2d", modules="depthwise_conv2d",
        support=(
            Support("triton", notes="kernels 1..31 (odd/even, non-square), dilation, stride 1/2, padding "
                                    "same/valid/int/pair; channels-first and channels-last; dweight deterministic"),
            Support("reference", ALL_DTYPES + ("fp64",), gpu_verified=True, notes="F.conv2d(groups=C); CPU path"),
        ),
        nonfinite="superset",
        notes="a NaN/Inf input turns its whole output row tile (up to 32 columns) non-finite: the kernel multiplies "
              "input rows by a banded matrix of taps, and NaN x 0 = NaN"),
    "halo_attention": OpInfo(
        "halo_attention", kernels="halo_attention", bench="bench_halo_attention", modules="halo_attention",
        support=(
            Support("triton", notes="any strides (NCHW or NHWC conv outputs read in place); window b+2h ≤ 32, head "
                                    "dims ≤ 128, query stride 1 or 2; backward deterministic"),
            Support("reference", ALL_DTYPES + ("fp64",), gpu_verified=True,
                    notes="CPU path; cases beyond the Triton limits"),
        ),
        notes="Triton only; window side b+2h <= 32, head dims <= 128 (else the reference)"),
    "selective_scan": OpInfo(
        "selective_scan", kernels="selective_scan",
        cuda_ops=("selective_scan_fwd_cuda", "selective_scan_bwd_cuda"), bench="bench_selective_scan",
        modules="selective_scan", prefer=("cuda", "triton"),
        support=(
            Support("cuda", notes="fixed / input-dependent / grouped B and C, N ≤ 256, any L; fp32 state; "
                                  "gradients for every input and the initial state; deterministic"),
            Support("triton", notes="same cases as CUDA; chunked associative scan, recompute in backward"),
            Support("reference", ALL_DTYPES + ("fp64",), gpu_verified=True, notes="sequential fp32 recurrence; CPU path"),
        ),
        notes="Mamba's scan; fp32 state; auto prefers the CUDA kernel when built"),
    "linear_attention": OpInfo(
        "linear_attention", kernels="linear_attention", bench="bench_linear_attention", modules="linear_attention",
        support=(
            Support("triton", notes="non-causal (SLAB, one pass over K/V + one over Q) and causal chunkwise with "
                                    "states; relu / elu+1 / identity feature maps; Dk, Dv ≤ 256; fp32 accumulation"),
            Support("reference", ALL_DTYPES + ("fp64",), gpu_verified=True, notes="CPU path; Dk, Dv > 256"),
        ),
        notes="non-causal (SLAB) and causal chunkwise; Dk, Dv <= 256 on Triton"),
    "retention": OpInfo(
        "retention", kernels="retention", bench=None, modules="retention",
        support=(
            Support("triton", notes="RetNet causal chunkwise with states, RMT two-sided γ^|n−m|; the linear-"
                                    "attention kernels with a decay (benchmarked with linear_attention)"),
            Support("reference", ALL_DTYPES + ("fp64",), gpu_verified=True, notes="CPU path"),
        ),
        notes="the linear_attention chunk kernels with a decay; benchmarked in bench_linear_attention"),
    "sparse_conv2d": OpInfo(
        "sparse_conv2d", kernels="sparse_conv2d", bench="bench_sparse_conv2d", modules="sparse_conv2d",
        functions=("sparse_conv2d", "sparsify", "densify"),
        support=(
            Support("triton", notes="SparK semantics; work on active pixels only (mask tables built once per "
                                    "resolution); dense / grouped: gather-GEMM, depthwise: direct; kernels ≤ 31, "
                                    "stride, dilation, NCHW and channels-last; dweight deterministic"),
            Support("reference", ALL_DTYPES + ("fp64",), gpu_verified=True, notes="conv2d(x·m_in)·m_out; CPU path"),
        ),
        notes="SparK masked conv on active pixels only: gather-GEMM (dense/grouped), direct (depthwise)"),
    "sparse_norm2d": OpInfo(
        "sparse_norm2d", kernels="sparse_norm2d", modules="sparse_norm2d",
        functions=("sparse_batch_norm2d", "sparse_layer_norm2d"), autocast="fp32",
        support=(
            Support("triton", notes="BatchNorm (running stats as SparK) and LayerNorm (channels-first / -last) "
                                    "over active pixels; zeros elsewhere"),
            Support("reference", ALL_DTYPES + ("fp64",), gpu_verified=True, notes="CPU path"),
        ),
        notes="SparK sparse BatchNorm2d / LayerNorm2d over active pixels (benchmarked in bench_sparse_conv2d); "
              "under autocast LayerNorm runs in fp32 and BatchNorm keeps x's dtype, as the native norms"),
}


def get(names=None) -> list[OpInfo]:
    if not names:
        return list(OPS.values())
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; known: {sorted(OPS)}")
    return [OPS[n] for n in names]


MATRIX_BEGIN = "<!-- support-matrix:begin (generated by `fastlayers matrix`; do not edit by hand) -->"
MATRIX_END = "<!-- support-matrix:end -->"


def support_matrix() -> str:
    """The README's support matrix, generated from the registry."""
    def mark(ok):
        return "✅" if ok else "—"
    lines = ["| op | backend | fp32 | fp16 | bf16 | forward | backward | torch.compile | checked on a GPU | notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for op in OPS.values():
        for s in op.support:
            d = {dt: mark(dt in s.dtypes) for dt in ALL_DTYPES}
            notes = s.notes + (" (+fp64)" if "fp64" in s.dtypes else "")
            lines.append(f"| {op.name} | {s.backend} | {d['fp32']} | {d['fp16']} | {d['bf16']} | {mark(s.fwd)} | "
                         f"{mark(s.bwd)} | {mark(s.compile)} | {'yes' if s.gpu_verified else 'not yet'} | "
                         f"{notes.strip()} |")
    return "\n".join([MATRIX_BEGIN, *lines, MATRIX_END])
