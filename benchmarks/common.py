"""Benchmark harness: time every implementation of a case in the same run, report throughput and the ratio of
each baseline's time to fastlayers' (>1: fastlayers is faster), write JSON rows, a markdown table and a PNG.

On a GPU: triton.testing.do_bench (CUDA events, median, warm-up), inputs rotated when they fit in L2, peak
memory of fwd+bwd. On a CPU: median of wall-clock repeats (for the reference vs torch.compile comparison only).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Sequence

import torch

MODES = ("fwd", "bwd", "fwd+bwd")

# The "bwd" mode replays one forward's graph (retain_graph=True); torch.compile's donated backward buffers forbid
# that, so the compiled baselines keep their buffers here (a benchmark-only setting).
try:
    import torch._functorch.config as _functorch_config
    _functorch_config.donated_buffer = False
except (ImportError, AttributeError):  # older torch: no donated buffers
    pass
L2_ROTATE_BYTES = 256 << 20  # rotate input sets until this many bytes are touched (H100 L2: 50 MB)


@dataclasses.dataclass
class Case:
    op: str
    name: str                                   # readable shape, e.g. "TCNCA B=4 C=256 L=131072 K=3 d=64"
    dtype: torch.dtype
    make_inputs: Callable[[], dict]             # fresh random inputs (grad_inputs must require grad)
    impls: dict                                 # name -> fn(**inputs) -> Tensor | tuple; "fastlayers*" first
    grad_inputs: Sequence[str] = ()
    bytes: Callable[[str], float] | None = None  # minimal bytes moved in a mode (for GB/s)
    flops: Callable[[str], float] | None = None  # useful flops in a mode (for TFLOP/s)
    modes: Sequence[str] = MODES
    params: dict = dataclasses.field(default_factory=dict)


def shapes_and_dtype(device: torch.device, quick: bool, gpu: list, quick_gpu: list, cpu: list):
    """The shapes a bench module runs here and their dtype: bf16 at the papers' shapes on a GPU (fewer with
    --quick), fp32 at small shapes on a CPU (reference vs torch.compile only)."""
    if device.type == "cuda":
        return (quick_gpu if quick else gpu), torch.bfloat16
    return cpu, torch.float32


def optional_import(module: str, name: str):
    """A peer library's function or class, or None when it does not import on this machine."""
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except Exception:  # missing, or a wheel / ABI mismatch (common for CUDA peers)
        return None


def environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, cuda=torch.version.cuda, sms=p.multi_processor_count,
                   cudnn=torch.backends.cudnn.version())
    else:
        env.update(gpu=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or None
    except Exception:
        env["commit"] = None
    return env


def _outs(o) -> list:
    return [t for t in (o if isinstance(o, (tuple, list)) else [o]) if isinstance(t, torch.Tensor)]


def _timer(device: torch.device):
    if device.type == "cuda":
        import triton.testing

        def t(fn):
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        return t

    def t(fn, warmup: int = 3, min_reps: int = 10, min_s: float = 0.3):
        for _ in range(warmup):  # first calls pay for allocator, thread-pool and kernel-selection set-up
            fn()
        samples, start = [], time.perf_counter()
        while len(samples) < min_reps or time.perf_counter() - start < min_s:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)
    return t


def _nbytes(inputs: dict) -> int:
    return sum(v.numel() * v.element_size() for v in inputs.values() if isinstance(v, torch.Tensor))


def time_impl(case: Case, fn: Callable, mode: str, device: torch.device, sets: list[dict]) -> float:
    """Median ms of one mode, cycling through the input sets."""
    timer = _timer(device)
    pos = {"i": 0}

    def next_i() -> int:
        pos["i"] = (pos["i"] + 1) % len(sets)
        return pos["i"]

    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(**sets[next_i()])
        return timer(run)
    outs = [_outs(fn(**s)) for s in sets]
    douts = [[torch.randn_like(o) for o in os_] for os_ in outs]
    leaves = [[s[k] for k in case.grad_inputs] for s in sets]
    if mode == "bwd":  # the graph of one forward per set, kept and replayed
        def run():
            i = next_i()
            torch.autograd.grad(outs[i], leaves[i], douts[i], retain_graph=True)
    else:
        del outs

        def run():
            i = next_i()
            torch.autograd.grad(_outs(fn(**sets[i])), leaves[i], douts[i])
    return timer(run)


