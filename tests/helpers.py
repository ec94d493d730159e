"""Small helpers the op tests share (tolerances live in fastlayers.testing)."""
import torch

from fastlayers.testing import assert_results, compare


def rand(*shape, dtype=torch.float32, device="cpu", grad=True, scale=1.0):
    t = (torch.randn(*shape, dtype=torch.float32) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


def check(fn, ref, inputs, kwargs=None, out_names=None, context=""):
    """Outputs and every gradient of fn against the reference ("twice PyTorch's own error")."""
    results = compare(fn, ref, inputs, kwargs, out_names=out_names)
    assert_results(results, context)
    return results
