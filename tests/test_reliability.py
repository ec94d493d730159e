"""For every registered op's kernel paths: bit-reproducible backward, inputs never mutated, NaN/Inf propagate
as in the reference, and the determinism switch."""
import pytest
import torch

import fastlayers
from fastlayers import registry
from fastlayers.testing import _flat

from .conftest import ON_GPU

DEV = torch.device("cuda" if ON_GPU else "cpu")
CASES = [(op.name, i, c.label) for op in registry.get() for i, c in enumerate(op.check_cases(DEV))
         if c.label.startswith("triton")]
IDS = [f"{op}-{label}" for op, _, label in CASES]


def _case(op, i):
    return registry.OPS[op].check_cases(DEV)[i]


def _run(case, inputs):
    outs = [o for o in _flat(case.fn(**inputs, **case.kwargs)) if o.requires_grad]
    leaves = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    gen = torch.Generator().manual_seed(1)
    douts = [torch.randn(o.shape, generator=gen).to(o) for o in outs]
    return outs, torch.autograd.grad(outs, leaves, douts, allow_unused=True)


@pytest.mark.parametrize("op, i, label", CASES, ids=IDS)
def test_backward_bit_reproducible_and_inputs_untouched(op, i, label):
    case = _case(op, i)
    before = {k: v.detach().clone() for k, v in case.inputs.items() if isinstance(v, torch.Tensor)}
    o1, g1 = _run(case, case.inputs)
    o2, g2 = _run(case, case.inputs)
    for a, b in zip(o1 + list(g1), o2 + list(g2)):
        if a is not None:
            assert torch.equal(a, b), f"{label}: two identical runs differ"
    for k, v in before.items():
        assert torch.equal(case.inputs[k].detach(), v), f"{label}: input `{k}` was modified"


FP32_CASES = [next(c for c in CASES if c[0] == op.name and "float32" in c[2]) for op in registry.get()]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("op, i, label", FP32_CASES, ids=[f"{c[0]}-{c[2]}" for c in FP32_CASES])
def test_nonfinite_propagates_like_reference(op, i, label, value):
    case = _case(op, i)
    inputs = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in case.inputs.items()}
    first = next(k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.is_floating_point())
    inputs[first].view(-1)[inputs[first].numel() // 2] = value
    with torch.no_grad():
        got = _flat(case.fn(**inputs, **case.kwargs))
        ref = _flat(case.ref(**inputs, **case.kwargs))
    mode = registry.OPS[op].nonfinite
    for g, r in zip(got, ref):
        if mode == "exact":
            assert torch.equal(torch.isnan(g), torch.isnan(r)), f"{label}: NaN pattern differs from the reference"
            assert torch.equal(torch.isinf(g), torch.isinf(r)), f"{label}: Inf pattern differs from the reference"
        else:  # documented in the registry: non-finite values may spread further, never vanish
            assert not (~torch.isfinite(r) & torch.isfinite(g)).any(), f"{label}: a non-finite output became finite"
        fin = torch.isfinite(g) & torch.isfinite(r)
        torch.testing.assert_close(g[fin], r[fin], rtol=1e-4, atol=1e-4)


def test_use_deterministic_switch():
    from fastlayers import _determinism
    assert not _determinism.enabled()
    with fastlayers.use_deterministic(True):
        assert _determinism.enabled() and torch.are_deterministic_algorithms_enabled()
    assert not _determinism.enabled() and not torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert _determinism.enabled()  # torch's own switch is honoured
    finally:
        torch.use_deterministic_algorithms(False)
    with pytest.raises(TypeError, match="mode"):
        fastlayers.use_deterministic("yes")