def peak_memory_mb(case: Case, fn: Callable, s: dict) -> float | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    outs = _outs(fn(**s))
    if case.grad_inputs:
        torch.autograd.grad(outs, [s[k] for k in case.grad_inputs], [torch.ones_like(o) for o in outs])
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_case(case: Case, device: torch.device, modes: Sequence[str] | None = None, env: dict | None = None
             ) -> list[dict]:
    env = env or environment()
    modes = [m for m in (modes or case.modes) if m in case.modes and (m == "fwd" or case.grad_inputs)]
    first = case.make_inputs()
    n_sets = 1 if device.type != "cuda" else max(1, min(8, L2_ROTATE_BYTES // max(1, _nbytes(first))))
    sets = [first] + [case.make_inputs() for _ in range(n_sets - 1)]
    rows = []
    for impl, fn in case.impls.items():
        for mode in modes:
            row = {"op": case.op, "case": case.name, "dtype": str(case.dtype).replace("torch.", ""), "mode": mode,
                   "impl": impl, "params": case.params, **{k: env.get(k) for k in ("gpu", "torch", "triton", "cuda",
                                                                                   "date", "commit")}}
            try:
                ms = time_impl(case, fn, mode, device, sets)
                row["ms"] = ms
                if case.bytes is not None:
                    row["GB/s"] = case.bytes(mode) / ms / 1e6
                if case.flops is not None:
                    row["TFLOP/s"] = case.flops(mode) / ms / 1e9
                if mode == "fwd+bwd":
                    row["peak_mb"] = peak_memory_mb(case, fn, first)
            except Exception as e:  # a baseline that cannot run this case is reported, not fatal
                row["ms"] = None
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
    add_ratios(rows)
    return rows


def _is_subject(impl: str, grp: list[dict]) -> bool:
    """The implementations whose speed is reported against the others: fastlayers' (or, in a CPU run that has
    no fastlayers kernel, torch.compile of the reference against the eager reference)."""
    if any(r["impl"].startswith("fastlayers") for r in grp):
        return impl.startswith("fastlayers")
    return impl.endswith("+compile")


def add_ratios(rows: list[dict]) -> None:
    """For each (case, mode): speedup of every subject impl over each baseline and over the best baseline."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["op"], r["case"], r["dtype"], r["mode"]), []).append(r)
    for grp in groups.values():
        base = {r["impl"]: r["ms"] for r in grp if not _is_subject(r["impl"], grp) and r.get("ms")}
        for r in grp:
            if _is_subject(r["impl"], grp) and r.get("ms"):
                r["speedup"] = {b: ms / r["ms"] for b, ms in base.items()}
                if base:
                    best = min(base, key=base.get)
                    r["best_baseline"] = best
                    r["speedup_vs_best"] = base[best] / r["ms"]


def render_markdown(rows: list[dict], env: dict | None = None) -> str:
    env = env or {}
    head = (f"GPU: {env.get('gpu') or 'none (CPU)'} · torch {env.get('torch')} · triton {env.get('triton')} · "
            f"CUDA {env.get('cuda')} · {env.get('date')} · commit {env.get('commit')}\n\n")
    lines = ["| op | case | dtype | mode | impl | ms | throughput | speedup (baseline ms / this ms) | peak MB |",
             "|---|---|---|---|---|---:|---:|---|---:|"]
    for r in rows:
        thr = (f"{r['TFLOP/s']:.3g} TFLOP/s" if r.get("TFLOP/s") is not None else
               f"{r['GB/s']:.4g} GB/s" if r.get("GB/s") is not None else "")
        sp = ", ".join(f"{b}: {v:.2f}×" for b, v in (r.get("speedup") or {}).items())
        ms = f"{r['ms']:.4f}" if r.get("ms") else f"error: {r.get('error', '')[:60]}"
        peak = f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else ""
        lines.append(f"| {r['op']} | {r['case']} | {r['dtype']} | {r['mode']} | {r['impl']} | {ms} | {thr} | {sp} "
                     f"| {peak} |")
    return head + "\n".join(lines) + "\n"


def _slug(s: str | None) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in (s or "cpu")).strip("-").lower()


def write_results(rows: list[dict], env: dict, out_dir: str, tag: str) -> dict:
    """JSON rows + markdown table + PNG speedup plot under out_dir/<gpu>/; returns the paths."""
    d = os.path.join(out_dir, _slug(env.get("gpu")))
    os.makedirs(d, exist_ok=True)
    stamp = env["date"].replace(":", "").replace("-", "")
    paths = {"json": os.path.join(d, f"{tag}-{stamp}.json"), "md": os.path.join(d, f"{tag}.md"),
             "png": os.path.join(d, f"{tag}.png")}
    with open(paths["json"], "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(render_markdown(rows, env))
    try:
        plot_speedups(rows, paths["png"], title=f"speedup over the best baseline — {env.get('gpu') or 'CPU'}")
    except Exception as e:  # matplotlib missing: the table and JSON still stand
        paths["png"] = f"not written ({type(e).__name__}: {e})"
    return paths


def plot_speedups(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("speedup_vs_best") and r["impl"] == "fastlayers"]
    if not pts:  # no auto-backend rows (e.g. a CPU run): plot every subject
        pts = [r for r in rows if r.get("speedup_vs_best")]
    if not pts:
        return
    labels = [f"{r['impl']}: {r['case']}\n{r['mode']} vs {r['best_baseline']}" for r in pts]
    vals = [r["speedup_vs_best"] for r in pts]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(pts) + 1.5))
    colors = ["tab:green" if v >= 1 else "tab:red" for v in vals]
    ax.barh(range(len(vals)), vals, color=colors)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_yticks(range(len(vals)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup (best baseline time / this time); > 1 is faster")
    ax.set_title(title, fontsize=9)
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.2f}×", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
