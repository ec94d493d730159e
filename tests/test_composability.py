"""Every registered op and module composes with the rest of PyTorch: torch.compile(fullgraph=True) of modules,
torch.autocast, torch.utils.checkpoint. Driven by the registry, so a new op is covered once registered."""
import pytest
import torch
import torch.utils.checkpoint as ckpt

import fastlayers
from fastlayers import registry

from .conftest import ON_GPU

DEV = torch.device("cuda" if ON_GPU else "cpu")
MODULES = [(op.name, i, label) for op in registry.get() for i, (label, _, _) in enumerate(op.module_examples(DEV))]
MOD_IDS = [f"{op}-{label}" for op, _, label in MODULES]


def _example(op, i):
    torch.manual_seed(0)
    _, module, args = registry.OPS[op].module_examples(DEV)[i]
    return module, args


def _run(module, args, wrap=None):
    """Output and the gradients of the inputs and parameters (through .backward(): reentrant checkpointing
    does not support autograd.grad)."""
    args = [a.detach().clone().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
            for a in args]
    module.zero_grad(set_to_none=True)
    out = (wrap if wrap is not None else module)(*args)
    out = out[0] if isinstance(out, tuple) else out
    (out.float() * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad] + list(module.parameters())
    return out.detach(), [t.grad for t in leaves]


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("op, i, label", MODULES, ids=MOD_IDS)
def test_module_torch_compile_fullgraph(op, i, label):
    module, args = _example(op, i)
    with fastlayers.use_backend("triton"):
        eager, g_eager = _run(module, args)
        compiled, g = _run(module, args, torch.compile(module, fullgraph=True, backend="aot_eager"))
    _close(compiled, eager, f"{label} output")
    for a, b in zip(g, g_eager):
        if a is not None or b is not None:
            _close(a, b, f"{label} gradient")


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("op, i, label", MODULES, ids=MOD_IDS)
def test_module_under_checkpoint(op, i, label, use_reentrant):
    module, args = _example(op, i)

    def wrapped(*a):
        return ckpt.checkpoint(module, *a, use_reentrant=use_reentrant)
    with fastlayers.use_backend("triton"):
        plain, g_plain = _run(module, args)
        out, g = _run(module, args, wrapped)
    _close(out, plain, f"{label} output")
    for a, b in zip(g, g_plain):
        if a is not None or b is not None:
            _close(a, b, f"{label} gradient")


# CPU autocast uses fp16 here: the Triton interpreter computes bf16 arithmetic wrongly (DESIGN.md); bf16 is the
# GPU case.
AUTOCAST_DTYPE = torch.bfloat16 if ON_GPU else torch.float16


@pytest.mark.parametrize("op", [op.name for op in registry.get()])
def test_op_casts_like_native_layer_under_autocast(op):
    info = registry.OPS[op]
    cases = [c for c in info.check_cases(DEV) if c.label.startswith("triton") and
             all(v.dtype == torch.float32 for v in c.inputs.values()
                 if isinstance(v, torch.Tensor) and v.is_floating_point())]
    assert cases, f"{op}: no float32 Triton check case"
    case = cases[0]
    want = AUTOCAST_DTYPE if info.autocast == "lower" else torch.float32
    with torch.autocast(DEV.type, dtype=AUTOCAST_DTYPE):
        out = case.fn(**case.inputs, **case.kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    cast = {k: v.detach().to(want) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in case.inputs.items()}
    expected = case.fn(**cast, **case.kwargs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    # the main output takes the autocast dtype (states an op keeps in fp32, like the scan's, are documented)
    assert outs[0].dtype == want, f"{op}: output dtype {outs[0].dtype} under autocast, native layers give {want}"
    for o, e in zip(outs, expected):
        # an op may keep some inputs in fp32 under autocast (e.g. the scan's A), so values agree to fp16 rounding
        torch.testing.assert_close(o.float(), e.float(), rtol=2e-2, atol=2e-2)
