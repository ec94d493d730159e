"""`fastlayers info | check | bench` — what runs where, correctness against the references, benchmarks."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys


def _gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def _prepare_interpreter() -> None:
    """Without a GPU the Triton kernels run in the interpreter: set it before any kernel module is imported."""
    if not _gpu():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _table(rows: list[list], header: list[str]) -> str:
    try:
        from tabulate import tabulate
        return tabulate(rows, headers=header, tablefmt="github")
    except ImportError:
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        fmt = " | ".join(f"{{:{w}}}" for w in widths)
        return "\n".join([fmt.format(*header)] + [fmt.format(*map(str, r)) for r in rows])


def cmd_info(args) -> int:
    import torch

    from . import _backend, _ext, registry
    print(f"fastlayers {__import__('fastlayers').__version__} · python {platform.python_version()} · "
          f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    try:
        import triton
        print(f"triton {triton.__version__}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    except Exception as e:
        print(f"triton: not importable ({e})")
    if _gpu():
        p = torch.cuda.get_device_properties(0)
        print(f"GPU: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
    else:
        print("GPU: none — ops run the PyTorch reference on CPU tensors")
    print(f"CUDA extension fastlayers._C: {'loaded' if _ext.load() else 'not available (' + str(_ext.error()) + ')'}")
    forced = _backend.requested()
    print(f"FASTLAYERS_BACKEND / use_backend: {forced or 'auto'}")
    rows = []
    dev = torch.device("cuda" if _gpu() else "cpu")
    for op in registry.get():
        cuda = all(_ext.has_op(n) for n in op.cuda_ops) if op.cuda_ops else False
        try:
            choice = _backend.choose(op.name, dev, cuda_op=op.cuda_ops[0] if op.cuda_ops else None,
                                     prefer=op.prefer)
        except Exception as e:
            choice = f"error: {e}"
        why = {"reference": "CPU tensors: the PyTorch reference" if dev.type == "cpu" else "no kernel available",
               "triton": "Triton kernel on the GPU (auto default)",
               "cuda": "CUDA extension kernel"}.get(choice, "")
        rows.append([op.name, "yes" if op.kernels else "no",
                     "built" if cuda else ("not built" if op.cuda_ops else "none"), choice, why, op.notes])
    print(_table(rows, ["op", "triton kernel", "cuda kernel", "auto backend here", "why", "notes"]))
    return 0


def _compile_only(ops) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # the interpreter replaces @triton.jit functions; compile in a clean process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "fastlayers.cli", "check", "--compile-only"] + (["--ops", *ops] if ops else [])
        return subprocess.call(cmd, env=env)
    from .kernels.common import compile_sm90
    from . import registry
    rows, failed = [], 0
    for op in registry.get(ops):
        mod = op.kernels_module()
        if mod is None:
            continue
        for case in mod.aot_cases():
            try:
                r = compile_sm90(case)
            except Exception as e:
                r = {"kernel": case.name, "ok": False, "why": f"compile error: {type(e).__name__}: {str(e)[:300]}"}
            failed += not r["ok"]
            rows.append([op.name, r["kernel"], r.get("registers"), r.get("shared"), r.get("spill_stores"),
                         r.get("spill_loads"), "ok" if r["ok"] else "FAIL " + r["why"]])
    print(_table(rows, ["op", "kernel [config]", "registers", "shared B", "spill st B", "spill ld B", "sm_90"]))
    print(f"{len(rows)} kernel configurations compiled for sm_90, {failed} failed")
    return 1 if failed else 0


def cmd_check(args) -> int:
    if args.compile_only:
        return _compile_only(args.ops)
    _prepare_interpreter()
    import torch

    from . import registry
    dev = torch.device("cuda" if _gpu() else "cpu")
    print(f"checking kernels against the references on {dev}"
          + (" (Triton interpreter)" if dev.type == "cpu" else ""))
    rows, failed = [], 0
    for op in registry.get(args.ops):
        for case in op.check_cases(dev):
            try:
                results = case.run()
            except Exception as e:
                failed += 1
                rows.append([op.name, case.label, "-", "-", "-", f"ERROR {type(e).__name__}: {str(e)[:120]}"])
                continue
            for r in results:
                failed += not r.ok
                rows.append([op.name, case.label, r.name, f"{r.err:.2e}", f"{r.bound:.2e}",
                             f"{r.max_abs:.2e}", "ok" if r.ok else "FAIL"])
    print(_table(rows, ["op", "case", "tensor", "rel err", "bound", "max abs err", "result"]))
    print(f"{len(rows)} tensors checked, {failed} failed")
    return 1 if failed else 0


def cmd_bench(args) -> int:
    import torch

    from . import registry
    from .benchmarks import common as bc
    if args.report:
        return _report(args.out)
    on_gpu = _gpu()
    dev = torch.device("cuda" if on_gpu else "cpu")
    if not on_gpu:
        print("fastlayers bench: no CUDA GPU on this machine. Kernel speed cannot be measured here, so this run:\n"
              "  1. checks every Triton kernel (interpreted) against its reference, and\n"
              "  2. times the PyTorch reference eager vs torch.compile on small CPU shapes.\n"
              "Run `make bench` on a GPU machine for the real benchmarks.\n")
        rc = cmd_check(argparse.Namespace(ops=args.ops, compile_only=False))
        if rc:
            return rc
        print()
    env = bc.environment()
    try:
        from tqdm import tqdm
    except ImportError:
        def tqdm(x, **k):
            return x
    all_cases = [c for op in registry.get(args.ops) if op.bench for c in op.bench_module().cases(dev, args.quick)]
    if args.no_compile_baselines:  # torch.compile of each baseline costs tens of seconds per shape
        for c in all_cases:
            c.impls = {k: v for k, v in c.impls.items() if not k.endswith("+compile")}
    rows = []
    tag = "bench" if not args.ops else "bench-" + "-".join(args.ops)
    for case in tqdm(all_cases, desc="benchmark cases", unit="case"):
        rows += bc.run_case(case, dev, args.modes, env)
        # written after every case, so a run stopped by a time limit keeps what it measured
        paths = bc.write_results(rows, env, args.out, tag)  # under <out>/<gpu name>/, or <out>/cpu/
    if not rows:
        print("no benchmark cases for the selected ops")
        return 0
    print(bc.render_markdown(rows, env))
    print("results: " + ", ".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


def _report(out_dir: str) -> int:
    """Render every committed GPU result file under out_dir into one markdown page per GPU."""
    from .benchmarks import common as bc
    import glob
    n = 0
    for d in sorted(glob.glob(os.path.join(out_dir, "*"))):
        files = sorted(glob.glob(os.path.join(d, "*.json")))
        if not files or os.path.basename(d) == "cpu":
            continue
        latest: dict = {}
        env = None
        for f in files:  # later files replace earlier rows of the same (op, case, dtype, mode, impl)
            data = json.load(open(f))
            env = data["env"]
            for r in data["rows"]:
                latest[(r["op"], r["case"], r["dtype"], r["mode"], r["impl"])] = r
        rows = list(latest.values())
        with open(os.path.join(d, "REPORT.md"), "w") as fh:
            fh.write(f"# fastlayers benchmarks on {env.get('gpu')}\n\n")
            fh.write(bc.render_markdown(rows, env))
        bc.plot_speedups(rows, os.path.join(d, "REPORT.png"), f"fastlayers speedup — {env.get('gpu')}")
        n += 1
        print(f"wrote {os.path.join(d, 'REPORT.md')}")
    if not n:
        print(f"no GPU results under {out_dir}")
    return 0


def cmd_matrix(args) -> int:
    """Print the support matrix generated from the registry; --write/--check a README's generated block."""
    from . import registry
    block = registry.support_matrix()
    if not args.write and not args.check:
        print(block)
        return 0
    path = args.write or args.check
    text = open(path, encoding="utf-8").read()
    try:
        head, rest = text.split(registry.MATRIX_BEGIN, 1)
        _, tail = rest.split(registry.MATRIX_END, 1)
    except ValueError:
        print(f"{path}: no generated support-matrix block ({registry.MATRIX_BEGIN!r} ... {registry.MATRIX_END!r})")
        return 1
    new = head + block + tail
    if args.check:
        if new != text:
            print(f"{path}: the support matrix is out of date; run `fastlayers matrix --write {path}`")
            return 1
        print(f"{path}: support matrix up to date")
        return 0
    open(path, "w", encoding="utf-8").write(new)
    print(f"wrote the support matrix into {path}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastlayers", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, GPU, extension, and which backend each op uses here")
    c = sub.add_parser("check", help="every op's kernels against its reference at small shapes")
    c.add_argument("--ops", nargs="*", default=None)
    c.add_argument("--compile-only", action="store_true",
                   help="compile every Triton kernel configuration for sm_90 (no GPU needed); fail on spills or "
                        "shared memory over the H100's limit")
    b = sub.add_parser("bench", help="benchmarks (GPU); on CPU: check + reference vs torch.compile")
    b.add_argument("--ops", nargs="*", default=None)
    b.add_argument("--quick", action="store_true", help="fewer, smaller shapes")
    b.add_argument("--modes", nargs="*", default=None, choices=["fwd", "bwd", "fwd+bwd"])
    b.add_argument("--out", default=os.path.join("benchmarks", "results"))
    b.add_argument("--report", action="store_true", help="render committed GPU results into REPORT.md + PNG")
    b.add_argument("--no-compile-baselines", action="store_true",
                   help="skip the torch.compile(reference) baselines (they dominate a short run's time)")
    m = sub.add_parser("matrix", help="the support matrix (op × backend × dtype × fwd/bwd × compile) from the registry")
    g = m.add_mutually_exclusive_group()
    g.add_argument("--write", metavar="README", help="replace the generated block in this file")
    g.add_argument("--check", metavar="README", help="fail if this file's generated block is out of date")
    args = p.parse_args(argv)
    return {"info": cmd_info, "check": cmd_check, "bench": cmd_bench, "matrix": cmd_matrix}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
